"""Errors that teach: each test provokes one kind of bad input and checks the message says what to do.

The Hub is a stand-in on localhost (``fake_hub`` in conftest.py): nothing leaves the machine.
"""

import json
import re
import shutil
import socket
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image

import fluxnb
from fluxnb import capacity, errors
from tests.conftest import BAD_TOKEN, GATED, GOOD_TOKEN, NO_LICENCE_TOKEN

REPO = Path(__file__).parent.parent


class NoPipe:
    """A pipeline that fails the test if anything touches it: the check must come first."""

    def __getattr__(self, name):
        raise AssertionError(f"the pipeline was touched ({name}) before the arguments were checked")


@pytest.fixture(scope="module")
def tiny():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny("dev"))


@pytest.fixture(scope="module")
def encoders(tiny):
    return fluxnb.load_text_encoders_4bit(tiny, torch.float32)


@pytest.fixture(scope="module")
def denoiser(tiny):
    return fluxnb.load_denoising_pipeline(tiny, fluxnb.load_transformer_4bit(tiny, torch.float32), torch.float32)


# --- arguments of the functions the notebooks call ----------------------------------------------

GOOD = dict(height=64, width=64, steps=2, guidance=3.5, seed=0)
BAD_ARGUMENTS = [  # (argument, bad value, exception, what the message must say)
    ("height", 1000, ValueError, r"height=1000 must be a positive multiple of 16.*try height=992"),
    ("height", "1024", ValueError, r"height='1024' must be a positive multiple of 16.*try height=1024"),
    ("width", 0, ValueError, r"width=0 must be a positive multiple of 16"),
    ("width", 1023.5, ValueError, r"width=1023.5 must be a positive multiple of 16.*try width=1024"),
    ("width", 8192, ValueError, r"width=8192 is larger than 4096: FLUX.1 was trained up to about 2 megapixels"),
    ("steps", 0, ValueError, r"num_inference_steps=0 must be an integer >= 1"),
    ("steps", 2.5, ValueError, r"num_inference_steps=2.5 must be an integer >= 1"),
    ("steps", 5000, ValueError, r"num_inference_steps=5000 is more than the scheduler's 1000 timesteps"),
    ("guidance", "high", TypeError, r"guidance_scale must be a number, not 'high' \(dev: 3.5, schnell: 0\)"),
    ("guidance", float("nan"), TypeError, r"guidance_scale must be a number, not nan"),
    ("guidance", -1.0, ValueError, r"guidance_scale=-1.0 must be >= 0"),
    ("seed", 1.5, TypeError, r"seed must be an integer, not float \(1.5\).*random.randrange"),
    ("seed", "42", TypeError, r"seed must be an integer, not str"),
    ("seed", -1, ValueError, r"seed=-1 is out of range: use 0 <= seed <= 2\*\*64 - 1"),
    ("seed", True, TypeError, r"seed must be an integer, not bool"),
]


@pytest.mark.parametrize("name, value, error, match", BAD_ARGUMENTS, ids=lambda v: repr(v)[:20])
def test_denoise_refuses_bad_arguments_before_touching_the_pipeline(name, value, error, match):
    kwargs = dict(GOOD, **{name: value})
    with pytest.raises(error, match=match):
        fluxnb.denoise(NoPipe(), {}, **kwargs)
    with pytest.raises(error, match=match):  # the notebooks' parameters check says the same
        fluxnb.check_generation_request(kwargs["height"], kwargs["width"], kwargs["steps"], kwargs["guidance"],
                                        seed=kwargs["seed"])


@pytest.mark.parametrize("prompt, error, match", [
    (None, TypeError, r"prompt must be a string, not NoneType"),
    (["a cat", "a dog"], TypeError, r"prompt must be a string, not list.*call once per prompt"),
    ("   ", ValueError, r"prompt is empty: describe the image"),
])
def test_prompt_is_checked_by_every_function_that_takes_one(prompt, error, match, tmp_path):
    with pytest.raises(error, match=match):
        fluxnb.encode_prompt(NoPipe(), prompt)
    with pytest.raises(error, match=match):
        fluxnb.encode_and_save("not/loaded", prompt, torch.float32, tmp_path)  # before any model loads
    if prompt is not None:  # None there means "no prompt to check"
        with pytest.raises(error, match=match):
            fluxnb.check_generation_request(64, 64, 2, 3.5, prompt=prompt)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, 1000, 256.0])
