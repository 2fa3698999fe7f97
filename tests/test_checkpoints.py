import hashlib
import json
import os

import pytest
import torch

import fluxnb
from fluxnb import checkpoints


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unset_variable_keeps_the_real_model_id(monkeypatch):
    monkeypatch.delenv("FLUXNB_CHECKPOINT", raising=False)
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "  ")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-schnell") == "black-forest-labs/FLUX.1-schnell"


def test_other_values_are_a_hub_id_or_path(monkeypatch):
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "/models/my-flux")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev") == "/models/my-flux"


def test_random_values_build_the_named_variant(monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoints, "build_random", lambda variant: calls.append(variant) or f"/r/{variant}")
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "random-schnell")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev") == "/r/schnell"
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "random-dev")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-schnell") == "/r/dev"
    assert calls == ["schnell", "dev"]


def test_tiny_follows_the_notebooks_variant(monkeypatch, fresh_cache):
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "tiny")
    dev = fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev")
    schnell = fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-schnell")
    assert dev.endswith("tiny-flux.1-dev") and schnell.endswith("tiny-flux.1-schnell")
    assert json.loads((fresh_cache / "tiny-flux.1-dev/transformer/config.json").read_text())["guidance_embeds"]
    assert not json.loads((fresh_cache / "tiny-flux.1-schnell/transformer/config.json").read_text())["guidance_embeds"]
    assert json.loads((fresh_cache / "tiny-flux.1-schnell/scheduler/scheduler_config.json").read_text())["shift"] == 1.0
    assert fluxnb.is_stand_in(dev) == "tiny" and fluxnb.is_stand_in(fresh_cache) is None


def test_tiny_is_deterministic(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "a"))
    first = fluxnb.build_tiny("dev")
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "b"))
    second = fluxnb.build_tiny("dev")
    assert first != second and _digest(first) == _digest(second)


def test_tiny_is_built_once_and_an_interrupted_build_is_replaced(fresh_cache):
    partial = fresh_cache / "tiny-flux.1-dev.partial"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("left by a crash")
    path = fluxnb.build_tiny("dev")
    assert not partial.exists() and (path / "model_index.json").is_file()
    stamp = (path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert fluxnb.build_tiny("dev") == path
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_loads_offline_with_real_classes(fresh_cache):
    from diffusers import FluxPipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = FluxPipeline.from_pretrained(fluxnb.build_tiny("dev"))
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.vae_scale_factor == 8  # as FLUX.1's VAE: sizes must be multiples of 16
    ids = pipe.tokenizer_2("a cat", return_tensors="pt").input_ids
    assert ids[0, -1].item() == pipe.tokenizer_2.eos_token_id
    assert int(ids.max()) < pipe.text_encoder_2.config.vocab_size
    # every Linear that bitsandbytes will quantize has widths that its 4-bit CPU kernels accept
    for model in (pipe.transformer, pipe.text_encoder_2):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


def test_full_size_configs_have_flux_dev_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in checkpoints._make_part(name, "dev", tiny=False).parameters())
                  for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    assert counts == {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656,
                      "text_encoder": 123_060_480, "vae": 83_819_683}


def test_random_build_checks_disk_first(monkeypatch, fresh_cache):
    def no_room(path, need_gb, what):
        raise OSError(f"{what} needs about {need_gb:.0f} GB")

    monkeypatch.setattr(checkpoints, "check_free_disk", no_room)
    with pytest.raises(OSError, match="the random FLUX.1-dev stand-in needs about 36 GB"):
        fluxnb.build_random("dev", device="cpu")
    assert not any(fresh_cache.iterdir())


def test_unknown_variant_is_refused(fresh_cache):
    with pytest.raises(ValueError, match="variant must be 'dev' or 'schnell'"):
        fluxnb.build_tiny("pro")


def test_an_explicit_choice_overrides_the_variable(monkeypatch):
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "tiny")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev", choice="/models/mine") == "/models/mine"
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev", choice="") == "black-forest-labs/FLUX.1-dev"
