"""Every way diffusers 0.42 can shrink FLUX's transformer: which schemes exist, what can run here, loading (05-07).

A quantization *scheme* is a name (``"bnb-nf4"``, ``"torchao-int8wo"``, ``"gguf-q4_0"``, ...) in
:data:`SCHEMES`: one way to store the transformer's weights, with the backend library that does it. (A
*recipe*, :mod:`fluxnb.recipes`, is a whole way to run FLUX.1; several use a scheme.) Each scheme's
config comes from the table in :mod:`fluxnb.quant_configs`, and :func:`load_transformer` turns a
checkpoint and a scheme into a quantized ``FluxTransformer2DModel`` with the backend's public API (the
benchmarks use it; notebooks 05 and 06 write each config and load call out instead).
:func:`scheme_problem` says, before anything loads, why a scheme cannot run here (library missing, no
CUDA, GPU too old) so a notebook cell can print it and move on; :func:`run_all` runs a function for
each scheme that can, and records why the others were skipped.

Measuring a loaded model is :mod:`fluxnb.quant_metrics`; a GGUF file is written by
:mod:`fluxnb.gguf_export`; a slice of a checkpoint small enough for a T4 is :mod:`fluxnb.slices`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from fluxnb.gguf_export import make_gguf
from fluxnb.quant_configs import build as build_config


class BackendUnavailable(RuntimeError):
    """A quantization scheme cannot run on this machine; the message says why and what to do."""


@dataclass(frozen=True)
class Backend:
    """A quantization library diffusers can use: its pip package and what hardware it needs."""

    name: str
    package: str | None  # pip package that must be installed (None: only diffusers/torch)
    module: str | None  # module to import
    needs_cuda: bool = False
    min_capability: tuple[int, int] | None = None  # e.g. (8, 9) for fp8 matmuls
    note: str = ""


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("bitsandbytes", "bitsandbytes", "bitsandbytes", note="LLM.int8, NF4, FP4; on CPU only via fluxnb.allow_bitsandbytes_on_cpu()"),
    Backend("torchao", "torchao", "torchao", note="PyTorch's own quantization library"),
    Backend("quanto", "optimum-quanto", "optimum.quanto", note="deprecated in diffusers, removed in 1.0"),
    Backend("gguf", "gguf", "gguf", note="llama.cpp's file format; weights dequantized on the fly"),
    Backend("layerwise", None, None, note="diffusers' enable_layerwise_casting: fp8 storage, no library"),
    Backend("sdnq", "sdnq", "sdnq", note="SD.Next's quantizer"),
    Backend("modelopt", "nvidia-modelopt", "modelopt", needs_cuda=True, note="NVIDIA Model Optimizer"),
    Backend("bfl", None, None, note="loads BFL's own fp8/nvfp4 checkpoints (weight_scale tensors); makes none"),
    Backend("nunchaku_lite", "kernels", "kernels", needs_cuda=True,
            note="loads SVDQuant checkpoints made by Nunchaku; not on Hopper (sm90)"),
    Backend("autoround", "auto-round", "auto_round", note="loads AutoRound checkpoints; making one needs calibration"),
]}


@dataclass(frozen=True)
class QuantScheme:
    """One way to store the transformer's weights: backend, a short description, and the bits per weight."""

    name: str
    backend: str
    description: str
    bits: float  # nominal bits per quantized weight (scales excluded)
    min_capability: tuple[int, int] | None = None
    check: Callable[[], str | None] | None = None  # a scheme's own "why not here" (None: nothing beyond the above)


