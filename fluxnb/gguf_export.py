"""A FLUX.1 transformer written as a GGUF file (llama.cpp's format), made here with the ``gguf`` package.

diffusers reads GGUF files (``from_single_file`` with ``GGUFQuantizationConfig``) but makes none;
:func:`make_gguf` writes one from a checkpoint in diffusers layout, keeping diffusers' tensor names so
no conversion is needed. The ``gguf-q8_0`` and ``gguf-q4_0`` schemes of :mod:`fluxnb.quantization`
load what it writes; notebook 06 makes one of a slice (:mod:`fluxnb.slices`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fluxnb.slices import local_folder

GGUF_TYPES = ("Q8_0", "Q4_0")  # types gguf's numpy code can *make*; K-quants it can only read


def _gguf_tensor(shard: str, key: str, qtype: str) -> tuple[str, Any, Any]:
    """One tensor of a safetensors shard as GGUF data: quantized to ``qtype`` if it is a matrix whose rows
    split into whole blocks, else kept in float32 (biases, norms). Runs in a worker process."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    from safetensors import safe_open

    with safe_open(shard, framework="pt") as f:
        array = f.get_tensor(key).float().numpy()
    kind = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[kind][0]
    if array.ndim >= 2 and array.shape[-1] % block == 0:
        return key, quants.quantize(array, kind), kind
    return key, np.ascontiguousarray(array, dtype=np.float32), GGMLQuantizationType.F32


def make_gguf(checkpoint: str | os.PathLike[str], path: str | os.PathLike[str], qtype: str = "Q8_0",
              workers: int | None = None) -> Path:
    """Write ``checkpoint``'s transformer as a GGUF file of type ``qtype`` (``"Q8_0"`` or ``"Q4_0"``).

    Uses the ``gguf`` package (llama.cpp's Python writer and its numpy quantizers), keeping diffusers'
    tensor names, so ``from_single_file`` loads it without conversion. gguf's quantizers are numpy and
    single-threaded (about 45 M weights/s for Q8_0): for checkpoints over 1 GB, ``workers`` processes
    (default: the CPU count, at most 4) quantize tensors in parallel; smaller ones are done in this process. The
    workers are *spawned*, so a script that calls this must guard its code with
    ``if __name__ == "__main__":`` (notebooks need nothing). An existing file of the same source and
    type is reused.
    """
    import concurrent.futures
    import multiprocessing

    from gguf import GGUFWriter

    qtype = qtype.upper()
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES} (gguf's numpy code cannot make {qtype!r}; "
                         "llama.cpp's C++ tools can)")
    src = local_folder(checkpoint) / "transformer"
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors in {src}: make_gguf needs a checkpoint folder in diffusers layout")
    path = Path(path)
    stamp = path.with_suffix(".json")
    want = dict(source=str(checkpoint), qtype=qtype, shards=[[s.name, s.stat().st_size] for s in shards])
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    from safetensors import safe_open

    jobs = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            jobs += [(str(shard), key, qtype) for key in f.keys()]
    if workers is None:  # each worker imports torch (~0.4 GB of RAM): at most 4 on a small machine
        big = sum(s.stat().st_size for s in shards) > 1e9
        workers = min(len(jobs), os.cpu_count() or 1, 4) if big else 1
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_gguf_tensor, *zip(*jobs)))
    else:
        done = [_gguf_tensor(*job) for job in jobs]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = GGUFWriter(str(tmp), arch="flux")
    for key, data, kind in done:
        writer.add_tensor(key, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    stamp.write_text(json.dumps(want) + "\n")
    return path
