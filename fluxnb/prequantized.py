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

With a stand-in (``FLUXNB_CHECKPOINT=tiny`` or ``random-*``) the stand-in Hub (:mod:`fluxnb.hub`) serves
a package of the stand-in's own under the same id, in the same layout, exported once into the fluxnb cache
by :func:`export_prequantized` (:func:`stand_in_package`), so the notebooks download and load it exactly as
they would the Hub's. It is written in the form the Hub's package was written
in 2024, not today's (:func:`to_hub_package_form`): today's libraries must load *that*.

What is known of the Hub package, and from where (no machine of this project can reach the Hub):

* its two folders, ``transformer/`` and ``text_encoder_2/``, each with a ``config.json`` that carries a
  ``quantization_config``: diffusers' bitsandbytes guide and its test
  ``tests/quantization/bnb/test_4bit.py::test_config_from_pretrained`` load them with no
  quantization config;
* the keys of that ``quantization_config`` (``_load_in_4bit`` ... ``quant_method``: 13 keys, those of
  ``BitsAndBytesConfig.to_dict``), as diffusers' ``tests/quantization/test_pipeline_level_quantization.py``
  (``test_quant_config_repr``) spells them out;
* its age: diffusers gained bitsandbytes support in 0.31.0 (PR #9213, October 2024), so it was written
  by a diffusers of that era and a transformers of the 4.4x line, which wrote ``torch_dtype`` (renamed
  ``dtype`` in 4.56) and cut weight files at 5 GB (now 50 GB). The exact version strings in its files
  could not be read here: :data:`HUB_PACKAGE_VERSIONS` names the era, not the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxnb.checkpoints import (KLEIN_PARTS, REAL_MAX_SHARD_BYTES, cache_dir, family_of, variant_of,
                                write_hub_json)  # REAL_MAX_SHARD_BYTES: the 2024 libraries' shard sizes, as the Hub package was cut
from fluxnb.environment import check_free_disk
from fluxnb.memory import flush
from fluxnb.quiet import no_progress_bars

PREQUANTIZED_REPOS: dict[str, str] = {"dev": "hf-internal-testing/flux.1-dev-nf4-pkg"}
"""Hub repos with FLUX.1's T5 and transformer saved in NF4, by variant. None for schnell (see above)."""

ORIGINALS: dict[str, str] = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
NF4_PARTS = ("text_encoder_2", "transformer")  # what a package holds
ORIGINAL_PARTS = ("model_index.json", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "vae")
_DONE = "fluxnb_nf4_done.json"  # written last: a folder with it is a complete export
PACKAGE_FORM = 2  # 2: the Hub package's 2024 form (to_hub_package_form); older exports are made again

HUB_PACKAGE_VERSIONS = {"diffusers": "0.31.0.dev0", "transformers": "4.46.0.dev0"}
"""The library versions of the Hub package's era (see the module docstring), written into the stand-in's
configs as the Hub package's files carry theirs."""
QUANTIZATION_CONFIG_KEYS = ("_load_in_4bit", "_load_in_8bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage",
                            "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "llm_int8_enable_fp32_cpu_offload",
                            "llm_int8_has_fp16_weight", "llm_int8_skip_modules", "llm_int8_threshold",
                            "load_in_4bit", "load_in_8bit", "quant_method")
# Config keys transformers 5 writes for T5 that the 4.4x line did not, and the reverse (FLUX.1-dev's own
# text_encoder_2/config.json, written by 4.43.3, has the old set: fluxnb/configs).
_T5_KEYS_NEWER = ("dtype", "is_decoder", "scale_decoder_outputs")
_T5_KEYS_OLDER = {"decoder_start_token_id": 0, "output_past": True}
_DIFFUSERS_KEYS_NEWER = ("out_channels",)  # FluxTransformer2DModel's, added after 0.31


def to_hub_package_form(folder: str | Path, source: str = "black-forest-labs/FLUX.1-dev") -> None:
    """Rewrite an NF4 package that today's ``save_pretrained`` wrote into the form of the Hub's 2024 one.

    * ``text_encoder_2/config.json``: ``torch_dtype`` instead of ``dtype``, without the keys transformers
      5 added, with those the 4.4x line wrote, ``_name_or_path`` the original repository, and the era's
      ``transformers_version``; an index file keeps only ``metadata.total_size``, as 4.4x wrote it;
    * ``transformer/config.json``: the era's ``_diffusers_version``, without keys added since;
    * both ``quantization_config``: exactly :data:`QUANTIZATION_CONFIG_KEYS`.

    The weights are untouched: bitsandbytes still serializes 4-bit layers under the same keys
    (``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``). Loading the
    result with today's libraries is what tests/test_prequantized.py checks.
    """
    folder = Path(folder)
    t5 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    t5["torch_dtype"] = t5.get("dtype", t5.get("torch_dtype"))
    for key in _T5_KEYS_NEWER:
        t5.pop(key, None)
    t5 = {**_T5_KEYS_OLDER, **t5, "_name_or_path": source, "transformers_version": HUB_PACKAGE_VERSIONS["transformers"]}
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    for key in _DIFFUSERS_KEYS_NEWER:
        transformer.pop(key, None)
    transformer.update(_diffusers_version=HUB_PACKAGE_VERSIONS["diffusers"], _name_or_path=source)
    for config in (t5, transformer):
        quantization = config["quantization_config"]
        missing = sorted(set(QUANTIZATION_CONFIG_KEYS) - set(quantization))
        if missing:
            raise ValueError(f"{folder}: its quantization_config lacks {missing}: is it a bitsandbytes 4-bit package?")
        config["quantization_config"] = {key: quantization[key] for key in QUANTIZATION_CONFIG_KEYS}
    write_hub_json(folder / "text_encoder_2" / "config.json", t5)
    write_hub_json(folder / "transformer" / "config.json", transformer)
    for index in folder.glob("*/*.safetensors.index.json"):
        data = json.loads(index.read_text())
        write_hub_json(index, {"metadata": {"total_size": data["metadata"]["total_size"]}, "weight_map": data["weight_map"]})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stand_in_package(kind: str, dtype: torch.dtype) -> Path:
    """The NF4 package of the ``kind`` (``"tiny"``/``"random"``) FLUX.1-dev stand-in, exported once per ``dtype``
    into the fluxnb cache (``tiny-flux.1-dev-nf4-float32`` ...), since each saved 4-bit layer carries its
    dtype: what the stand-in Hub serves as ``hf-internal-testing/flux.1-dev-nf4-pkg``."""
    from fluxnb.checkpoints import build_random, build_tiny

    source = build_tiny("dev") if kind == "tiny" else build_random("dev")
    folder = cache_dir() / f"{kind}-flux.1-dev-nf4-{_dtype_name(dtype)}"
    return export_prequantized(str(source), folder, dtype)


def is_quantized_part(source: str, part: str) -> bool:
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
        if json.loads((folder / _DONE).read_text()).get("form") == PACKAGE_FORM:
            return folder
        shutil.rmtree(folder)  # our own export, of an older form: made again, as a stand-in's is
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
        encoders.text_encoder_2.save_pretrained(staging / "text_encoder_2",
                                                max_shard_size=REAL_MAX_SHARD_BYTES["text_encoder_2"])
    del encoders
    flush()
    transformer = load_transformer_4bit(checkpoint, dtype)
    with no_progress_bars():
        transformer.save_pretrained(staging / "transformer", max_shard_size=REAL_MAX_SHARD_BYTES["transformer"])
    del transformer
    flush()
    to_hub_package_form(staging, source=ORIGINALS[variant_of(str(checkpoint))])
    (staging / _DONE).write_text(json.dumps({"checkpoint": checkpoint, "dtype": _dtype_name(dtype),
                                             "form": PACKAGE_FORM}) + "\n")
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
    tokenizers, CLIP and the VAE (for FLUX.2 [klein]: all its parts, and ``prequantized`` is ignored); from ``prequantized`` the NF4 ``text_encoder_2`` and ``transformer``,
    or without it those two from ``model_id`` (bf16, quantized while loading). Only files that
    ``from_pretrained`` fetches count. Files in the Hugging Face cache, or in a local folder, are marked
    ``cached``. Offline, a Hub repo is planned from its cached copy; not cached: ``ConnectionError``.
    A source without one of its parts: ``FileNotFoundError``.
    """
    if family_of(model_id) == "klein":  # FLUX.2 [klein]: one text encoder, no NF4 package
        sources = {model_id: ("model_index.json", *KLEIN_PARTS)}
        prequantized = None
    else:
        sources = {model_id: ORIGINAL_PARTS + (() if prequantized else NF4_PARTS)}
    if prequantized:
        sources[prequantized] = sources.get(prequantized, ()) + NF4_PARTS
    plan = []
    for source, parts in sources.items():
        plan += files_plan(source, parts)
    return plan


def files_plan(source: str, parts: tuple[str, ...]) -> list[DownloadItem]:
    """The files ``from_pretrained`` reads under ``parts`` of one source (a Hub id or a folder), as :func:`download_plan`
    lists them: e.g. ``files_plan(model_id, ("transformer",))`` for the whole transformer."""
    items = _folder_items(source, Path(source), parts) if Path(source).is_dir() else _hub_items(source, parts)
    if missing := _missing(items, parts):
        raise FileNotFoundError(f"{source} has no {', '.join(missing)}: is it a FLUX.1 checkpoint in diffusers' layout?")
    return [item for item in items if _fetched(item.path)]


def download_gb(plan: list[DownloadItem], include_cached: bool = False) -> float:
    """GB (10^9 bytes) that ``plan`` downloads; with ``include_cached``, its whole size."""
    return sum(item.size for item in plan if include_cached or not item.cached) / 1e9


def size_text(size: int | float) -> str:
    """Bytes as a learner reads a download's size: ``"13.44 GB"``, ``"3.1 MB"``, ``"812 kB"`` (powers of 10, as
    the Hub and pip show sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GB" else f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def download_text(plan: list[DownloadItem]) -> str:
    """What ``plan`` costs, in one phrase: ``"13.44 GB to download (13.50 GB read in all)"``, or, where everything
    is on this machine already, ``"nothing to download (13.50 GB read from the cache)"``."""
    fetch = sum(item.size for item in plan if not item.cached)
    total = sum(item.size for item in plan)
    if fetch == 0:
        return f"nothing to download ({size_text(total)} read from the cache)"
    return f"{size_text(fetch)} to download ({size_text(total)} read in all)"


def saved_quantized_dir(folder: str | Path, checkpoint: str, dtype: torch.dtype) -> Path:
    """Where notebook 02 saves its own NF4 transformer (``<dir>/transformer``, the package layout) under
    ``folder``: named by the checkpoint and the dtype, so switching ``MODEL_ID`` or the GPU never loads
    weights made for another, and each is kept (nothing is overwritten)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", str(checkpoint).lower()).strip("-")[-60:]
    return Path(folder) / f"nf4-{slug}-{_dtype_name(dtype)}"