def test_max_sequence_length_is_checked_before_loading(n, tmp_path):
    with pytest.raises(ValueError, match=rf"max_sequence_length={n!r} must be an integer from 1 to 512 "
                                         r"\(FLUX.1-dev: 512, FLUX.1-schnell: 256\)"):
        fluxnb.encode_and_save("not/loaded", "a cat", torch.float32, tmp_path, max_sequence_length=n)


# --- a size the GPU cannot hold, said before loading ------------------------------------------------


def test_the_estimates_agree_with_the_committed_course_runs():
    """03 at 1024x1024 passed in both envelopes (on the 8 GB card by streaming a few blocks); without
    streaming, the estimate is over that card, which is where 03 ran out of memory before streaming."""
    t4, card = fluxnb.committed_run("colab-t4"), fluxnb.committed_run("8gb-card")
    passed = {run["envelope"]["name"]: {n["notebook"][:2]: n["passed"] for n in run["notebooks"]} for run in (t4, card)}
    assert passed["colab-t4"]["03"] and passed["8gb-card"]["03"]
    assert errors.estimate_vram_gib("staged-nf4-fp16", 1024, 1024) < t4["envelope"]["vram_gib"]
    assert errors.estimate_vram_gib("staged-nf4-expandable", 1024, 1024) < card["envelope"]["vram_gib"]
    assert errors.estimate_vram_gib("staged-nf4-expandable", 1024, 1024, stream_blocks=False) > card["envelope"]["vram_gib"]
    peak_03 = next(n for n in card["notebooks"] if n["notebook"].startswith("03"))["vram_device_peak_gib"]
    assert peak_03 <= card["envelope"]["vram_gib"]


def test_a_size_the_gpu_cannot_hold_is_refused_before_loading(monkeypatch, tiny):  # tiny: built before the patch
    monkeypatch.setattr(fluxnb.environment, "machine_info", lambda: namedtuple("M", "vram_gib")(7.6))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # an RTX 30x0: bf16
    fluxnb.check_size_fits(1024, 1024, "black-forest-labs/FLUX.1-dev")  # fits: 03 streams a few blocks
    with pytest.raises(ValueError, match=r"2048x2048 needs about 10.6 GiB of VRAM with the staged-nf4-expandable "
                                         r"recipe .* this GPU has 7.6 GiB: try HEIGHT, WIDTH = \d+, \d+"):
        fluxnb.check_size_fits(2048, 2048, "black-forest-labs/FLUX.1-dev")
    h, w = errors.largest_size_that_fits("staged-nf4-expandable", 2048, 2048, 7.6)
    fluxnb.check_size_fits(h, w, "black-forest-labs/FLUX.1-dev")  # the suggested size passes
    with pytest.raises(ValueError, match=r"no size fits this recipe here"):  # loading NF4 whole needs ~7.3 GiB
        fluxnb.check_size_fits(1024, 1024, "black-forest-labs/FLUX.1-dev", vram_gib=6.0)
    fluxnb.check_size_fits(1024, 1024, "black-forest-labs/FLUX.1-dev", vram_gib=14.74)  # a T4 holds it
    with pytest.raises(ValueError, match=r"no size fits this recipe here: next, recipes/card_8gb_staged_nf4_bf16.py "
                                         r"\(staged NF4, bf16: notebooks 01-03\), estimated [\d.]+ GiB at 1024x1024"):
        fluxnb.check_size_fits(1024, 1024, "black-forest-labs/FLUX.1-dev", recipe="bf16-resident", vram_gib=14.74)
    fluxnb.check_size_fits(4096, 4096, tiny)  # the tiny stand-in is not FLUX's memory


def test_without_a_gpu_no_size_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fluxnb.check_size_fits(2048, 2048, "black-forest-labs/FLUX.1-dev")


# --- checkpoint ids and folders that do not exist ------------------------------------------------------


