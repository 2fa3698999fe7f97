import pytest
import torch
from PIL import Image

import fluxnb
from fluxnb import stages


@pytest.fixture(scope="module")
def tiny():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny("dev"))


def test_embeddings_round_trip_with_their_settings(tmp_path):
    embeds = {"prompt_embeds": torch.randn(1, 8, 64), "pooled_prompt_embeds": torch.randn(1, 64)}
    path = fluxnb.save_embeddings(embeds, tmp_path, prompt="A red fox!", max_sequence_length=8)
    assert path.name.startswith("a-red-fox-") and path == fluxnb.embeddings_path(tmp_path, prompt="A red fox!", max_sequence_length=8)
    tensors, meta = fluxnb.load_embeddings(path, device="cpu")
    assert meta == {"prompt": "A red fox!", "max_sequence_length": "8"}
    assert all(torch.equal(tensors[k], embeds[k]) for k in embeds)


def test_other_settings_never_overwrite_saved_embeddings(tmp_path):
    a = fluxnb.save_embeddings({"x": torch.zeros(2)}, tmp_path, prompt="cat", max_sequence_length=512)
    b = fluxnb.save_embeddings({"x": torch.ones(2)}, tmp_path, prompt="cat", max_sequence_length=256)
    assert a != b
    assert torch.equal(fluxnb.load_embeddings(a, "cpu")[0]["x"], torch.zeros(2))


def test_images_are_numbered_never_overwritten_and_carry_settings(tmp_path):
    (tmp_path / "image-0001.png").write_bytes(b"the user's own file")
    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    first = fluxnb.save_image(red, tmp_path, prompt="a cat", seed=0, steps=4)
    second = fluxnb.save_image(blue, tmp_path, prompt="a cat", seed=1, steps=4)
    assert (tmp_path / "image-0001.png").read_bytes() == b"the user's own file"
    assert first.name == "image-0002.png" and second.name == "image-0003.png"
    assert Image.open(first).text == {"prompt": "a cat", "seed": "0", "steps": "4"}
    assert Image.open(second).getpixel((0, 0)) == (0, 0, 255)


def test_bad_size_fails_before_any_model_runs():
    class NoPipe:
        def __getattr__(self, name):
            raise AssertionError("the pipeline was touched before the request was checked")

    with pytest.raises(ValueError, match="multiple of 16"):
        fluxnb.denoise(NoPipe(), {}, 1000, 1024, 4, 3.5, 0)


def test_staged_flow_end_to_end_on_tiny(tiny, tmp_path):
    path = fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path, max_sequence_length=64)
    again = fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path, max_sequence_length=64)
    assert again == path  # found, not recomputed
    embeds, meta = fluxnb.load_embeddings(path, "cpu")
    assert meta["prompt"] == "a cat" and embeds["prompt_embeds"].shape == (1, 64, 64)
    assert meta["prequantized"] == "None"  # T5 quantized while loading: keyed apart from a pre-quantized one
    pipe = fluxnb.load_denoising_pipeline(tiny, fluxnb.load_transformer_4bit(tiny, torch.float32), torch.float32)
    timer = fluxnb.StepTimer()
    latents = fluxnb.denoise(pipe, embeds, 128, 64, 3, 3.5, seed=0, step_timer=timer)
    assert latents.shape == (1, (128 // 16) * (64 // 16), 64) and len(timer.step_seconds) == 3
    same = fluxnb.denoise(pipe, embeds, 128, 64, 3, 3.5, seed=0)
    assert torch.equal(latents, same)  # a seed gives the same result
    image = fluxnb.decode(pipe.vae, latents, 128, 64)
    assert image.size == (64, 128)


def test_nan_latents_stop_with_an_explanation(tiny):
    embeds = {"prompt_embeds": torch.randn(1, 16, 64), "pooled_prompt_embeds": torch.randn(1, 64)}
    pipe = fluxnb.load_denoising_pipeline(tiny, fluxnb.load_transformer_4bit(tiny, torch.float32), torch.float32)
    with torch.no_grad():
        pipe.transformer.proj_out.bias.fill_(float("nan"))  # what an fp16 overflow does to the output
    with pytest.raises(stages.NonFiniteLatentsError, match="NaN/inf .* T5 overflows, so on GPUs without bf16 .* encode in float32 .*notebook 03, 'fp16 on a T4'"):
        fluxnb.denoise(pipe, embeds, 64, 64, 2, 3.5, 0)
