"""The Studio (fluxnb/studio.py) driven as a user would, without a browser: fill the form, click, read the files.

Runs on the tiny stand-in (conftest.py sets FLUXNB_CHECKPOINT=tiny and a scratch cache).
"""

import os
import html
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import fluxnb
from fluxnb import stages
from fluxnb.exceptions import BadSettingError
from fluxnb.studio import Studio, png_settings, reproduction_code, validate_request

MODEL_ID = "black-forest-labs/FLUX.1-dev"


@pytest.fixture(scope="module")
def checkpoint():
    fluxnb.allow_bitsandbytes_on_cpu()
    ck = fluxnb.checkpoints.stand_in_folder(MODEL_ID, "tiny")  # this process serves no stand-in Hub (conftest.py)
    return ck, str(fluxnb.prequantized.stand_in_package("tiny", fluxnb.pick_dtype()))


def run_as_a_script(code: str, folder):
    """Run Show code's script as a learner would: saved to a file, ``python remade.py``, in a fresh interpreter
    (no saved embeddings there: it encodes again); it writes ``folder / "remade.png"``."""
    import subprocess
    import sys

    (folder / "remade.py").write_text(code)
    env = {**os.environ, "FLUXNB_HUB_CACHE": str(folder / "hub-cache"), "FLUXNB_OUTPUT": str(folder / "elsewhere")}
    done = subprocess.run([sys.executable, "remade.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def loads(monkeypatch):
    """Counts real loads by wrapping the course's loaders (independent of the Studio's own counter)."""
    counts = Counter()
    for name in ("load_text_encoders_4bit", "load_transformer_4bit"):
        real = getattr(stages, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(stages, name, counted)
    return counts


def make_studio(checkpoint, tmp_path, **kwargs):
    ck, pq = checkpoint
    dtype = fluxnb.pick_dtype()
    return Studio(ck, dtype, dtype, tmp_path, model_id=MODEL_ID, prequantized=pq, **kwargs)


def fill(studio, **values):
    for name, value in values.items():
        getattr(studio, name).value = value


def click_and_wait(studio):
    studio.generate_button.click()
    studio.wait(timeout=120)
    assert studio.last_error is None, studio.last_error


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_two_clicks_make_two_pngs_with_their_settings_and_load_each_model_once(checkpoint, tmp_path, loads):
    studio = make_studio(checkpoint, tmp_path)
    fill(studio, prompt="a red bicycle in the snow", seed=7, steps=3, guidance=2.5, height=64, width=48, count=1)
    click_and_wait(studio)
    fill(studio, random_seed=True)  # second click: a random seed, drawn and shown in the form
    click_and_wait(studio)

    first, second = studio.generations
    assert not first.stopped and not second.stopped
    paths = first.paths + second.paths
    assert len(paths) == 2 and paths[0] != paths[1] and all(p.is_file() for p in paths)
    assert [p.parent for p in paths] == [tmp_path / "images"] * 2
    assert second.seeds == [studio.seed.value]
    for path, seed in zip(paths, first.seeds + second.seeds):
        meta = png_settings(path)
        assert meta["prompt"] == "a red bicycle in the snow" and meta["seed"] == str(seed)
        assert (meta["steps"], meta["guidance"], meta["height"], meta["width"]) == ("3", "2.5", "64", "48")
        assert meta["checkpoint"] == checkpoint[0] and meta["model_id"] == MODEL_ID
        assert Image.open(path).size == (48, 64)
    if first.seeds != second.seeds:  # 1 in 2**32 that the random seed is 7
        assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))
    assert loads == {"load_text_encoders_4bit": 1, "load_transformer_4bit": 1}
    assert studio.loads == {"text encoders": 1, "denoiser": 1}
    assert len(studio.gallery.children) == 2 and studio.selected.value == str(paths[1])
    assert "Done: 1 image(s)" in studio.status.value
    assert "RAM" in studio.memory.value


def test_more_images_per_click_use_consecutive_seeds_and_never_overwrite(checkpoint, tmp_path):
    studio = make_studio(checkpoint, tmp_path)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "image-0001.png")  # made earlier: must survive
    before = (tmp_path / "images" / "image-0001.png").read_bytes()
    result = studio.generate(prompt="three boats", seed=10, steps=2, height=32, width=32, count=3)
    assert result.seeds == [10, 11, 12]
    assert [p.name for p in result.paths] == ["image-0002.png", "image-0003.png", "image-0004.png"]
    assert (tmp_path / "images" / "image-0001.png").read_bytes() == before
    assert [png_settings(p)["seed"] for p in result.paths] == ["10", "11", "12"]