@pytest.mark.parametrize("folder", ["./no/such/flux", "/no/such/flux", "~/no-such-flux-folder"])
def test_a_folder_that_does_not_exist(folder):
    with pytest.raises(FileNotFoundError, match=r"There is no folder .*Check the path .*FLUXNB_CHECKPOINT=tiny"):
        fluxnb.check_checkpoint_access(folder)


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a FLUX checkpoint in diffusers' layout: it has no model_index.json"):
        fluxnb.check_checkpoint_access(str(tmp_path))


def test_a_malformed_hub_id():
    with pytest.raises(ValueError, match=r"'black forest/FLUX 1' is neither a folder here nor a Hub model id"):
        fluxnb.check_checkpoint_access("black forest/FLUX 1")


def test_a_hub_id_that_does_not_exist(monkeypatch, fake_hub):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    with pytest.raises(FileNotFoundError, match=r"The Hub has no model someone/flux-does-not-exist .*Check the spelling"):
        fluxnb.check_checkpoint_access("someone/flux-does-not-exist")


def test_a_hub_id_offline_and_not_cached(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # HF_HUB_OFFLINE=1 in the tests (conftest.py)
    with pytest.raises(ConnectionError, match=r"Offline \(HF_HUB_OFFLINE=1\) and someone/not-cached is not in the "
                                              r"Hugging Face cache .*FLUXNB_CHECKPOINT=tiny"):
        fluxnb.check_checkpoint_access("someone/not-cached")


# --- the Hub: tokens, licences, network ---------------------------------------------------------------


@pytest.fixture
def gpu_with_disk(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("U", "total used free")(500e9, 100e9, 400e9))


def test_a_bad_token_is_named_as_such_and_never_printed(monkeypatch, gpu_with_disk, fake_hub, capsys):
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(PermissionError, match=r"The Hugging Face token was refused \(invalid or revoked\).*settings/tokens") as info:
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")
    out = capsys.readouterr()
    assert BAD_TOKEN not in str(info.value) + out.out + out.err


def test_a_gated_repo_whose_licence_was_not_accepted(monkeypatch, gpu_with_disk, fake_hub):
    monkeypatch.setenv("HF_TOKEN", NO_LICENCE_TOKEN)
    with pytest.raises(PermissionError, match=rf"{GATED} is gated and this token has no access yet: .*accept the licence"):
        fluxnb.check_checkpoint_access(GATED)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    fluxnb.check_checkpoint_access(GATED)  # the same repo with a token that accepted it


# --- where the token goes, on each runtime ---------------------------------------------------------------

TOKEN_PLACES = {  # runtime -> what its messages must say, and what they must not (another runtime's place)
    "colab": (["on Colab, store it as a secret", "key icon in the left bar", "name HF_TOKEN", "Notebook access"],
              ["Kaggle", "hf auth login"]),
    "kaggle": (["on Kaggle, store it as a secret", "Add-ons -> Secrets", "label HF_TOKEN", "attached to this notebook",
                "Internet must be on", "Settings -> Internet", "phone-verified"], ["Colab", "hf auth login"]),
    "local": (["HF_TOKEN environment variable", "`hf auth login`"], ["Colab", "Kaggle"]),
}


def _says_where_the_token_goes(message: str, runtime: str) -> None:
    says, not_there = TOKEN_PLACES[runtime]
    assert all(s in message for s in says), f"{runtime}: {message}"
    assert not any(s in message for s in not_there), f"{runtime}: {message}"


@pytest.mark.parametrize("runtime", sorted(TOKEN_PLACES))
def test_a_gated_model_without_a_token_says_where_the_token_goes_here(monkeypatch, runtime):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fluxnb.environment, "runtime", lambda: runtime)
    monkeypatch.setattr(fluxnb.environment, "find_hub_token", lambda: None)
    with pytest.raises(PermissionError, match=rf"{GATED} is gated: accept its licence on https://huggingface.co/{GATED}, "
                                              r"make a read token on https://huggingface.co/settings/tokens, then") as info:
        fluxnb.check_checkpoint_access(GATED)
    _says_where_the_token_goes(str(info.value), runtime)
    assert "FLUX.1-schnell" in str(info.value)  # and the open model, for anyone without a token


