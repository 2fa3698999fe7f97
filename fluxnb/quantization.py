"""Every way diffusers 0.42 can shrink FLUX's transformer: what can run here, and how to measure it (notebooks 05-07).

A *recipe* is a name (``"bnb-nf4"``, ``"torchao-int8wo"``, ``"gguf-q4_0"``, ...) in :data:`RECIPES`;
its config comes from the table in :mod:`fluxnb.quant_configs`, and :func:`load_transformer` turns a
checkpoint and a recipe into a quantized ``FluxTransformer2DModel`` with the backend's public API (the
benchmarks use it; notebooks 05 and 06 write each config and load call out instead).
:func:`recipe_problem` says, before anything loads, why a recipe cannot run here (library missing, no
CUDA, GPU too old) so a notebook cell can print it and move on.

Measuring: :func:`measure_model` takes a loaded model and returns its weights' size, forward time and
relative error; :func:`fixed_inputs` makes one seeded input for the transformer, :func:`transformer_output`
runs it, :func:`relative_error` compares with the bf16 (or fp16) reference; :func:`image_metrics` gives
PSNR/SSIM of decoded images (torchmetrics). The numbers show each recipe's *numerical* error; with
random weights they say nothing about image quality.

A full bf16 FLUX.1 transformer is 24 GB: it fits neither a T4 nor Colab's RAM. :func:`slice_checkpoint`
writes the first few blocks of a checkpoint as a small checkpoint of their own, so a small machine can
compare every backend on real shapes (per block), and full-model numbers come from the benchmark.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from fluxnb.quant_configs import build as build_config

GGUF_TYPES = ("Q8_0", "Q4_0")  # types gguf's numpy code can *make*; K-quants it can only read
RESULTS = Path(__file__).resolve().parent / "results"


class BackendUnavailable(RuntimeError):
    """A recipe cannot run on this machine; the message says why and what to do."""


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
class QuantRecipe:
    """One way to load the transformer: backend, a short description, and the bits per weight."""

    name: str
    backend: str
    description: str
    bits: float  # nominal bits per quantized weight (scales excluded)
    min_capability: tuple[int, int] | None = None
    check: Callable[[], str | None] | None = None  # a recipe's own "why not here" (None: nothing beyond the above)


RECIPES: dict[str, QuantRecipe] = {r.name: r for r in [
    QuantRecipe("bf16", "layerwise", "no quantization: the reference (fp16 on a T4, fp32 on a CPU)", 16),
    QuantRecipe("bnb-int8", "bitsandbytes", "LLM.int8: int8 weights, fp16 outlier columns (threshold 6)", 8),
    QuantRecipe("bnb-nf4", "bitsandbytes", "4-bit NormalFloat, blocks of 64 with an fp32 scale each", 4),
    QuantRecipe("bnb-fp4", "bitsandbytes", "4-bit float (e2m1), same blocks as NF4", 4),
    QuantRecipe("bnb-nf4-dq", "bitsandbytes", "NF4 with double quantization: the scales themselves in 8 bits", 4),
    QuantRecipe("torchao-int8wo", "torchao", "torchao int8 weight-only, one scale per output channel", 8),
    QuantRecipe("torchao-fp8", "torchao", "torchao fp8 (e4m3) weights and activations, per-row scales", 8, (8, 9)),
    QuantRecipe("quanto-int8", "quanto", "optimum-quanto int8 weights", 8),
    QuantRecipe("quanto-fp8", "quanto", "optimum-quanto float8 (e4m3) weights", 8,
                check=lambda: quanto_kernel_problem()),  # its kernel compiles on first use (see there)
    QuantRecipe("gguf-q8_0", "gguf", "GGUF Q8_0: blocks of 32 int8 + an fp16 scale, made here with `gguf`", 8.5),
    QuantRecipe("gguf-q4_0", "gguf", "GGUF Q4_0: blocks of 32 4-bit + an fp16 scale, made here with `gguf`", 4.5),
    QuantRecipe("fp8-layerwise", "layerwise", "diffusers layerwise casting: fp8 (e4m3) storage, compute upcast", 8),
    QuantRecipe("sdnq-int8", "sdnq", "SDNQ int8 weights", 8),
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


def recipe_problem(recipe: str) -> str | None:
    """None if ``recipe`` can run here, else why not: backend missing, no CUDA, or a GPU too old."""
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    problem = backend_problem(r.backend)
    if problem:
        return problem
    problem = r.check() if r.check is not None else None
    if problem:
        return problem
    if r.min_capability is not None:
        need = "sm{}{}".format(*r.min_capability)
        if not torch.cuda.is_available():
            return f"{recipe}: needs a GPU of compute capability {need}+ (Ada, Hopper); this machine has no CUDA GPU"
        have = torch.cuda.get_device_capability()
        if have < r.min_capability:
            return (f"{recipe}: needs compute capability {need}+ (fp8 matmuls: L4, RTX 40xx, H100); "
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


def require(recipe: str) -> None:
    """Raise :class:`BackendUnavailable` with :func:`recipe_problem`'s reason if ``recipe`` cannot run."""
    problem = recipe_problem(recipe)
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