def test_show_code_remakes_the_selected_image_exactly(checkpoint, tmp_path, monkeypatch):
    studio = make_studio(checkpoint, tmp_path / "studio")
    result = studio.generate(prompt="a lighthouse at dusk", seed=3, steps=2, height=32, width=64, count=1)
    code = studio.code_button.click() or studio.code.value
    assert code == reproduction_code(result.paths[0]) and "SEED, STEPS, GUIDANCE = 3, 2" in code
    assert studio.code.layout.display is None  # shown
    second = studio.generate(prompt="a lighthouse at dusk", seed=4, steps=2, height=32, width=64, count=1)
    assert studio.selected.value == str(second.paths[0]) and "SEED, STEPS, GUIDANCE = 4, 2" in studio.code.value
    studio.selected.value = str(result.paths[0])  # picking an image in the list updates the code shown
    assert studio.code.value == code
    run_as_a_script(code, tmp_path)
    assert np.array_equal(pixels(tmp_path / "remade.png"), pixels(result.paths[0]))
    # a standalone diffusers script: fluxnb only in the visible switch to the stand-in it was made with, which
    # serves it under the real ids; the rest is the real model's script
    fluxnb_lines = [line for line in code.splitlines() if "fluxnb" in line and not line.startswith("#")]
    assert fluxnb_lines == ["import fluxnb", "fluxnb.resolve_checkpoint('black-forest-labs/FLUX.1-dev', choice='tiny')"
                            "  # before diffusers is imported"], fluxnb_lines
    assert code.index("import fluxnb") < code.index("from diffusers")
    assert "MODEL_ID = 'black-forest-labs/FLUX.1-dev'" in code and str(tmp_path) not in code  # no local cache paths
    assert "PREQUANTIZED = 'hf-internal-testing/flux.1-dev-nf4-pkg'" in code
    for call in ("T5EncoderModel.from_pretrained", "FluxTransformer2DModel.from_pretrained", "pipe.encode_prompt"):
        assert call in code


def test_full_size_shows_the_selected_png_as_saved(checkpoint, tmp_path):
    studio = make_studio(checkpoint, tmp_path)
    assert studio.show_full_size() == b"" and "generate one first" in studio.status.value
    first = studio.generate(prompt="a boat", seed=1, steps=2, height=32, width=48).paths[0]
    studio.full_button.click()
    assert studio.full_view.value == first.read_bytes() and studio.full_view.layout.display is None
    second = studio.generate(prompt="a boat", seed=2, steps=2, height=32, width=48).paths[0]
    assert studio.full_view.value == second.read_bytes()  # follows the selection
    with Image.open(io.BytesIO(studio.full_view.value)) as shown:
        assert shown.size == (48, 32)  # full size, not the gallery's thumbnail


def test_show_code_of_a_streamed_image_names_the_course_streamer(checkpoint, tmp_path, monkeypatch):
    """On a GPU too small for every block, the script streams as the Studio did, with the course's streamer."""
    from fluxnb import studio as studio_module

    monkeypatch.setattr(studio_module, "plan_room", lambda *args: studio_module.Room(2, tiled_decode=False))
    monkeypatch.setattr(studio_module, "free_vram_gib", lambda: 8.0)
    studio = make_studio(checkpoint, tmp_path)
    path = studio.generate(prompt="a cat", steps=2, height=32, width=32, seed=5).paths[0]
    code = reproduction_code(path)
    assert "fluxnb.apply_block_streaming(transformer, fluxnb.BlockStreamingConfig(resident_blocks=2))" in code and "notebook 08" in code


