import os
import shutil
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import fluxnb
from fluxnb import environment, errors
from tests.conftest import unset


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


# --- runtimes: Colab, Kaggle, this machine -------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_runtime_is_named_from_what_colab_and_kaggle_set(monkeypatch):
    unset(monkeypatch, "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert environment.runtime() == "local" and not environment.on_colab()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")  # a "Save & Run All" version
    assert environment.runtime() == "kaggle" and not environment.on_colab()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261201-060000_RC00")
    assert environment.runtime() == "colab" and environment.on_colab()


def test_importing_the_environment_imports_neither_torch_nor_huggingface_hub():
    """The setup cell imports fluxnb.environment before the Hugging Face cache's place is fixed, and
    before the parameters cell sets PyTorch's allocator options."""
    code = "import sys, fluxnb.environment; print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("variables", [
    {},
    {"HF_HOME": "~/elsewhere/hf"},
    {"XDG_CACHE_HOME": "/tmp/xdg-cache"},
    {"HF_HOME": "/tmp/hf-home", "HUGGINGFACE_HUB_CACHE": "/tmp/legacy-hub"},
    {"HF_HOME": "/tmp/hf-home", "HF_HUB_CACHE": "$FLUXNB_TEST_ROOT/hub", "FLUXNB_TEST_ROOT": "/tmp/root"},
])
def test_the_hub_cache_is_found_before_huggingface_hub_is_imported_as_it_will_read_it(variables):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
    code = ("import fluxnb.environment as e; before = str(e.hub_cache_dir()); "
            "from huggingface_hub import constants; print(before == constants.HF_HUB_CACHE, before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**env, **variables, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True "), out.stdout


def test_a_kaggle_secret_is_found_and_reaches_child_processes_never_printed(kaggle, capsys):
    kaggle.secrets["HF_TOKEN"] = "hf_kaggle_secret_value"
    assert fluxnb.find_hub_token() == "hf_kaggle_secret_value"
    assert kaggle.asked == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == "hf_kaggle_secret_value"  # for the libraries and notebook 10's torchrun ranks
    out = capsys.readouterr()
    assert "hf_kaggle_secret_value" not in out.out + out.err


def test_a_missing_or_unreachable_kaggle_secret_is_no_token_not_an_error(kaggle, monkeypatch):
    kaggle.secrets["WANDB_API_KEY"] = "another secret"  # attached, but not the one asked for
    assert fluxnb.find_hub_token() is None  # the client raised BackendError: no such secret attached
    kaggle.online = False
    assert fluxnb.find_hub_token() is None  # ConnectionError: Internet is off
    monkeypatch.delenv("KAGGLE_USER_SECRETS_TOKEN")
    assert fluxnb.find_hub_token() is None  # CredentialError: this session has no access to secrets
    assert kaggle.asked == ["HF_TOKEN", "HF_TOKEN"] and "HF_TOKEN" not in os.environ


def test_a_replaced_kaggle_secret_is_read_again(kaggle):
    """After "the token was refused", the learner replaces the secret and runs the cell again: the token
    put in HF_TOKEN from the old secret must not hide the new one."""
    kaggle.secrets["HF_TOKEN"] = "hf_revoked"
    assert fluxnb.find_hub_token() == "hf_revoked"
    kaggle.secrets["HF_TOKEN"] = "hf_new"
    assert fluxnb.find_hub_token() == "hf_new" and os.environ["HF_TOKEN"] == "hf_new"
    del kaggle.secrets["HF_TOKEN"]  # detached from the notebook
    assert fluxnb.find_hub_token() is None and "HF_TOKEN" not in os.environ


def test_hf_token_in_the_environment_wins_over_the_kaggle_secret(kaggle, monkeypatch):
    kaggle.secrets["HF_TOKEN"] = "hf_kaggle_secret_value"
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert fluxnb.find_hub_token() == "hf_from_the_environment" and kaggle.asked == []
    monkeypatch.delenv("HF_TOKEN")
    assert fluxnb.find_hub_token() == "hf_kaggle_secret_value" and kaggle.asked == ["HF_TOKEN"]


def test_on_kaggle_outputs_go_to_kaggle_working_and_downloads_stay_in_scratch(kaggle, monkeypatch, tmp_path):
    unset(monkeypatch, "FLUXNB_OUTPUT")
    monkeypatch.setattr(environment, "_hub_imported", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "root" / ".cache" / "huggingface"))
    monkeypatch.chdir(tmp_path)  # wherever the kernel started, the outputs are Kaggle's kept ones
    assert fluxnb.output_dir("images") == kaggle.working / "outputs" / "images"
    said = environment.set_up_storage()
    assert f"Outputs: {kaggle.working / 'outputs'} (kept with the notebook's saved version" in said
    assert f"Downloads: {tmp_path / 'root/.cache/huggingface/hub'} (scratch space, emptied when the session ends" in said
    assert "would fill" not in said
    monkeypatch.setenv("HF_HOME", str(kaggle.working / "huggingface"))  # a cache inside the kept output is named
    assert "The downloads would fill the notebook's saved output: set HF_HOME outside" in environment.set_up_storage()


