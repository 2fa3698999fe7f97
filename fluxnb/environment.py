"""What this machine is, which dtype to compute in, and checks that fail early with a clear message.

Every check here runs before any model is loaded: a wrong image size or a missing token should cost
a second, not a 34 GB download followed by a traceback.

It also knows the notebook services the course runs on (:func:`runtime`: Colab, Kaggle, or your own
machine), where each keeps files (:func:`set_up_storage`, which every notebook's setup cell calls) and
where each keeps a Hugging Face token (:func:`find_hub_token`). Importing this module imports neither
PyTorch nor ``huggingface_hub``: the setup cell imports it before ``HF_HOME`` is fixed, and
``huggingface_hub`` reads ``HF_HOME`` once, when it is imported.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from fluxnb.capacity import GIB
from fluxnb.envelopes import active_envelope

if TYPE_CHECKING:
    import torch

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


COLAB, KAGGLE, LOCAL = "colab", "kaggle", "local"
KAGGLE_ENV_VAR = "KAGGLE_KERNEL_RUN_TYPE"  # the setup cell checks the same name, before fluxnb is installed
KAGGLE_WORKING = Path("/kaggle/working")  # Kaggle's working folder: kept as the notebook's output


def runtime() -> str:
    """Which service runs this kernel: ``"colab"``, ``"kaggle"`` or ``"local"`` (your machine, Binder, a server).

    Colab imports ``google.colab`` in its kernels and sets ``COLAB_RELEASE_TAG``; Kaggle sets
    ``KAGGLE_KERNEL_RUN_TYPE`` (``Interactive`` or ``Batch``) in its notebooks and scripts. These are the
    variables Kaggle's own client library checks (Kaggle/kagglehub, ``src/kagglehub/env.py``:
    ``is_in_colab_notebook``, ``is_in_kaggle_notebook``). Both are inherited by child processes, so the
    ``torchrun`` ranks of notebook 10 see the same runtime as the notebook.
    """
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return COLAB
    if KAGGLE_ENV_VAR in os.environ:
        return KAGGLE
    return LOCAL


def on_colab() -> bool:
    """True inside Google Colab (:func:`runtime`)."""
    return runtime() == COLAB


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
    import torch

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
    import torch

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
    import torch

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
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


# --- where files go: the Hugging Face cache, the outputs, Google Drive ------------------------------

DRIVE_MOUNT = Path("/content/drive")  # where the setup cell mounts Google Drive on Colab
DRIVE_FOLDER = "MyDrive/fluxnb"  # the course's folder on it: outputs/ and, where there is room, huggingface/
LARGEST_DOWNLOAD_GB = 34.0  # a whole FLUX.1 checkpoint (fluxnb.errors.DOWNLOAD_GB): the most a download check asks for
LARGEST_OUTPUT_GB = 7.0  # notebook 02's own NF4 transformer (6.7 GB), the largest file a notebook saves (03 reuses it)
DRIVE_DOWNLOADS_MIN_GB = LARGEST_DOWNLOAD_GB + LARGEST_OUTPUT_GB
"""Free space a Google Drive needs before the setup cell puts the Hugging Face cache on it too (a free
Drive has 15 GB, so it keeps only the outputs). Above the largest download a check asks for, so when a
download does not fit on Drive, the next run of the setup cell keeps the downloads on the machine's disk."""