def quantization_config(recipe: str, dtype: torch.dtype, **options: Any) -> Any:
    """The library's quantization config for ``recipe``, from the table :data:`fluxnb.quant_configs.CONFIGS`
    (None for bf16 and fp8-layerwise, which load without one); checked first with :func:`require`.

    ``options`` go to the config (e.g. ``llm_int8_threshold=6.0`` or ``llm_int8_skip_modules=[...]``
    for ``bnb-int8``).
    """
    require(recipe)
    return build_config(recipe, dtype, **options)


def load_transformer(checkpoint: str | os.PathLike[str], recipe: str, dtype: torch.dtype,
                     gguf_folder: str | os.PathLike[str] | None = None, device: str | torch.device | None = None,
                     **options: Any) -> Any:
    """FLUX's transformer from ``checkpoint`` (diffusers layout) loaded with ``recipe``, on ``device``.

    ``device`` defaults to the GPU if there is one. bitsandbytes (and torchao on a GPU) place each weight
    there while loading; the other backends load on the CPU and are moved. GGUF recipes first make a
    ``.gguf`` file in ``gguf_folder`` (default: ``gguf/`` in the checkpoint's folder; reused once made).
    """
    from diffusers import FluxTransformer2DModel

    require(recipe)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = str(checkpoint)
    backend = RECIPES[recipe].backend
    if backend == "gguf":
        qtype = recipe.split("-", 1)[1].upper()
        folder = Path(gguf_folder) if gguf_folder else local_folder(checkpoint) / "gguf"
        path = make_gguf(checkpoint, folder / f"transformer-{qtype}.gguf", qtype)
        model = FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=quantization_config(recipe, dtype, **options), config=checkpoint,
            subfolder="transformer", dtype=dtype)
        return model.to(device)
    config = quantization_config(recipe, dtype, **options)
    kwargs: dict[str, Any] = dict(subfolder="transformer", dtype=dtype, use_safetensors=True)
    if config is not None:
        kwargs["quantization_config"] = config
    placed = backend == "bitsandbytes" or (backend == "torchao" and device.type == "cuda")
    if placed:  # quantized where it will run: on the GPU each weight is quantized there, fast
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = FluxTransformer2DModel.from_pretrained(checkpoint, **kwargs)
    if recipe == "fp8-layerwise":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return model if placed else model.to(device)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: a tensor subclass (torchao, quanto) is counted by its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _bnb_state_bytes(state: Any) -> int:
    """bitsandbytes 4-bit keeps its scales (``absmax``) beside the weight, not as a parameter: count them."""
    if state is None:
        return 0
    own = sum(_tensor_bytes(t) for t in (state.absmax, state.code) if isinstance(t, torch.Tensor))
    return own + _bnb_state_bytes(getattr(state, "state2", None))  # double quantization: the scales' scales


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights really take: parameters and buffers as stored (tensor subclasses by their
    inner tensors) plus bitsandbytes' 4-bit scales, which ``get_memory_footprint`` does not see."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(_tensor_bytes(t) for t in tensors.values())
    return total + sum(_bnb_state_bytes(getattr(t, "quant_state", None)) for t in tensors.values())


