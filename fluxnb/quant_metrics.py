"""Measuring a quantized FLUX.1 transformer: what its weights store, how fast it runs, how far it is off (05-07).

:func:`measure_model` takes a loaded model and returns its weights' size (:func:`weight_bytes`), forward
time (:func:`timed_forward`) and relative error; :func:`measure` loads a scheme first
(:func:`fluxnb.quantization.load_transformer`). :func:`fixed_inputs` makes one seeded input for the
transformer, :func:`transformer_output` runs it, :func:`relative_error` compares with the bf16 (or
fp16) reference; :func:`image_metrics` gives PSNR/SSIM of decoded images (torchmetrics). The numbers
show each scheme's *numerical* error; with random weights they say nothing about image quality.
:func:`rows_table` shows measured rows as markdown, :func:`committed_table` the committed GPU
benchmark's table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from fluxnb.quantization import SCHEMES, QuantScheme, load_transformer
from fluxnb.slices import transformer_config

RESULTS = Path(__file__).resolve().parent / "results"


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


def measure(checkpoint: str, scheme: str, dtype: torch.dtype, inputs: dict[str, torch.Tensor],
            reference: torch.Tensor | None = None, keep: bool = False, **options: Any) -> dict[str, Any]:
    """Load ``scheme`` with :func:`load_transformer` and measure it as :func:`measure_model` does, with
    the loading counted too: ``load_s``, and ``vram_peak_gib`` from before the load.

    Also ``model`` if ``keep`` (otherwise the model is freed before returning).
    """
    from fluxnb.memory import flush

    flush()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_transformer(checkpoint, scheme, dtype, **options)
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
    out = ["| " + " | ".join(["scheme", *(c[1] for c in cols), "note"]) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, row in rows.items():
        cells = ["-" if row.get(k) is None else f"{row[k]:.{d}f}" for k, _, d in cols]
        note = row.get("skipped") or row.get("error") or SCHEMES.get(name, QuantScheme(name, "", "", 0)).description
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