SCHEMES: dict[str, QuantScheme] = {s.name: s for s in [
    QuantScheme("bf16", "layerwise", "no quantization: the reference (fp16 on a T4, fp32 on a CPU)", 16),
    QuantScheme("bnb-int8", "bitsandbytes", "LLM.int8: int8 weights, fp16 outlier columns (threshold 6)", 8),
    QuantScheme("bnb-nf4", "bitsandbytes", "4-bit NormalFloat, blocks of 64 with an fp32 scale each", 4),
    QuantScheme("bnb-fp4", "bitsandbytes", "4-bit float (e2m1), same blocks as NF4", 4),
    QuantScheme("bnb-nf4-dq", "bitsandbytes", "NF4 with double quantization: the scales themselves in 8 bits", 4),
    QuantScheme("torchao-int8wo", "torchao", "torchao int8 weight-only, one scale per output channel", 8),
    QuantScheme("torchao-fp8", "torchao", "torchao fp8 (e4m3) weights and activations, per-row scales", 8, (8, 9)),
    QuantScheme("quanto-int8", "quanto", "optimum-quanto int8 weights", 8),
    QuantScheme("quanto-fp8", "quanto", "optimum-quanto float8 (e4m3) weights", 8,
                check=lambda: quanto_kernel_problem()),  # its kernel compiles on first use (see there)
    QuantScheme("gguf-q8_0", "gguf", "GGUF Q8_0: blocks of 32 int8 + an fp16 scale, made here with `gguf`", 8.5),
    QuantScheme("gguf-q4_0", "gguf", "GGUF Q4_0: blocks of 32 4-bit + an fp16 scale, made here with `gguf`", 4.5),
    QuantScheme("fp8-layerwise", "layerwise", "diffusers layerwise casting: fp8 (e4m3) storage, compute upcast", 8),
    QuantScheme("sdnq-int8", "sdnq", "SDNQ int8 weights", 8),
]}


# --- what can run here -----------------------------------------------------------------------------

def package_version(package: str) -> str | None:
    """The installed version of a pip package, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def backend_problem(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else a sentence saying why not and what to do."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    b = BACKENDS[name]
    if b.module is not None and find_spec(b.module.split(".")[0]) is None:
        return f"{name}: the `{b.package}` package is not installed (`pip install {b.package}`)"
    if b.needs_cuda and not torch.cuda.is_available():
        return f"{name}: needs an NVIDIA GPU with CUDA; this machine has none"
    return None


def scheme_problem(scheme: str) -> str | None:
    """None if ``scheme`` can run here, else why not: backend missing, no CUDA, or a GPU too old."""
    if scheme not in SCHEMES:
        raise KeyError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    r = SCHEMES[scheme]
    problem = backend_problem(r.backend)
    if problem:
        return problem
    problem = r.check() if r.check is not None else None
    if problem:
        return problem
    if r.min_capability is not None:
        need = "sm{}{}".format(*r.min_capability)
        if not torch.cuda.is_available():
            return f"{scheme}: needs a GPU of compute capability {need}+ (Ada, Hopper); this machine has no CUDA GPU"
        have = torch.cuda.get_device_capability()
        if have < r.min_capability:
            return (f"{scheme}: needs compute capability {need}+ (fp8 matmuls: L4, RTX 40xx, H100); "
                    f"this {torch.cuda.get_device_name()} is sm{have[0]}{have[1]} (a T4 is sm75)")
    return None


def quanto_kernel_problem() -> str | None:
    """Why optimum-quanto's fp8 weights should not run here now, or None.

    On a CUDA GPU of compute capability 8.0 or newer, quanto stores fp8 weights for its Marlin kernel,
    which it compiles with nvcc on first use (``torch.utils.cpp_extension.load``): minutes, and several
    GiB of host RAM per compiler job. On an H100 capped as a Colab T4 that compile ran out of the 12 GiB
    VM and the kernel was killed (``benchmarks/README.md``). A T4 (sm75) never uses that kernel, a CPU
    neither. Set ``FLUXNB_BUILD_QUANTO_KERNELS=1`` to let quanto compile it (once per machine).
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return None
    if os.environ.get("FLUXNB_BUILD_QUANTO_KERNELS") == "1":
        return None
    spec = find_spec("optimum.quanto")
    if spec is None or not spec.submodule_search_locations:
        return None  # not installed: backend_problem says so first
    built = Path(next(iter(spec.submodule_search_locations))) / "library" / "extensions" / "cuda" / "build"
    version_file = built / "pytorch_version.txt"
    if version_file.is_file() and version_file.read_text().strip() == torch.__version__:
        return None
    return ("quanto-fp8: on this sm{}{} GPU optimum-quanto runs fp8 weights through its Marlin kernel, which "
            "it first compiles with nvcc (minutes, and more host RAM than a 12 GiB Colab VM leaves); set "
            "FLUXNB_BUILD_QUANTO_KERNELS=1 to let it compile once (a T4 does not need it)"
            ).format(*torch.cuda.get_device_capability())


def require(scheme: str) -> None:
    """Raise :class:`BackendUnavailable` with :func:`scheme_problem`'s reason if ``scheme`` cannot run."""
    problem = scheme_problem(scheme)
    if problem:
        raise BackendUnavailable(problem)


