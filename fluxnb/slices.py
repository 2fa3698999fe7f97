"""A FLUX.1 transformer checkpoint on disk, and a slice of it that a small machine can hold (notebooks 05-07).

A full bf16 FLUX.1 transformer is 24 GB: it fits neither a T4 nor Colab's RAM. :func:`slice_checkpoint`
writes the first few blocks of a checkpoint as a small checkpoint of their own (real shapes, real
weights), so a small machine can compare every quantization scheme per block, while full-model
numbers come from the benchmark; :func:`slice_for` makes one once in fluxnb's cache. The rest reads a
checkpoint without loading it: :func:`local_folder` (a Hub id becomes its downloaded snapshot),
:func:`transformer_config`, :func:`parameter_count` (from the safetensors headers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def local_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """``checkpoint`` as a local folder: itself if it is one, else the Hub snapshot of its transformer
    (downloaded once into the Hugging Face cache: 23.8 GB for FLUX.1-dev)."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(checkpoint), allow_patterns=["transformer/*"]))


def slice_for(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None) -> str:
    """The checkpoint the notebooks compare quantization schemes on: ``checkpoint`` itself if ``blocks`` is None, else a
    slice of its first ``blocks = (double, single)`` blocks (at most as many as it has), made once in
    fluxnb's cache by :func:`slice_checkpoint`."""
    if blocks is None:
        return str(checkpoint)
    import zlib

    from fluxnb.checkpoints import cache_dir

    src = local_folder(checkpoint)
    config = json.loads((src / "transformer" / "config.json").read_text())
    n, m = min(blocks[0], config["num_layers"]), min(blocks[1], config["num_single_layers"])
    tag = f"{zlib.crc32(str(src.resolve()).encode()):08x}-{n}-{m}"
    return str(slice_checkpoint(src, cache_dir() / "slices" / tag, n, m))


def slice_checkpoint(checkpoint: str | os.PathLike[str], folder: str | os.PathLike[str],
                     num_layers: int, num_single_layers: int) -> Path:
    """Write the first ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks of
    ``checkpoint``'s transformer (with its embedders and output layer) as a checkpoint of its own.

    The blocks keep their real shapes and weights, so every backend quantizes exactly what it would in
    the full model; only their number shrinks. Reads one tensor at a time (little RAM). Returns
    ``folder``, which has a ``transformer/`` subfolder in the diffusers layout; kept if already made.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = local_folder(checkpoint) / "transformer"
    out = Path(folder)
    config = json.loads((src / "config.json").read_text())
    if num_layers > config["num_layers"] or num_single_layers > config["num_single_layers"]:
        raise ValueError(f"{checkpoint} has {config['num_layers']} double and {config['num_single_layers']} single "
                         f"blocks; asked for {num_layers} and {num_single_layers}")
    done = out / "transformer" / "fluxnb_slice.json"
    want = dict(source=str(checkpoint), num_layers=num_layers, num_single_layers=num_single_layers)
    if done.is_file() and json.loads(done.read_text()) == want:
        return out

    def keep(key: str) -> bool:
        for prefix, limit in (("transformer_blocks.", num_layers), ("single_transformer_blocks.", num_single_layers)):
            if key.startswith(prefix):
                return int(key.split(".")[1]) < limit
        return True

    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if keep(k)})
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    (out / "transformer" / "config.json").write_text(json.dumps(
        dict(config, num_layers=num_layers, num_single_layers=num_single_layers), indent=2) + "\n")
    done.write_text(json.dumps(want) + "\n")
    return out




def transformer_config(checkpoint: str | os.PathLike[str]) -> Any:
    """The transformer's config of a checkpoint folder (or Hub id), with attribute access like ``model.config``."""
    from types import SimpleNamespace

    return SimpleNamespace(**json.loads((local_folder(checkpoint) / "transformer" / "config.json").read_text()))


def parameter_count(checkpoint: str | os.PathLike[str]) -> int:
    """Number of weights in the checkpoint's transformer, read from the safetensors headers (no loading)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted((local_folder(checkpoint) / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total