def test_stop_ends_the_generation_cleanly_and_the_next_click_works(checkpoint, tmp_path):
    studio = make_studio(checkpoint, tmp_path)
    fill(studio, prompt="a slow picture", seed=1, steps=30, height=32, width=32, count=2)

    def press_stop_at_step_2(change):
        if change["new"] == 2:
            studio.stop_button.click()

    studio.progress.observe(press_stop_at_step_2, "value")
    assert studio.stop_button.disabled  # nothing to stop yet
    click_and_wait(studio)
    stopped = studio.generations[-1]
    assert stopped.stopped and stopped.paths == []
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").glob("*.png"))
    assert "Stopped at step 2 of 30" in studio.status.value
    assert studio.progress.value == 2 and not studio.generate_button.disabled and studio.stop_button.disabled

    studio.progress.unobserve(press_stop_at_step_2, "value")
    fill(studio, steps=3, count=1)
    click_and_wait(studio)
    assert len(studio.generations[-1].paths) == 1 and studio.progress.value == 3


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "   ", "prompt is empty"),
    ("height", 1000, "height=1000 must be a positive multiple of 16"),
    ("width", 0, "width=0 must be a positive multiple of 16"),
    ("steps", 0, "num_inference_steps=0 must be an integer >= 1"),
    ("guidance", -1.0, "guidance_scale=-1.0 must be >= 0"),
    ("count", 0, "number of images=0 must be a whole number from 1 to 8"),
    ("count", 9, "number of images=9 must be a whole number from 1 to 8"),
    ("seed", -5, "seed=-5 is out of range"),
])
def test_bad_input_is_refused_with_a_message_before_anything_loads(checkpoint, tmp_path, loads, field, value, message):
    studio = make_studio(checkpoint, tmp_path)
    fill(studio, **{**dict(steps=2, height=32, width=32), field: value})
    studio.generate_button.click()
    assert studio.thread is None  # nothing started
    assert html.escape(message) in studio.status.value and "#b00020" in studio.status.value  # shown, in red
    assert not loads and not (tmp_path / "images").exists()
    with pytest.raises(ValueError, match=message.split("=")[0]):
        studio.generate()


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps="20"), "num_inference_steps='20' must be an integer >= 1"),
    (dict(seed=True), "seed must be an integer, not bool"),
    (dict(height=512.0), "height=512.0 must be a positive multiple of 16"),
    (dict(guidance="high"), "guidance_scale must be a number"),
    (dict(guidance=float("nan")), "guidance_scale must be a number"),
    (dict(prompt=None), "prompt must be a string, not NoneType"),
    (dict(count=2.0), "number of images=2.0 must be a whole number"),
    (dict(seed=2**64 - 1, count=2), "seed=18446744073709551615 with 2 images would go past the largest seed"),
])
def test_validate_request_rejects_wrong_types(kwargs, message):
    """The form's checks are the notebooks' checks (fluxnb.errors): the same mistake, the same error."""
    good = dict(prompt="a cat", seed=0, steps=4, guidance=3.5, height=64, width=64, count=1)
    with pytest.raises(BadSettingError, match=message.replace("(", r"\(")) as caught:
        validate_request(**{**good, **kwargs})
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TypeError)
    if "count" in kwargs:
        return  # the number of images is the Studio's own setting
    request = {k: v for k, v in {**good, **kwargs}.items() if k != "count"}
    with pytest.raises(BadSettingError) as direct:
        fluxnb.errors.check_prompt(request.pop("prompt"))
        fluxnb.check_generation_request(**request)
    assert str(direct.value) == str(caught.value)