@pytest.mark.parametrize("runtime", sorted(TOKEN_PLACES))
def test_a_refused_token_says_where_the_new_one_goes_here(monkeypatch, gpu_with_disk, fake_hub, capsys, runtime):
    monkeypatch.setattr(fluxnb.environment, "runtime", lambda: runtime)
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(PermissionError, match=r"The Hugging Face token was refused \(invalid or revoked\): make a new "
                                              r"read token on https://huggingface.co/settings/tokens and put it in place "
                                              r"of the old one: ") as info:
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")
    _says_where_the_token_goes(str(info.value), runtime)
    assert ("Runtime -> Restart session: Colab's secret is read once a session" in str(info.value)) is (runtime == "colab")
    out = capsys.readouterr()
    assert BAD_TOKEN not in str(info.value) + out.out + out.err


def test_a_kaggle_secret_unlocks_a_gated_model(monkeypatch, gpu_with_disk, fake_hub, kaggle):
    """The whole Kaggle path: no secret -> Kaggle's instructions; the secret attached -> the check passes."""
    with pytest.raises(PermissionError, match=r"Add-ons -> Secrets -> Add Secret, label HF_TOKEN"):
        fluxnb.check_checkpoint_access(GATED)
    kaggle.secrets["HF_TOKEN"] = GOOD_TOKEN
    fluxnb.check_checkpoint_access(GATED)


@pytest.mark.parametrize("runtime, says, not_there", [
    ("kaggle", "Choose a GPU: Settings -> Accelerator -> GPU T4 x2", "Change runtime type"),
    ("colab", "Choose a GPU: Runtime -> Change runtime type -> T4 GPU", "Kaggle"),
    ("local", "on Colab (Runtime -> Change runtime type -> T4 GPU", "Choose a GPU"),
])
def test_no_gpu_says_how_to_get_one_on_this_runtime(monkeypatch, runtime, says, not_there):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fluxnb.environment, "runtime", lambda: runtime)
    with pytest.raises(RuntimeError, match="No GPU in this runtime") as info:
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")
    assert says in str(info.value) and not_there not in str(info.value) and "FLUXNB_CHECKPOINT" in str(info.value)


def test_no_network_on_kaggle_says_turn_internet_on(monkeypatch, gpu_with_disk, fake_hub):
    import httpx
    from huggingface_hub import HfApi

    def unreachable(self, *args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "auth_check", unreachable)
    monkeypatch.setattr(fluxnb.environment, "runtime", lambda: "kaggle")
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    with pytest.raises(ConnectionError, match=r"cannot be reached \(ConnectError\) and someone/not-cached is not cached: "
                                              r"turn Internet on \(Settings -> Internet"):
        fluxnb.check_checkpoint_access("someone/not-cached")


def test_no_network(monkeypatch, gpu_with_disk):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    with pytest.raises(ConnectionError, match=r"The Hugging Face Hub cannot be reached \(ConnectError\) and "
                                              r"black-forest-labs/FLUX.1-schnell is not cached: check the internet"):
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")


def test_too_little_disk_after_access_is_granted(monkeypatch, fake_hub):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("U", "total used free")(100e9, 95e9, 5e9))
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    with pytest.raises(OSError, match=r"Downloading black-forest-labs/FLUX.1-schnell needs about 34 GB of disk .* 5.0 GB free"):
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")


# --- damaged files: embeddings, a quantized folder, images ------------------------------------------------


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_cut_off_embeddings_file_is_named_and_kept(tmp_path):
    path = fluxnb.save_embeddings({"prompt_embeds": torch.randn(1, 8, 64), "pooled_prompt_embeds": torch.randn(1, 64)},
                                  tmp_path, prompt="a cat", checkpoint="x")
    _cut(path)
    damaged = path.read_bytes()
    with pytest.raises(ValueError, match=r"The embeddings file .* is damaged \(it should be \d+ bytes long and is \d+: "
                                         r"it was cut off\): delete it and encode the prompt again"):
        fluxnb.load_embeddings(path, "cpu")
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"is damaged \(its header says \d+ bytes of table"):
        fluxnb.load_embeddings(path, "cpu")
    path.write_bytes(damaged)
    assert path.read_bytes() == damaged  # nothing the user made is deleted or rewritten


