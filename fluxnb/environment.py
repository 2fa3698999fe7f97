"""What this machine is, which dtype to compute in, and checks that fail early with a clear message.

Every check here runs before any model is loaded: a wrong image size or a missing token should cost
a second, not a 34 GB download followed by a traceback.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch

GIB = 1024**3
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "huggingface_hub")


@dataclass
class MachineInfo:
    """A snapshot of the machine, as the notebooks print it in 00_setup."""

    on_colab: bool
    python: str
    gpu_name: str | None
    gpu_count: int
    vram_gib: float | None
    compute_capability: str | None
    bf16_supported: bool
    ram_gib: float
    free_disk_gib: float
    libraries: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def on_colab() -> bool:
    """True inside Google Colab (its kernel sets ``COLAB_RELEASE_TAG`` / ``COLAB_GPU``)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the course depends on ("missing" if absent)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def machine_info(path: str | os.PathLike[str] = ".") -> MachineInfo:
    """Describe this machine: GPU, VRAM, compute capability, bf16, host RAM, free disk at ``path``."""
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return MachineInfo(
        on_colab=on_colab(),
        python=platform.python_version(),
        gpu_name=props.name if props else None,
        gpu_count=torch.cuda.device_count() if cuda else 0,
        vram_gib=round(props.total_memory / GIB, 2) if props else None,
        compute_capability=f"{props.major}.{props.minor}" if props else None,
        bf16_supported=bf16_supported(),
        ram_gib=round(psutil.virtual_memory().total / GIB, 2),
        free_disk_gib=round(shutil.disk_usage(path).free / GIB, 2),
        libraries=library_versions(),
    )


def bf16_supported() -> bool:
    """bf16 compute needs compute capability 8.0+ (Ampere). A T4 (7.5) has none; CPUs emulate it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(0) >= (8, 0)
    return False


def pick_dtype() -> torch.dtype:
    """The dtype to compute in: bf16 where the GPU supports it, else fp16 (as on a T4).

    On a CPU (the tiny course) fp32: CPU half-precision kernels are slow and some are missing.
    """
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


def check_free_disk(path: str | os.PathLike[str], need_gb: float, what: str) -> None:
    """Raise ``OSError`` before a download or build that would not fit on the disk at ``path``."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 1e9
    if free_gb < need_gb:
        raise OSError(
            f"{what} needs about {need_gb:.0f} GB of disk but {path} has {free_gb:.1f} GB free. "
            "Free some space, or point HF_HOME / FLUXNB_CACHE at a larger disk, then run this cell again."
        )


def check_generation_request(height: int, width: int, steps: int, guidance: float | None = None) -> None:
    """Raise ``ValueError`` for settings FLUX cannot use, with the nearest ones it can.

    FLUX packs 2x2 latent patches and the VAE downsamples 8x, so sides must be multiples of 16.
    """
    for side, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % 16:
            nearest = max(16, round(value / 16) * 16) if isinstance(value, (int, float)) else 1024
            raise ValueError(f"{side}={value!r} must be a positive multiple of 16 (FLUX packs 2x2 patches of "
                             f"8x-downsampled latents); try {side}={nearest}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps={steps!r} must be an integer >= 1 "
                         "(FLUX.1-dev: about 28-50, FLUX.1-schnell: 4).")
    if guidance is not None and guidance < 0:
        raise ValueError(f"guidance_scale={guidance!r} must be >= 0 (dev: 3.5, schnell: 0).")


# Hub repos that need an accepted licence and a token. FLUX.1-schnell is Apache-2.0 and open.
GATED_PREFIXES = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Fill-dev",
                  "black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.1-Krea-dev")
DOWNLOAD_GB = {"dev": 34.0, "schnell": 34.0}


def find_hub_token() -> str | None:
    """A Hugging Face token from ``HF_TOKEN``, an earlier ``login()``, or Colab's secret ``HF_TOKEN``.

    Returns None if there is none. The notebooks print only whether one was found, never the token.
    """
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if token or not on_colab():
        return token
    from google.colab import userdata  # type: ignore[import-not-found]

    try:
        return userdata.get("HF_TOKEN")
    except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
        return None  # no secret, or this notebook was not given access to it


def output_dir(name: str = "") -> Path:
    """Where notebooks write what they make: ``$FLUXNB_OUTPUT`` (default ``./outputs``), plus ``name``."""
    return Path(os.environ.get("FLUXNB_OUTPUT", "outputs")).expanduser() / name


def check_checkpoint_access(checkpoint: str) -> None:
    """Before any download: a gated repo needs a token, and the download needs disk.

    A local folder (the stand-ins, a saved model) passes. For a Hub id, raise ``PermissionError`` if
    the repo is gated and no token is configured, ``OSError`` if the Hugging Face cache's disk is too
    small for a download that is not cached yet.
    """
    if Path(checkpoint).is_dir():
        return
    from huggingface_hub import constants, get_token, try_to_load_from_cache


    if checkpoint.startswith(GATED_PREFIXES) and not (os.environ.get("HF_TOKEN") or get_token()):
        raise PermissionError(
            f"{checkpoint} is gated: accept its licence on https://huggingface.co/{checkpoint}, then add a "
            "read token as the Colab secret HF_TOKEN (or run huggingface_hub.login()). No token? Use "
            "MODEL_ID = 'black-forest-labs/FLUX.1-schnell', which is open."
        )
    cached = try_to_load_from_cache(checkpoint, "model_index.json")
    if not isinstance(cached, str):
        need = DOWNLOAD_GB["schnell" if "schnell" in checkpoint.lower() else "dev"]
        check_free_disk(constants.HF_HUB_CACHE, need, what=f"Downloading {checkpoint}")