def test_a_second_generation_while_one_runs_is_refused(checkpoint, tmp_path):
    studio = make_studio(checkpoint, tmp_path)
    studio._busy.acquire()  # as while a click's thread is generating
    try:
        with pytest.raises(RuntimeError, match="generating already"):
            studio.generate(prompt="a cat", steps=2, height=32, width=32)
        studio.generate_button.click()
        assert "Already generating" in studio.status.value and studio.thread is None
    finally:
        studio._busy.release()


def test_small_gpu_policy_frees_t5_before_the_transformer_and_reuses_embeddings(checkpoint, tmp_path, loads):
    """keep_text_encoders=False is the staged flow of a GPU too small for both: a repeated prompt loads nothing."""
    studio = make_studio(checkpoint, tmp_path, keep_text_encoders=False)
    small = dict(steps=2, height=32, width=32)
    studio.generate(prompt="first prompt", **small)
    assert studio._encoders is None and studio._denoiser is not None  # T5 freed before the transformer
    studio.generate(prompt="first prompt", seed=1, **small)  # same prompt: embeddings kept, nothing loads
    assert loads == {"load_text_encoders_4bit": 1, "load_transformer_4bit": 1}
    studio.generate(prompt="second prompt", **small)  # new prompt: transformer out, T5 in and out, back
    assert loads == {"load_text_encoders_4bit": 2, "load_transformer_4bit": 2}
    assert studio._encoders is None


def test_reproduction_code_explains_a_png_without_studio_metadata(tmp_path):
    path = stages.save_image(Image.new("RGB", (16, 16)), tmp_path, prompt="x", seed=0)
    with pytest.raises(ValueError, match="not saved by the Studio"):
        reproduction_code(path)


def test_a_failure_during_a_click_is_shown_and_the_studio_stays_usable(checkpoint, tmp_path, monkeypatch):
    studio = make_studio(checkpoint, tmp_path)
    fill(studio, prompt="a cat", steps=2, height=32, width=32)

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated: the transformer does not fit")

    monkeypatch.setattr(stages, "load_transformer_4bit", no_memory)
    studio.generate_button.click()
    studio.wait(timeout=120)
    assert isinstance(studio.last_error, MemoryError)
    assert "MemoryError: simulated: the transformer does not fit" in studio.status.value
    assert "Traceback" in studio.log.outputs[-1]["text"]  # the whole traceback, for whoever asks for help
    assert not studio.generate_button.disabled and studio.stop_button.disabled
    monkeypatch.undo()
    studio.last_error = None
    click_and_wait(studio)  # the lock was released: the next click works
    assert len(studio.generations[-1].paths) == 1


def test_a_size_that_does_not_fit_streams_blocks_and_the_image_is_unchanged(checkpoint, tmp_path, monkeypatch):
    """As on an 8 GB card at 1024x1024: plan_room asks for fewer resident blocks, the Studio streams the
    rest from host RAM (same pixels as all-resident), and a size that fits puts them back."""
    from fluxnb import streaming, studio as studio_module

    plain = make_studio(checkpoint, tmp_path / "plain")
    reference = plain.generate(prompt="a cat", steps=2, height=64, width=64, seed=5).paths[0]
    plain.close()

    asked = []

    def small_card(sizes, n_double, height, width, free_bytes):  # the tiny model has 2 blocks: keep 1 at 64x64
        asked.append((height, width))
        return studio_module.Room(1 if (height, width) == (64, 64) else None, tiled_decode=False)

    monkeypatch.setattr(studio_module, "plan_room", small_card)
    monkeypatch.setattr(studio_module, "free_vram_gib", lambda: 8.0)  # as if on a GPU: the Studio plans
    studio = make_studio(checkpoint, tmp_path / "small")
    said = []
    real_say = studio._say
    studio._say = lambda text, error=False: (said.append(text), real_say(text, error))
    path = studio.generate(prompt="a cat", steps=2, height=64, width=64, seed=5).paths[0]
    streamer = streaming.get_block_streamer(studio._denoiser.transformer)
    assert streamer is not None and streamer.host_bytes > 0
    assert any("streaming 1 of its 2 blocks from host RAM" in text for text in said), said
    np.testing.assert_array_equal(pixels(path), pixels(reference))
    assert png_settings(path)["vae_tiling"] == "False"
    studio.generate(prompt="a cat", steps=2, height=64, width=64, seed=6)  # same size: nothing re-placed
    assert asked == [(64, 64)]
    studio.generate(prompt="a cat", steps=2, height=32, width=32, seed=5)  # fits: every block back
    assert asked == [(64, 64), (32, 32)] and streaming.get_block_streamer(studio._denoiser.transformer) is None
    assert studio.loads["denoiser"] == 1


