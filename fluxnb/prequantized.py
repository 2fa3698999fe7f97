"""Pre-quantized NF4 weights: download about 13 GB instead of 34, and quantize nothing on a fresh VM.

Every Colab notebook starts on a fresh machine, so loading FLUX.1-dev's original bf16 T5 (9.5 GB) and
transformer (23.8 GB) to quantize them while loading costs the full download in every notebook. The
Hub repo ``hf-internal-testing/flux.1-dev-nf4-pkg`` (the one diffusers' docs use) holds both already
in NF4, saved by ``save_pretrained`` in the pipeline's layout:

* ``text_encoder_2/``: a transformers ``T5EncoderModel`` in bitsandbytes NF4 (6.3 GB: transformers
  keeps T5's ``wo`` layers unquantized, in fp32 when loading in fp16);
* ``transformer/``: a diffusers ``FluxTransformer2DModel`` in bitsandbytes NF4 (6.7 GB).

Their ``config.json`` carry ``quantization_config``, so ``from_pretrained(repo, subfolder=...)`` loads
them as saved (see :func:`fluxnb.stages.load_text_encoders_4bit` and
:func:`fluxnb.stages.load_transformer_4bit`, argument ``prequantized``). CLIP, the VAE, the tokenizers
and the scheduler still come from the original repo. Quantizing the original yourself stays taught
in notebooks 01 and 02.

FLUX.1-schnell has no such package from the diffusers/Hugging Face maintainers (only personal
uploads), so :data:`PREQUANTIZED_REPOS` has none for it and the notebooks quantize schnell while
loading, as before.

The stand-ins (``FLUXNB_CHECKPOINT=tiny``, ``random-dev``, ``random-schnell``) get a package of their
own in the same layout, exported once into the fluxnb cache by :func:`export_prequantized`, so the
notebooks run the same loading code on them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxnb.checkpoints import ENV_VAR, STAND_INS, cache_dir, resolve_checkpoint, variant_of
from fluxnb.environment import check_free_disk
from fluxnb.memory import flush
from fluxnb.quiet import no_progress_bars

PREQUANTIZED_REPOS: dict[str, str] = {"dev": "hf-internal-testing/flux.1-dev-nf4-pkg"}
"""Hub repos with FLUX.1's T5 and transformer saved in NF4, by variant. None for schnell (see above)."""

ORIGINALS: dict[str, str] = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
NF4_PARTS = ("text_encoder_2", "transformer")  # what a package holds
ORIGINAL_PARTS = ("model_index.json", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "vae")
_DONE = "fluxnb_nf4_done.json"  # written last: a folder with it is a complete export


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prequantized_checkpoint(model_id: str, dtype: torch.dtype, choice: str | None = None) -> str | None:
    """Where the NF4 T5 and transformer for ``model_id`` come from, or None to quantize while loading.

    Follows ``FLUXNB_CHECKPOINT`` (``choice`` overrides it) as :func:`fluxnb.resolve_checkpoint` does:

    * unset: the Hub package of the original FLUX.1 variant (:data:`PREQUANTIZED_REPOS`), None if there
      is none (schnell) or ``model_id`` is not the original (a fine-tune: its own weights must be used);
    * a stand-in: fluxnb's own export of it, built once into the cache per stand-in, variant and
      ``dtype`` (e.g. ``tiny-flux.1-dev-nf4-float32``), since each saved 4-bit layer carries its dtype;
    * anything else (a folder or Hub id): itself if it has the package layout (``text_encoder_2`` and
      ``transformer`` whose ``config.json`` carry a ``quantization_config``), else None.
    """
    choice = (os.environ.get(ENV_VAR, "") if choice is None else choice).strip()
    variant = variant_of(model_id)
    if not choice:
        official = model_id.strip("/").lower() == ORIGINALS[variant].lower()
        return PREQUANTIZED_REPOS.get(variant) if official else None
    if choice in STAND_INS:
        kind, _, named = choice.partition("-")  # "tiny" follows the notebook's variant, "random-x" names it
        folder = cache_dir() / f"{kind}-flux.1-{named or variant}-nf4-{_dtype_name(dtype)}"
        return str(export_prequantized(resolve_checkpoint(model_id, choice), folder, dtype))
    return choice if all(_is_quantized(choice, part) for part in NF4_PARTS) else None