def backends_table() -> str:
    """Markdown: every backend, its installed version, and whether it can run on this machine."""
    rows = ["| backend | package | installed | here | note |", "|---|---|---|---|---|"]
    for b in BACKENDS.values():
        installed = package_version(b.package) if b.package else "(built in)"
        problem = backend_problem(b.name)
        rows.append(f"| {b.name} | {b.package or '-'} | {installed or 'no'} | {'yes' if problem is None else problem} "
                    f"| {b.note} |")
    return "\n".join(rows)


# --- loading ---------------------------------------------------------------------------------------

def quantization_config(scheme: str, dtype: torch.dtype, **options: Any) -> Any:
    """The library's quantization config for ``scheme``, from the table :data:`fluxnb.quant_configs.CONFIGS`
    (None for bf16 and fp8-layerwise, which load without one); checked first with :func:`require`.

    ``options`` go to the config (e.g. ``llm_int8_threshold=6.0`` or ``llm_int8_skip_modules=[...]``
    for ``bnb-int8``).
    """
    require(scheme)
    return build_config(scheme, dtype, **options)


def default_gguf_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """Where :func:`load_transformer` keeps the GGUF files it makes: ``gguf/`` in a checkpoint folder; for a Hub id,
    ``gguf/<repo>`` in fluxnb's cache (never inside the Hugging Face cache's snapshot)."""
    from fluxnb.checkpoints import cache_dir

    if Path(checkpoint).is_dir():
        return Path(checkpoint) / "gguf"
    return cache_dir() / "gguf" / str(checkpoint).strip("/").replace("/", "--")


def load_transformer(checkpoint: str | os.PathLike[str], scheme: str, dtype: torch.dtype,
                     gguf_folder: str | os.PathLike[str] | None = None, device: str | torch.device | None = None,
                     **options: Any) -> Any:
    """FLUX's transformer from ``checkpoint`` (diffusers layout) loaded with ``scheme``, on ``device``.

    ``device`` defaults to the GPU if there is one. bitsandbytes (and torchao on a GPU) place each weight
    there while loading; the other backends load on the CPU and are moved. GGUF schemes first make a
    ``.gguf`` file in ``gguf_folder`` (default: :func:`default_gguf_folder`; reused once made); of a Hub id
    that needs its whole transformer on disk (:func:`fluxnb.slices.local_folder` says its size first).
    """
    from diffusers import FluxTransformer2DModel

    require(scheme)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = str(checkpoint)
    backend = SCHEMES[scheme].backend
    if backend == "gguf":
        qtype = scheme.split("-", 1)[1].upper()
        folder = Path(gguf_folder) if gguf_folder else default_gguf_folder(checkpoint)
        path = make_gguf(checkpoint, folder / f"transformer-{qtype}.gguf", qtype)
        model = FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=quantization_config(scheme, dtype, **options), config=checkpoint,
            subfolder="transformer", dtype=dtype)
        return model.to(device)
    config = quantization_config(scheme, dtype, **options)
    kwargs: dict[str, Any] = dict(subfolder="transformer", dtype=dtype, use_safetensors=True)
    if config is not None:
        kwargs["quantization_config"] = config
    placed = backend == "bitsandbytes" or (backend == "torchao" and device.type == "cuda")
    if placed:  # quantized where it will run: on the GPU each weight is quantized there, fast
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = FluxTransformer2DModel.from_pretrained(checkpoint, **kwargs)
    if scheme == "fp8-layerwise":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return model if placed else model.to(device)


def run_all(names: Iterable[str], run: Any, strict: bool = False) -> dict[str, Any]:
    """Call ``run(name)`` for each quantization scheme; one that cannot run here is skipped with its reason.

    A scheme that can run and then fails is recorded as ``{"error": "<type>: <message>"}`` and printed in
    full, so one broken backend does not hide the others' results (the table shows the error); with
    ``strict`` (the tests) it raises instead.
    """
    import traceback

    out: dict[str, Any] = {}
    for name in names:
        problem = scheme_problem(name)
        if problem:
            print(f"skipped {problem}")
            out[name] = {"skipped": problem}
            continue
        try:
            out[name] = run(name)
        except Exception as err:  # shown, printed and put in the table: a backend failing here is a finding
            if strict:
                raise
            traceback.print_exc()
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"FAILED {name}: {out[name]['error'][:500]}")
    return out