def test_a_size_too_big_to_decode_whole_decodes_in_tiles_and_show_code_says_so(checkpoint, tmp_path, monkeypatch):
    from fluxnb import studio as studio_module

    monkeypatch.setattr(studio_module, "plan_room", lambda *args: studio_module.Room(None, tiled_decode=True))
    monkeypatch.setattr(studio_module, "free_vram_gib", lambda: 8.0)
    studio = make_studio(checkpoint, tmp_path)
    path = studio.generate(prompt="a cat", steps=2, height=64, width=64, seed=5).paths[0]
    assert studio._denoiser.vae.use_tiling and studio._denoiser.vae.tile_sample_min_size == 512
    assert png_settings(path)["vae_tiling"] == "True"
    assert "vae.enable_tiling()" in reproduction_code(path)
    assert "512-pixel tiles" in html.unescape(studio.status.value) or studio.generations[-1].paths


FLUX_BLOCKS = [int(0.162 * 2**30)] * 19 + [int(0.086 * 2**30)] * 38  # NF4 FLUX.1: about 6.2 GiB in 57 blocks


def test_the_studio_makes_room_for_the_decode_on_an_8gb_card():
    """Finding 1 of issue 16: on the 8 GB card (0.67 GiB free once the 4-bit transformer and the VAE are
    loaded, benchmarks/results/h100-offload.json) the Studio streamed blocks for the 1024x1024 step only,
    and the decode next to the transformer ran out of memory. Its plan must leave room for the decode."""
    from fluxnb import capacity, streaming
    from fluxnb.studio import plan_room

    free = int(0.67 * 2**30)
    room = plan_room(FLUX_BLOCKS, 19, 1024, 1024, free)
    assert room.resident_blocks is not None and not room.tiled_decode
    streamed = set(streaming.choose_streamed(19, 38, room.resident_blocks))
    kept = sum(s for i, s in enumerate(FLUX_BLOCKS) if i not in streamed) + 2 * max(FLUX_BLOCKS[i] for i in streamed)
    room_left = free + sum(FLUX_BLOCKS) - kept
    assert room_left >= capacity.decode_bytes(1024, 1024) > capacity.step_bytes(1024, 1024)
    step_only = streaming.resident_blocks(FLUX_BLOCKS, 19, capacity.step_bytes(1024, 1024), free)
    assert step_only > room.resident_blocks  # what the Studio did before: too many blocks kept for the decode
    assert plan_room(FLUX_BLOCKS, 19, 512, 512, int(8 * 2**30)) == studio_room(None, False)
    huge = plan_room(FLUX_BLOCKS, 19, 2048, 2048, free)  # a whole 2048x2048 decode needs ~9 GiB: tiles
    assert huge.tiled_decode and huge.resident_blocks is not None


def studio_room(resident, tiled):
    from fluxnb.studio import Room

    return Room(resident, tiled)


