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

from fluxnb.capacity import GIB
from fluxnb.envelopes import active_envelope

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
    envelope: str | None = None  # the small machine being rehearsed (``fluxnb.envelopes``), if any

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
    """Describe this machine: GPU, VRAM, compute capability, bf16, host RAM, free disk at ``path``.

    Inside an envelope (``python -m fluxnb.course --envelope``) VRAM and host RAM are the target's,
    so every check a notebook makes from this answers as it would on the small machine.
    """
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    envelope = active_envelope()
    vram = props.total_memory / GIB if props else None
    ram = psutil.virtual_memory().total / GIB
    if envelope is not None:
        vram = min(vram, envelope.vram_gib) if vram is not None else None
        ram = min(ram, envelope.ram_gib)
    return MachineInfo(
        on_colab=on_colab(),
        python=platform.python_version(),
        gpu_name=props.name if props else None,
        gpu_count=torch.cuda.device_count() if cuda else 0,
        vram_gib=round(vram, 2) if vram is not None else None,
        compute_capability=f"{props.major}.{props.minor}" if props else None,
        bf16_supported=bf16_supported(),
        ram_gib=round(ram, 2),
        free_disk_gib=round(shutil.disk_usage(path).free / GIB, 2),
        libraries=library_versions(),
        envelope=envelope.name if envelope else None,
    )


def bf16_supported() -> bool:
    """bf16 compute needs compute capability 8.0+ (Ampere). A T4 (7.5) has none; CPUs emulate it.

    Inside an envelope whose target has no bf16 (``colab-t4``) the answer is False on any GPU.
    """
    envelope = active_envelope()
    if envelope is not None and not envelope.bf16:
        return False
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(0) >= (8, 0)
    return False


def free_vram_gib() -> float | None:
    """VRAM free for this process now, in GiB (``torch.cuda.mem_get_info``); None without a GPU.

    Inside an envelope this is already the target's: the runner holds everything above the cap.
    """
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0] / GIB


def _cgroup_ram_left_bytes() -> int | None:
    """Bytes this process's cgroup v2 may still take (``memory.max`` - ``memory.current``), if limited."""
    try:
        line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines() if l.startswith("0::"))
        group = Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text())
    except (OSError, StopIteration, ValueError):
        return None  # no cgroup v2, or no memory limit: the machine's own RAM is the limit


def available_ram_gib() -> float:
    """Host RAM this process can still take, in GiB: the OS's *available* memory, or less if a
    cgroup limit (a container, Colab's VM, the course's envelope) leaves less."""
    available = psutil.virtual_memory().available
    left = _cgroup_ram_left_bytes()
    return (available if left is None else min(available, left)) / GIB


def missing_resources(vram_gib: float | None = None, ram_gib: float | None = None) -> str | None:
    """None if this machine has ``vram_gib`` of free VRAM and ``ram_gib`` of available host RAM now,
    else a sentence saying what is short (for a cell that runs a section only where it fits)."""
    short = []
    free = free_vram_gib()
    if vram_gib is not None and (free is None or free < vram_gib):
        have = "no GPU" if free is None else f"{free:.1f} GiB free"
        short.append(f"needs {vram_gib:.1f} GiB of free VRAM, this machine has {have}")
    ram = available_ram_gib()
    if ram_gib is not None and ram < ram_gib:
        short.append(f"needs {ram_gib:.1f} GiB of host RAM, {ram:.1f} GiB is available")
    return "; ".join(short) or None


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
            "Free some space, or point HF_HOME / FLUXNB_CACHE at a larger disk, then run it again."
        )


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