def test_a_cut_off_quantized_folder_stops_before_loading(tiny, tmp_path):
    fluxnb.load_transformer_4bit(tiny, torch.float32).save_pretrained(tmp_path / "nf4" / "transformer")
    weights = next((tmp_path / "nf4" / "transformer").glob("*.safetensors"))
    _cut(weights, keep=0.9)
    with pytest.raises(ValueError, match=r"The transformer in .*nf4/transformer/diffusion_pytorch_model.safetensors is "
                                         r"damaged \(.*cut off\): save or download it again \(nothing was deleted"):
        fluxnb.load_transformer_4bit(tiny, torch.float32, prequantized=str(tmp_path / "nf4"))
    (tmp_path / "nf4" / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        fluxnb.load_transformer_4bit(tiny, torch.float32, prequantized=str(tmp_path / "nf4"))
    assert weights.exists()


def test_a_damaged_checkpoint_folder_is_named_by_the_access_check(tiny, tmp_path):
    copy = shutil.copytree(tiny, tmp_path / "flux")
    _cut(next((copy / "vae").glob("*.safetensors")))
    with pytest.raises(ValueError, match=r"The vae of .*vae/diffusion_pytorch_model.safetensors is damaged"):
        fluxnb.check_checkpoint_access(str(copy))


def test_a_cut_off_image_is_named_and_the_folder_still_takes_new_images(tmp_path):
    first = fluxnb.save_image(Image.new("RGB", (64, 64), "red"), tmp_path, prompt="a cat", seed=0)
    image, settings = fluxnb.load_image_with_settings(first)
    assert settings == {"prompt": "a cat", "seed": "0"} and image.size == (64, 64)
    _cut(first, keep=0.6)
    damaged = first.read_bytes()
    with pytest.raises(ValueError, match=r"image-0001.png is not a complete PNG .*It was left as it is"):
        fluxnb.load_image_with_settings(first)
    second = fluxnb.save_image(Image.new("RGB", (64, 64), "blue"), tmp_path, prompt="a dog", seed=1)
    assert second.name == "image-0002.png" and first.read_bytes() == damaged


# --- embeddings from another checkpoint ----------------------------------------------------------------------


def test_embeddings_from_another_checkpoint_are_refused_before_denoising(denoiser):
    as_random_dev = {"prompt_embeds": torch.randn(1, 8, 4096), "pooled_prompt_embeds": torch.randn(1, 768)}
    with pytest.raises(ValueError, match=r"These embeddings were made by another checkpoint: prompt_embeds is 4096 wide "
                                         r"but this transformer expects 64 \(T5's width\)"):
        fluxnb.denoise(denoiser, as_random_dev, 64, 64, 2, 3.5, 0)
    with pytest.raises(ValueError, match=r"The embeddings have no pooled_prompt_embeds"):
        fluxnb.denoise(denoiser, {"prompt_embeds": torch.randn(1, 8, 64)}, 64, 64, 2, 3.5, 0)


def test_saved_embeddings_say_which_checkpoint_made_them(tmp_path):
    path = fluxnb.save_embeddings({"prompt_embeds": torch.randn(1, 8, 64), "pooled_prompt_embeds": torch.randn(1, 64)},
                                  tmp_path, prompt="a cat", checkpoint="/cache/tiny-flux.1-schnell")
    fluxnb.load_embeddings(path, "cpu", checkpoint="/cache/tiny-flux.1-schnell")
    with pytest.raises(ValueError, match=r"These embeddings were made by /cache/tiny-flux.1-schnell, not by "
                                         r"/cache/random-flux.1-dev: encode the prompt again"):
        fluxnb.load_embeddings(path, "cpu", checkpoint="/cache/random-flux.1-dev")


# --- prompts longer than CLIP's and T5's limits: one line ----------------------------------------------------


def _library_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "truncated" in r.getMessage() or "Token indices" in r.getMessage()]