def _hub_imported() -> bool:
    """Whether ``huggingface_hub`` is imported in this process: then its cache's place is fixed."""
    return "huggingface_hub" in sys.modules


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` keeps downloads: ``huggingface_hub.constants.HF_HUB_CACHE`` once it is
    imported (fixed then); before, computed from the variables it will read at import, the way it reads
    them: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, where ``HF_HOME`` defaults
    to ``$XDG_CACHE_HOME/huggingface`` and that to ``~/.cache/huggingface``. Imports nothing new."""
    if _hub_imported():
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    expand = lambda value: os.path.expandvars(os.path.expanduser(value))  # noqa: E731
    default_home = os.path.join(os.path.expanduser("~"), ".cache")
    home = expand(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", default_home), "huggingface")))
    return Path(expand(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))))


def output_dir(name: str = "") -> Path:
    """Where notebooks write what they make: ``$FLUXNB_OUTPUT``, plus ``name``. Its default is
    ``./outputs``; on Kaggle ``/kaggle/working/outputs``, which Kaggle keeps with the notebook's version."""
    default = KAGGLE_WORKING / "outputs" if runtime() == KAGGLE else Path("outputs")
    return Path(os.environ.get("FLUXNB_OUTPUT", default)).expanduser() / name


def _existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def _free_gb(path: str | os.PathLike[str]) -> float:
    return shutil.disk_usage(_existing(Path(path))).free / 1e9


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).expanduser().absolute().is_relative_to(folder)


def keeps_downloads_on_drive(drive_free_gb: float) -> bool:
    """Whether a Google Drive with ``drive_free_gb`` free takes the Hugging Face cache as well as the
    outputs (:data:`DRIVE_DOWNLOADS_MIN_GB`)."""
    return drive_free_gb >= DRIVE_DOWNLOADS_MIN_GB


def _where(path: Path) -> str:
    """Where ``path`` is, in a learner's words: whether it is kept, and how much room it has."""
    free = f"{_free_gb(path):.1f} GB free"
    if _inside(path, DRIVE_MOUNT):
        return f"on your Google Drive, kept after the runtime ends; {free}"
    if runtime() == KAGGLE:
        if _inside(path, KAGGLE_WORKING):
            # Kaggle's starter notebook: "You can write up to 20GB to the current directory (/kaggle/working/)
            # that gets preserved as output when you create a version using 'Save & Run All'"
            return f"kept with the notebook's saved version; {KAGGLE_WORKING} holds at most 20 GB"
        return f"scratch space, emptied when the session ends; {free}"
    if runtime() == COLAB:
        return f"this machine's disk, emptied when the runtime ends; {free}"
    return free


def _mount_google_drive() -> str:
    """Colab: mount Drive, send the outputs there, and the Hugging Face cache too where Drive has room."""
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(str(DRIVE_MOUNT))
    folder = DRIVE_MOUNT / DRIVE_FOLDER
    os.environ["FLUXNB_OUTPUT"] = str(folder / "outputs")
    free = _free_gb(DRIVE_MOUNT / "MyDrive")
    if "HF_HOME" in os.environ or "HF_HUB_CACHE" in os.environ:
        return f"Google Drive ({free:.1f} GB free) takes the outputs; the downloads go where HF_HOME / HF_HUB_CACHE say."
    if _hub_imported():  # it read HF_HOME when it was imported: too late to move the downloads
        return (f"Google Drive ({free:.1f} GB free) takes the outputs; the downloads stay on this machine's disk in this "
                "session (huggingface_hub was imported before this cell ran: Runtime -> Restart session, then run "
                "this cell first to move them).")
    if not keeps_downloads_on_drive(free):
        return (f"Google Drive has {free:.1f} GB free: it keeps the outputs, and the downloads stay on this machine's "
                f"disk (they are downloaded again in each notebook). Drive would take them too with "
                f"{DRIVE_DOWNLOADS_MIN_GB:.0f} GB free: the largest download is about {LARGEST_DOWNLOAD_GB:.0f} GB.")
    os.environ["HF_HOME"] = str(folder / "huggingface")
    return f"Google Drive has {free:.1f} GB free: it keeps the downloads and the outputs for the next notebook."


def set_up_storage(use_google_drive: bool = False) -> str:
    """Where this notebook keeps downloads and outputs, fixed for this runtime; says so in a few lines.

    Every notebook's setup cell calls it, before anything imports ``huggingface_hub`` (which reads
    ``HF_HOME`` once, at import). On Colab with ``use_google_drive``, it mounts Google Drive: the
    outputs (``FLUXNB_OUTPUT``) go to ``MyDrive/fluxnb/outputs``, and the Hugging Face cache (``HF_HOME``)
    to ``MyDrive/fluxnb/huggingface`` only where Drive has :data:`DRIVE_DOWNLOADS_MIN_GB` free; else it
    stays on the machine's disk. On Kaggle the outputs go to ``/kaggle/working/outputs`` (kept with the
    notebook's version) and the cache stays outside ``/kaggle/working``, in scratch space. Variables
    already set are kept.
    """
    where = runtime()
    notes = []
    if use_google_drive and where == COLAB:
        notes.append(_mount_google_drive())
    elif use_google_drive:
        notes.append("USE_GOOGLE_DRIVE is for Colab: here it changes nothing.")
    cache, outputs = hub_cache_dir(), output_dir().absolute()
    notes.append(f"Downloads: {cache} ({_where(cache)}).")
    notes.append(f"Outputs: {outputs} ({_where(outputs)}).")
    if where == KAGGLE and _inside(cache, KAGGLE_WORKING):
        notes.append(f"The downloads would fill the notebook's saved output: set HF_HOME outside {KAGGLE_WORKING} "
                     "(e.g. /kaggle/temp/huggingface), restart the session and run this cell first.")
    return "\n".join(notes)


def check_free_disk(path: str | os.PathLike[str], need_gb: float, what: str) -> None:
    """Raise ``OSError`` before a download or build that would not fit on the disk at ``path``; the
    message says what to do there (on Google Drive: what the setup cell does instead)."""
    target = Path(path)
    path = _existing(target)
    free_gb = _free_gb(path)
    if free_gb < need_gb:
        raise OSError(f"{what} needs about {need_gb:.0f} GB of disk but {path} has {free_gb:.1f} GB free. "
                      + _disk_advice(target, free_gb))


def _disk_advice(path: Path, free_gb: float) -> str:
    machine = f"this machine's disk ({_free_gb(Path.home()):.1f} GB free, emptied when the runtime ends)"
    if _inside(path, DRIVE_MOUNT / DRIVE_FOLDER / "huggingface") and not keeps_downloads_on_drive(free_gb):
        return ("That is your Google Drive. Runtime -> Restart session and run the notebook again from the top: with "
                f"less than {DRIVE_DOWNLOADS_MIN_GB:.0f} GB free on Drive the setup cell keeps the downloads on "
                f"{machine}, and only the outputs on Drive.")
    if _inside(path, DRIVE_MOUNT):
        return ("That is your Google Drive: free some space on it (drive.google.com -> Storage), or set "
                "USE_GOOGLE_DRIVE = False in the setup cell, Runtime -> Restart session and run the notebook again: "
                f"downloads and outputs then stay on {machine}.")
    if runtime() == KAGGLE:
        return (f"Free some space: on Kaggle the downloads and {KAGGLE_WORKING} share the session's disk, so delete "
                f"what earlier runs left in {KAGGLE_WORKING} or downloads this notebook does not use ({hub_cache_dir()}), "
                "then run this cell again.")
    return "Free some space, or point HF_HOME / FLUXNB_CACHE at a larger disk, then run it again."


def find_hub_token() -> str | None:
    """A Hugging Face token from ``HF_TOKEN``, an earlier login (``hf auth login``), Colab's secret
    ``HF_TOKEN``, or Kaggle's secret ``HF_TOKEN``; None if there is none. Never raises for a missing,
    unshared or unattached secret, and never prints the token (the notebooks print only whether one
    was found).

    A token read from a secret here is also put in this process's ``HF_TOKEN`` variable: huggingface_hub
    reads Colab's secret only in the notebook's own process and Kaggle's not at all, and the variable
    reaches the libraries' downloads and the ``torchrun`` ranks notebook 10 starts. The next call reads
    the secret again (a learner may have replaced a revoked token); an ``HF_TOKEN`` set by anyone else
    comes first.
    """
    global _token_from_secret
    from huggingface_hub import get_token

    if _token_from_secret is not None and os.environ.get("HF_TOKEN") == _token_from_secret:
        del os.environ["HF_TOKEN"]  # put there by an earlier call: the secret may have changed since
    _token_from_secret = None
    token = os.environ.get("HF_TOKEN") or get_token()
    if token:
        return token
    where = runtime()
    token = _colab_secret() if where == COLAB else _kaggle_secret() if where == KAGGLE else None
    if token:
        os.environ["HF_TOKEN"] = _token_from_secret = token
    return token


_token_from_secret: str | None = None  # what find_hub_token put in HF_TOKEN from a secret, if anything


def _colab_secret(label: str = "HF_TOKEN") -> str | None:
    from google.colab import userdata  # type: ignore[import-not-found]

    try:
        return userdata.get(label) or None
    except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
        return None  # no secret, or this notebook was not given access to it


def _kaggle_secret(label: str = "HF_TOKEN") -> str | None:
    """Kaggle's secret ``label``, read with Kaggle's own client (``kaggle_secrets``, in every Kaggle image:
    Kaggle/docker-python, ``patches/kaggle_secrets.py``). Its ``get_secret`` raises ``BackendError`` for a
    label with no secret attached to this notebook, ``CredentialError`` when the notebook has no secrets
    access, ``ConnectionError`` without Internet: each is "no token" here."""
    try:
        import kaggle_secrets  # type: ignore[import-not-found]
    except ImportError:
        return None
    refused = tuple(error for error in (getattr(kaggle_secrets, name, None) for name in
                                        ("BackendError", "CredentialError", "ValidationError"))
                    if isinstance(error, type) and issubclass(error, Exception))
    try:
        return kaggle_secrets.UserSecretsClient().get_secret(label) or None
    except (*refused, ConnectionError):
        return None