def test_a_size_the_studio_cannot_make_is_refused_before_loading(checkpoint, tmp_path, monkeypatch, loads):
    from fluxnb import studio as studio_module
    from fluxnb.studio import SizeDoesNotFitError, check_room_before_loading, plan_room

    check_room_before_loading(1024, 1024, free_gib=7.08)  # an 8 GB card: fits (streaming, tiles)
    check_room_before_loading(2048, 2048, free_gib=7.08)
    with pytest.raises(SizeDoesNotFitError, match=r"4096x4096 needs at least 6.4 GiB .* choose a smaller size"):
        check_room_before_loading(4096, 4096, free_gib=6.0)  # its step alone: 5.9 GiB
    with pytest.raises(SizeDoesNotFitError, match="Choose a smaller size"):
        plan_room(FLUX_BLOCKS[:29], 19, 4096, 4096, int(0.2 * 2**30))  # a smaller model, nothing left to stream
    assert issubclass(SizeDoesNotFitError, fluxnb.errors.FluxnbError)

    # through the button: the message in red, and nothing loaded
    monkeypatch.setattr(studio_module, "free_vram_gib", lambda: 1.0)  # as on a GPU with 1 GiB free
    monkeypatch.setattr(studio_module, "memory_readout", lambda: "")
    studio = make_studio(checkpoint, tmp_path)
    fill(studio, height=2048, width=2048)
    studio.generate_button.click()
    studio.wait(timeout=60)
    assert isinstance(studio.last_error, SizeDoesNotFitError)
    assert "2048x2048 needs at least" in html.unescape(studio.status.value)
    assert sum(loads.values()) == 0 and studio.loads == Counter()


KLEIN_ID = "black-forest-labs/FLUX.2-klein-4B"


@pytest.fixture(scope="module")
def klein_checkpoint():
    fluxnb.allow_bitsandbytes_on_cpu()
    return fluxnb.checkpoints.stand_in_folder(KLEIN_ID, "tiny")


def test_klein_generates_with_its_own_flow_and_settings_and_show_code_remakes_it(klein_checkpoint, tmp_path, monkeypatch):
    """Studio(model_id=FLUX.2-klein-4B): klein's staged flow (fluxnb.klein), 4 steps and guidance 1.0 by default
    (the field greyed out), each model loaded once, and Show code's script makes the same pixels."""
    from fluxnb import klein

    calls = Counter()
    for name in ("load_text_encoder", "load_transformer"):
        real = getattr(klein, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(klein, name, counted)
    dtype = fluxnb.pick_dtype()
    studio = Studio(klein_checkpoint, dtype, dtype, tmp_path / "studio", model_id=KLEIN_ID)
    assert (studio.steps.value, studio.guidance.value, studio.guidance.disabled) == (4, 1.0, True)
    fill(studio, prompt="a lighthouse at dusk", seed=3, height=32, width=64, count=1)
    click_and_wait(studio)
    second = studio.generate(prompt="a lighthouse at dusk", seed=4, steps=2, height=32, width=32)
    assert calls == {"load_text_encoder": 1, "load_transformer": 1}  # the same prompt: nothing loads again
    first = studio.generations[0]
    meta = png_settings(first.paths[0])
    assert meta["model_id"] == KLEIN_ID and meta["steps"] == "4" and meta["guidance"] == "1.0"
    assert Image.open(first.paths[0]).size == (64, 32) and Image.open(second.paths[0]).size == (32, 32)
    with pytest.raises(BadSettingError, match="fixed at 1"):
        studio.generate(prompt="a lighthouse at dusk", guidance=3.5, height=32, width=32)
    code = reproduction_code(first.paths[0])
    assert "Flux2KleinPipeline" in code and "Qwen3ForCausalLM" in code and "SEED, STEPS, GUIDANCE = 3, 4, 1.0" in code
    fluxnb_lines = [line for line in code.splitlines() if "fluxnb" in line and not line.startswith("#")]
    assert fluxnb_lines == ["import fluxnb",
                            f"fluxnb.resolve_checkpoint({KLEIN_ID!r}, choice='tiny')  # before diffusers is imported"]
    assert f"MODEL_ID = {KLEIN_ID!r}" in code and str(tmp_path) not in code
    run_as_a_script(code, tmp_path)
    assert np.array_equal(pixels(tmp_path / "remade.png"), pixels(first.paths[0]))