def _is_quantized(source: str, part: str) -> bool:
    """Whether ``source``'s ``part/config.json`` (on disk, or fetched from the Hub) has a quantization_config."""
    config = Path(source) / part / "config.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

        try:
            config = Path(hf_hub_download(source, f"{part}/config.json"))
        except (EntryNotFoundError, RepositoryNotFoundError, HFValidationError):
            return False  # no such file or repo, not a repo id, or offline and not cached
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _nf4_gb(checkpoint: str) -> float:
    """Disk an export of ``checkpoint`` needs: NF4 is a quarter of bf16, plus the unquantized layers."""
    if not Path(checkpoint).is_dir():
        return 14.0  # FLUX.1's NF4 T5 + transformer: about 13 GB
    weights = sum(p.stat().st_size for part in NF4_PARTS for p in (Path(checkpoint) / part).glob("*.safetensors"))
    return 0.45 * weights / 1e9  # FLUX.1 in fp16: 13 GB of 33


def export_prequantized(checkpoint: str, folder: str | Path, dtype: torch.dtype) -> Path:
    """Quantize ``checkpoint``'s T5 and transformer to NF4 and save them in the package layout.

    Writes ``folder/text_encoder_2`` and ``folder/transformer`` with the course's own loaders
    (:func:`fluxnb.stages.load_text_encoders_4bit`, :func:`fluxnb.stages.load_transformer_4bit`),
    one model in memory at a time, computing in ``dtype``. Built in ``<folder>.partial`` and renamed
    when complete, so an interrupted export never looks finished. A complete export is returned as it
    is; any other existing non-empty ``folder`` is refused, never overwritten. Works on a CPU (tiny).
    """
    from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu
    from fluxnb.stages import load_text_encoders_4bit, load_transformer_4bit

    folder = Path(folder)
    if (folder / _DONE).is_file():
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not an export by fluxnb: choose another folder. "
                              "If it already holds text_encoder_2/ and transformer/ in 4 bits, use it as it is.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(folder.parent, _nf4_gb(checkpoint), what=f"The NF4 export of {checkpoint}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # ours: an export that was interrupted
    staging.mkdir()
    allow_bitsandbytes_on_cpu()  # changes nothing on a GPU
    encoders = load_text_encoders_4bit(checkpoint, dtype)
    with no_progress_bars():  # "Writing model shards": fluxnb's bookkeeping, not the learner's
        encoders.text_encoder_2.save_pretrained(staging / "text_encoder_2")
    del encoders
    flush()
    transformer = load_transformer_4bit(checkpoint, dtype)
    with no_progress_bars():
        transformer.save_pretrained(staging / "transformer")
    del transformer
    flush()
    (staging / _DONE).write_text(json.dumps({"checkpoint": checkpoint, "dtype": _dtype_name(dtype)}) + "\n")
    if folder.exists():
        folder.rmdir()  # empty (checked above)
    staging.rename(folder)
    return folder


# --- what a notebook downloads ------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadItem:
    """One file ``from_pretrained`` reads: from which repo or folder, its path there, its size."""

    source: str  # Hub id or local folder
    path: str  # inside ``source``, e.g. "transformer/config.json"
    size: int  # bytes
    cached: bool  # already on this machine (a local folder, or the Hugging Face cache): nothing to fetch


# What from_pretrained fetches: safetensors weights (one file or shards), JSON configs and shard indexes,
# tokenizer files. Not .bin/.pth/.gguf duplicates, single-file checkpoints, READMEs or images.
_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors")
_SMALL_FILES = (".json", ".txt", ".model")  # configs and indexes; merges.txt; T5's spiece.model