@pytest.fixture
def colab(monkeypatch, tmp_path):
    """This process as a Colab notebook: ``google.colab`` (its ``drive.mount`` makes ``MyDrive`` under a temp
    folder standing for ``/content/drive``), huggingface_hub not imported yet, no variables set. ``free``
    sets the free GB that ``shutil.disk_usage`` reports for Drive and for this machine's disk."""
    mount = tmp_path / "content" / "drive"
    drive = types.SimpleNamespace(mounted=[], mount=lambda where: (drive.mounted.append(where),
                                                                   Path(where, "MyDrive").mkdir(parents=True, exist_ok=True)))
    package = types.ModuleType("google.colab")
    package.drive = drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", package)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    unset(monkeypatch, "KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
          "FLUXNB_OUTPUT")
    monkeypatch.setattr(environment, "DRIVE_MOUNT", mount)
    monkeypatch.setattr(environment, "_hub_imported", lambda: False)
    free = {"drive": 15e9, "machine": 80e9}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(
        100e9, 0, free["drive" if Path(path).is_relative_to(mount) else "machine"]))
    return types.SimpleNamespace(drive=drive, mount=mount, free=free)


def test_a_free_drive_keeps_the_outputs_and_the_downloads_stay_on_the_machine(colab):
    colab.free["drive"] = 12.4e9  # a free 15 GB Drive with mail and photos on it
    said = environment.set_up_storage(use_google_drive=True)
    assert colab.drive.mounted == [str(colab.mount)]
    assert os.environ["FLUXNB_OUTPUT"] == str(colab.mount / "MyDrive/fluxnb/outputs") and "HF_HOME" not in os.environ
    assert fluxnb.output_dir() == colab.mount / "MyDrive/fluxnb/outputs"
    assert "Google Drive has 12.4 GB free: it keeps the outputs, and the downloads stay on this machine's disk" in said
    assert "Downloads: " in said and "(this machine's disk, emptied when the runtime ends; 80.0 GB free)" in said
    assert f"Outputs: {colab.mount / 'MyDrive/fluxnb/outputs'} (on your Google Drive, kept" in said


def test_a_drive_with_room_for_the_largest_download_keeps_the_downloads_too(colab):
    colab.free["drive"] = environment.DRIVE_DOWNLOADS_MIN_GB * 1e9
    said = environment.set_up_storage(use_google_drive=True)
    assert os.environ["HF_HOME"] == str(colab.mount / "MyDrive/fluxnb/huggingface")
    assert environment.hub_cache_dir() == colab.mount / "MyDrive/fluxnb/huggingface/hub"
    assert "it keeps the downloads and the outputs for the next notebook" in said


def test_the_downloads_are_not_moved_once_huggingface_hub_is_imported(colab, monkeypatch):
    colab.free["drive"] = 200e9
    monkeypatch.setattr(environment, "_hub_imported", lambda: True)
    said = environment.set_up_storage(use_google_drive=True)
    assert "HF_HOME" not in os.environ and "Runtime -> Restart session, then run this cell first" in said


def test_without_drive_or_off_colab_nothing_is_mounted(colab, monkeypatch):
    assert "Google Drive" not in environment.set_up_storage() and colab.drive.mounted == []
    monkeypatch.delitem(sys.modules, "google.colab")
    assert environment.set_up_storage(use_google_drive=True).startswith("USE_GOOGLE_DRIVE is for Colab")
    assert colab.drive.mounted == [] and "FLUXNB_OUTPUT" not in os.environ


def test_a_download_too_big_for_drive_says_what_the_setup_cell_does_instead(colab):
    """Drive took the downloads (it had room), then filled up: the check names the way out, and that way
    works: run again, the setup cell keeps the downloads on the machine's disk."""
    colab.free["drive"] = 50e9
    environment.set_up_storage(use_google_drive=True)
    colab.free["drive"] = 9.5e9
    with pytest.raises(OSError, match=r"Downloading black-forest-labs/FLUX.1-dev needs about 34 GB of disk but "
                                      r".*drive.* has 9.5 GB free. That is your Google Drive. Runtime -> Restart "
                                      r"session and run the notebook again from the top: with less than 41 GB free "
                                      r"on Drive the setup cell keeps the downloads on this machine's disk \(80.0 GB free"):
        fluxnb.check_free_disk(environment.hub_cache_dir(), errors.DOWNLOAD_GB["dev"], "Downloading black-forest-labs/FLUX.1-dev")
    del os.environ["HF_HOME"]  # Runtime -> Restart session: a fresh kernel
    environment.set_up_storage(use_google_drive=True)
    assert "HF_HOME" not in os.environ and not environment.hub_cache_dir().is_relative_to(colab.mount)
    fluxnb.check_free_disk(environment.hub_cache_dir(), errors.DOWNLOAD_GB["dev"], "Downloading black-forest-labs/FLUX.1-dev")


def test_an_output_too_big_for_drive_says_what_to_set(colab):
    colab.free["drive"] = 3.2e9
    environment.set_up_storage(use_google_drive=True)
    with pytest.raises(OSError, match=r"Saving the NF4 transformer needs about 7 GB .* has 3.2 GB free. That is your "
                                      r"Google Drive: free some space on it .*or set USE_GOOGLE_DRIVE = False in the "
                                      r"setup cell, Runtime -> Restart session"):
        fluxnb.check_free_disk(fluxnb.output_dir().resolve(), 6.7, what="Saving the NF4 transformer")


def test_drive_takes_the_downloads_only_with_room_for_the_largest_download_check_and_output():
    """The restart advice above holds because no download check asks for more than Drive's threshold."""
    assert max(errors.DOWNLOAD_GB.values()) <= environment.LARGEST_DOWNLOAD_GB
    assert environment.DRIVE_DOWNLOADS_MIN_GB > 15  # a free Drive (15 GB) never takes the downloads
    assert not environment.keeps_downloads_on_drive(15.0) and environment.keeps_downloads_on_drive(41.0)