# --- a slice of the model for small machines ---------------------------------------------------------

def local_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """``checkpoint`` as a local folder: itself if it is one, else the Hub snapshot of its transformer
    (downloaded once into the Hugging Face cache: 23.8 GB for FLUX.1-dev)."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(checkpoint), allow_patterns=["transformer/*"]))


def slice_for(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None) -> str:
    """The checkpoint the notebooks compare recipes on: ``checkpoint`` itself if ``blocks`` is None, else a
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


# --- GGUF files, made here -----------------------------------------------------------------------------

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


# --- measuring ------------------------------------------------------------------------------------------

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


def fixed_inputs(config: Any, height: int = 512, width: int = 512, text_tokens: int = 512, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One seeded input for ``FluxTransformer2DModel.forward`` (``config``: the model's config, or a checkpoint).

    Image tokens for a ``height`` x ``width`` picture (latents 8x smaller, packed 2x2), random
    stand-ins for T5 and CLIP embeddings, timestep 0.5, guidance 3.5. Made on the CPU, so every machine
    gets the same numbers.
    """
    from diffusers import FluxPipeline

    if isinstance(config, (str, os.PathLike)):
        config = transformer_config(config)
    g = torch.Generator("cpu").manual_seed(seed)
    h, w = height // 16, width // 16
    inputs = dict(
        hidden_states=torch.randn(1, h * w, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return {k: v.to(device, dtype if k not in ("img_ids", "txt_ids") else torch.float32) for k, v in inputs.items()}


@torch.no_grad()
def transformer_output(model: Any, inputs: dict[str, torch.Tensor],
                       device: str | torch.device | None = None) -> torch.Tensor:
    """The transformer's output for ``inputs`` (made by :func:`fixed_inputs`), as float32 on the CPU.

    The inputs go to ``device``, by default the device of the model's weights (give it for an offloaded model).
    """
    device = device or next(p.device for p in model.parameters() if p.device.type != "meta")
    dtype = model.dtype if model.dtype.is_floating_point and model.dtype.itemsize >= 2 else torch.float32
    moved = {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
             for k, v in inputs.items()}
    out = model(**moved, return_dict=False)[0]
    return out.float().cpu()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` (Frobenius norms, float64): 0 for identical outputs."""
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(output.shape)} vs reference {tuple(reference.shape)}")
    ref = reference.double()
    norm = ref.norm()
    if norm == 0 or not torch.isfinite(norm):
        raise ValueError(f"the reference has norm {norm.item()}: it must be finite and non-zero")
    return ((output.double() - ref).norm() / norm).item()


def timed_forward(model: Any, inputs: dict[str, torch.Tensor], repeats: int = 3,
                  device: str | torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Output of one forward (the first, a warm-up) and the median seconds of ``repeats`` more."""
    out = transformer_output(model, inputs, device)
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        transformer_output(model, inputs, device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return out, sorted(seconds)[len(seconds) // 2]


def _measure_loaded(model: Any, inputs: dict[str, torch.Tensor], reference: torch.Tensor | None) -> dict[str, Any]:
    """:func:`measure_model`'s row, with the VRAM peak counted since the caller last reset it."""
    row: dict[str, Any] = dict(weights_gib=weight_bytes(model) / 2**30)
    row["output"], row["forward_s"] = timed_forward(model, inputs)
    if torch.cuda.is_available():
        row["vram_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if reference is not None:
        row["relative_error"] = relative_error(row["output"], reference)
    return row


def measure_model(model: Any, inputs: dict[str, torch.Tensor], reference: torch.Tensor | None = None) -> dict[str, Any]:
    """What a loaded (quantized) transformer costs and how far its output is from ``reference``.

    For notebooks 05 and 06, which load each model with the library's own call and then hand it here.
    Keys: ``weights_gib`` (:func:`weight_bytes`: what the weights really store), ``forward_s`` (median
    of 3 forwards after a warm-up, from :func:`timed_forward`), ``vram_peak_gib`` (on a GPU: allocated
    by PyTorch from here on, so the resident weights plus one forward's activations; a loader's own
    transient peak is not in it), ``relative_error`` (if ``reference`` is given) and ``output``.
    """
    from fluxnb.memory import flush

    flush()  # what earlier models left behind is not this one's
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _measure_loaded(model, inputs, reference)


def measure(checkpoint: str, recipe: str, dtype: torch.dtype, inputs: dict[str, torch.Tensor],
            reference: torch.Tensor | None = None, keep: bool = False, **options: Any) -> dict[str, Any]:
    """Load ``recipe`` with :func:`load_transformer` and measure it as :func:`measure_model` does, with
    the loading counted too: ``load_s``, and ``vram_peak_gib`` from before the load.

    Also ``model`` if ``keep`` (otherwise the model is freed before returning).
    """
    from fluxnb.memory import flush

    flush()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_transformer(checkpoint, recipe, dtype, **options)
    row: dict[str, Any] = dict(load_s=time.perf_counter() - start, **_measure_loaded(model, inputs, reference))
    if keep:
        row["model"] = model
    else:
        del model
        flush()
    return row


def rows_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown of :func:`measure_model` / :func:`measure` results (and ``{"skipped": why}`` / ``{"error": what}``
    entries). A column no row has (``load_s`` of :func:`measure_model`, the VRAM peak on a CPU) is left out."""
    cols = [("weights_gib", "weights (GiB)", 4), ("vram_peak_gib", "VRAM peak (GiB)", 3), ("load_s", "load (s)", 2),
            ("forward_s", "forward (s)", 4), ("relative_error", "rel. error", 4)]
    cols = [c for c in cols if any(row.get(c[0]) is not None for row in rows.values())]
    out = ["| " + " | ".join(["recipe", *(c[1] for c in cols), "note"]) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, row in rows.items():
        cells = ["-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, _, d in cols]
        note = row.get("skipped") or row.get("error") or RECIPES.get(name, QuantRecipe(name, "", "", 0)).description
        out.append("| " + " | ".join([name, *cells, str(note).replace("|", "/")[:200]]) + " |")
    return "\n".join(out)


def image_metrics(image: Any, reference: Any) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``image`` against ``reference`` (PIL images), with torchmetrics."""
    import numpy as np
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    def tensor(img: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    a, b = tensor(image), tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"image sizes differ: {image.size} vs reference {reference.size}")
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0).item()
    ssim = structural_similarity_index_measure(a, b, data_range=1.0).item()
    return dict(psnr_db=psnr, ssim=ssim)


# --- committed benchmark results -------------------------------------------------------------------------

def committed_table(folder: Path = RESULTS) -> str:
    """The quantization table of the committed GPU benchmark (``fluxnb/results/quant-*.md``), or a
    sentence saying there is none yet and how to make it."""
    files = sorted(folder.glob("quant-*.md"))
    if not files:
        return ("No GPU quantization results are committed yet: run `bash benchmarks/gpu_quant.sh` on a GPU "
                "machine, then `python -m benchmarks report` (see benchmarks/README.md).")
    return "\n\n".join(f.read_text().strip() for f in files)


def run_all(names: Iterable[str], run: Any, strict: bool = False) -> dict[str, Any]:
    """Call ``run(name)`` for each recipe; a recipe that cannot run here is skipped with its reason.

    A recipe that can run and then fails is recorded as ``{"error": "<type>: <message>"}`` and printed in
    full, so one broken backend does not hide the others' results (the table shows the error); with
    ``strict`` (the tests) it raises instead.
    """
    import traceback

    out: dict[str, Any] = {}
    for name in names:
        problem = recipe_problem(name)
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
