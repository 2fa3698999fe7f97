import shutil
from collections import namedtuple

import pytest
import torch

import fluxnb
from fluxnb import environment


def test_dtype_is_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fluxnb.pick_dtype() is torch.float32


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fluxnb.pick_dtype() is expected  # a T4 (7.5) has no bf16


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=1000, width=1024, steps=50), "height=1000 must be a positive multiple of 16.*try height=992"),
    (dict(height=1024, width=1030, steps=50), "width=1030 .*try width=1024"),
    (dict(height=0, width=1024, steps=50), "height=0"),
    (dict(height=1024, width=1024, steps=0), "num_inference_steps=0 must be an integer >= 1"),
    (dict(height=1024, width=1024, steps=4, guidance=-1.0), "guidance_scale=-1.0"),
])
def test_bad_generation_requests_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fluxnb.check_generation_request(**kwargs)


def test_good_generation_request_passes():
    fluxnb.check_generation_request(768, 1360, 4, 0.0)


Usage = namedtuple("Usage", "total used free")


def test_too_little_disk_is_caught_before_a_download(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100e9, 90e9, 10e9))
    with pytest.raises(OSError, match="needs about 34 GB of disk but .* has 10.0 GB free. Free some space"):
        fluxnb.check_free_disk(tmp_path / "not" / "yet", 34, what="Downloading X")


@pytest.fixture
def gpu(monkeypatch):
    """The Hub checks below are about a GPU machine: a CPU-only one stops before them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_cpu_runtime_stops_before_the_real_model_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_not_a_real_token")
    with pytest.raises(RuntimeError, match="No GPU in this runtime.*Change runtime type -> T4 GPU.*FLUXNB_CHECKPOINT"):
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")


def test_gated_model_without_token_is_refused(monkeypatch, gpu):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PermissionError, match="is gated: accept its licence.*HF_TOKEN.*FLUX.1-schnell"):
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-dev")


def test_open_model_needs_no_token_but_needs_disk(monkeypatch, gpu, fake_hub):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100e9, 95e9, 5e9))
    with pytest.raises(OSError, match="Downloading black-forest-labs/FLUX.1-schnell needs about 34 GB"):
        fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-schnell")


def test_gated_model_with_token_and_disk_passes(monkeypatch, gpu, fake_hub):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_good")  # the token the fake Hub accepts for the gated repo
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(500e9, 100e9, 400e9))
    fluxnb.check_checkpoint_access("black-forest-labs/FLUX.1-dev")


def test_local_folder_passes_without_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    fluxnb.check_checkpoint_access(str(fluxnb.build_tiny("dev")))


def test_machine_info_on_this_machine():
    info = fluxnb.machine_info()
    assert info.ram_gib > 0 and info.free_disk_gib > 0
    assert set(info.libraries) == set(environment.LIBRARIES)
    if not torch.cuda.is_available():
        assert info.gpu_name is None and info.vram_gib is None and info.gpu_count == 0


def test_find_hub_token_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert fluxnb.find_hub_token() == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr(environment, "on_colab", lambda: False)
    assert fluxnb.find_hub_token() is None


def test_output_dir_follows_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_OUTPUT", str(tmp_path))
    assert fluxnb.output_dir("images") == tmp_path / "images"