def _fetched(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return bool(_WEIGHTS.fullmatch(name)) or name.endswith(_SMALL_FILES)


def _in_parts(path: str, parts: tuple[str, ...]) -> bool:
    return any(path == part or path.startswith(part + "/") for part in parts)


def _missing(items: list[DownloadItem], parts: tuple[str, ...]) -> list[str]:
    return [part for part in parts if not any(_in_parts(item.path, (part,)) for item in items)]


def _folder_items(source: str, root: Path, parts: tuple[str, ...]) -> list[DownloadItem]:
    """The files under ``parts`` of a folder on disk (a local checkpoint or a cached Hub snapshot)."""
    items = []
    for file in sorted(root.rglob("*")):
        path = file.relative_to(root).as_posix()
        if file.is_file() and _in_parts(path, parts):
            items.append(DownloadItem(source, path, file.stat().st_size, cached=True))
    return items


def _cached_snapshot(repo: str) -> Path | None:
    """The Hugging Face cache's snapshot of ``repo``'s main branch, if any (the cache's documented layout)."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    return ref.parent.parent / "snapshots" / ref.read_text().strip() if ref.is_file() else None


def _hub_items(repo: str, parts: tuple[str, ...]) -> list[DownloadItem]:
    """The files under ``parts`` of a Hub repo, from its file list; offline, from the cache."""
    import httpx
    from huggingface_hub import HfApi, RepoFile, try_to_load_from_cache
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        tree = HfApi().list_repo_tree(repo, recursive=True)
        listing = [(f.path, f.size) for f in tree if isinstance(f, RepoFile)]
    except (OfflineModeIsEnabled, httpx.TransportError) as error:
        snapshot = _cached_snapshot(repo)
        items = _folder_items(repo, snapshot, parts) if snapshot and snapshot.is_dir() else []
        if _missing(items, parts):
            raise ConnectionError(
                f"The Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE=1) and {repo} is not in its "
                "cache. Connect to the internet (and unset HF_HUB_OFFLINE) to download it, or run the course "
                "offline on the tiny stand-in: set FLUXNB_CHECKPOINT=tiny."
            ) from error
        return items
    return [DownloadItem(repo, path, size, cached=isinstance(try_to_load_from_cache(repo, path), str))
            for path, size in listing if _in_parts(path, parts)]


def download_plan(model_id: str, prequantized: str | None) -> list[DownloadItem]:
    """Every file a notebook's loaders read: what it will download, computed from the file lists.

    From ``model_id`` (the original, or a stand-in's folder): ``model_index.json``, the scheduler,
    tokenizers, CLIP and the VAE; from ``prequantized`` the NF4 ``text_encoder_2`` and ``transformer``,
    or without it those two from ``model_id`` (bf16, quantized while loading). Only files that
    ``from_pretrained`` fetches count. Files in the Hugging Face cache, or in a local folder, are marked
    ``cached``. Offline, a Hub repo is planned from its cached copy; not cached: ``ConnectionError``.
    A source without one of its parts: ``FileNotFoundError``.
    """
    sources = {model_id: ORIGINAL_PARTS + (() if prequantized else NF4_PARTS)}
    if prequantized:
        sources[prequantized] = sources.get(prequantized, ()) + NF4_PARTS
    plan = []
    for source, parts in sources.items():
        items = _folder_items(source, Path(source), parts) if Path(source).is_dir() else _hub_items(source, parts)
        if missing := _missing(items, parts):
            raise FileNotFoundError(f"{source} has no {', '.join(missing)}: "
                                    "is it a FLUX.1 checkpoint in diffusers' layout?")
        plan += [item for item in items if _fetched(item.path)]
    return plan


def download_gb(plan: list[DownloadItem], include_cached: bool = False) -> float:
    """GB (10^9 bytes) that ``plan`` downloads; with ``include_cached``, its whole size."""
    return sum(item.size for item in plan if include_cached or not item.cached) / 1e9


def saved_quantized_dir(folder: str | Path, checkpoint: str, dtype: torch.dtype) -> Path:
    """Where notebook 02 saves its own NF4 transformer (``<dir>/transformer``, the package layout) under
    ``folder``: named by the checkpoint and the dtype, so switching ``MODEL_ID`` or the GPU never loads
    weights made for another, and each is kept (nothing is overwritten)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", str(checkpoint).lower()).strip("-")[-60:]
    return Path(folder) / f"nf4-{slug}-{_dtype_name(dtype)}"