def test_a_long_prompt_gives_one_line_not_the_librarys_wall_of_text(encoders, capsys, caplog):
    prompt = "a red fox in the snow at dawn, " * 25  # 775 characters: longer than CLIP's 77 and T5's 128 tokens here
    encoders.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=128)  # the library alone
    library = _library_warnings(caplog)
    assert len(library) == 4 and sum(map(len, library)) > 1000  # what a learner saw before
    caplog.clear()

    embeds = fluxnb.encode_prompt(encoders, prompt, max_sequence_length=128)
    assert _library_warnings(caplog) == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"Long prompt: CLIP reads 77 tokens: \d+ of the prompt's \d+ were cut; "
                                            r"T5 reads 128: \d+ of \d+ were cut\.", lines[0]), lines
    assert embeds["prompt_embeds"].shape[1] == 128

    fluxnb.encode_prompt(encoders, "a red fox", max_sequence_length=128)
    assert capsys.readouterr().out == ""  # a short prompt: nothing printed
    encoders.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=128)
    back = [m for m in _library_warnings(caplog) if "was truncated" in m]
    assert len(back) == 2  # silenced there only: diffusers' warnings are back (transformers' warns once only)


def test_clip_cut_but_t5_reads_all(encoders, capsys):
    prompt = "a red fox in the snow, " * 5  # more than CLIP's 77 tokens, fewer than T5's 512
    n_t5 = len(encoders.tokenizer_2(prompt).input_ids)
    fluxnb.encode_prompt(encoders, prompt, max_sequence_length=512)
    line = capsys.readouterr().out.strip()
    assert line.startswith("Long prompt: CLIP reads 77 tokens: ")
    assert line.endswith(f"; T5 read all {n_t5} (it carries most of the prompt's meaning).")


# --- CUDA out of memory, and NaN ---------------------------------------------------------------------------


def test_out_of_memory_names_the_memory_and_the_next_recipe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # memory_in_use(): no device to read here
    monkeypatch.setattr(fluxnb.environment, "bf16_supported", lambda: False)  # a T4
    with pytest.raises(fluxnb.NotEnoughVRAMError, match=r"CUDA ran out of memory during bf16-resident at 1024x1024 "
                       r"\(no CUDA device is visible to this process\)\. Next: recipes/t4_staged_nf4_fp16.py .*"
                       r"estimated 8.3 GiB at 1024x1024\. Restart the runtime") as info:
        with fluxnb.oom_advice(1024, 1024, recipe="bf16-resident", vram_gib=14.74):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)  # the original error is kept
    with pytest.raises(fluxnb.NotEnoughVRAMError, match=r"Next: recipes/model_cpu_offload.py .* at (\d+x\d+|a much smaller size) \(no recipe "
                                                        r"in the course's list fits 2048x2048 here\)"):
        with fluxnb.oom_advice(2048, 2048, recipe="staged-nf4-fp16", vram_gib=7.6):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_oom_advice_asks_capacity_what_next(monkeypatch):
    """One answer to "what should I try next?": the message says what fluxnb.capacity.next_recipe says."""
    monkeypatch.setattr(fluxnb.environment, "bf16_supported", lambda: True)
    monkeypatch.setattr(capacity, "next_recipe", lambda recipe, h, w, vram, bf16: f"asked for {recipe} {h}x{w} {vram} {bf16}")
    with pytest.raises(fluxnb.NotEnoughVRAMError, match=r"Next: asked for staged-nf4-fp16 512x512 7.6 True\."):
        with fluxnb.oom_advice(512, 512, recipe="staged-nf4-fp16", vram_gib=7.6):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_other_errors_pass_through_oom_advice_unchanged():
    with pytest.raises(KeyError):
        with fluxnb.oom_advice(512, 512, recipe="staged-nf4-fp16", vram_gib=7.6):
            raise KeyError("not memory")


def test_decode_refuses_a_size_other_than_the_denoised_one(denoiser):
    latents = torch.zeros(1, (64 // 16) * (48 // 16), 64)  # what denoise returns for 64x48
    with pytest.raises(ValueError, match=r"These latents hold 12 patches of 16x16 pixels but 64x64 needs 16: decode "
                                         r"with the height and width you denoised with"):
        fluxnb.decode(denoiser.vae, latents, 64, 64)
    with pytest.raises(ValueError, match=r"width=50 must be a positive multiple of 16"):
        fluxnb.decode(denoiser.vae, latents, 64, 50)
    assert fluxnb.decode(denoiser.vae, latents, 64, 48).size == (48, 64)
