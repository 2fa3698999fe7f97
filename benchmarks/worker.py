"""Run ONE recipe in this process and write its measurements as JSON (``python -m benchmarks.worker``).

The runner starts one worker per recipe so that nothing (allocator caches, pinned host memory, the
CUDA context) carries over from one recipe to the next. A failure (OOM, NaN, anything) is recorded
with the stage it happened in, and the worker exits 1: the runner reports it, nothing is hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

import fluxnb
from benchmarks.recipes import DEFAULT_SIZES, RECIPES, Context
from fluxnb.memory import GIB, MemoryTracker, cap_vram, device_used_bytes

PEAK_FIELDS = ("vram_device_gib", "vram_allocated_gib", "vram_reserved_gib", "ram_anon_gib")
TIME_FIELDS = ("load_s", "compile_s", "on_the_fly_s", "prequantized_s",  # what recipes put in Context.extra
               "make_s", "relative_error", "reference_made", "weight_gib", "backend")
# what multi-GPU and step-caching recipes add (kept only where a recipe set them)
EXTRA_FIELDS = ("gpus", "images_at_once", "per_gpu_peaks_gib", "per_gpu_stages", "blocks_per_gpu", "exact",
                "cache", "computed_steps", "ranks")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,512x768"`` -> ``[(1024, 1024), (512, 768)]`` (height x width)."""
    sizes = []
    for item in text.split(","):
        height, _, width = item.strip().lower().partition("x")
        sizes.append((int(height), int(width)))
    return sizes


def peaks(stages: list[dict[str, Any]]) -> dict[str, float | None]:
    out = {}
    for name in PEAK_FIELDS:
        values = [s[name] for s in stages if s.get(name) is not None]
        out[name] = max(values) if values else None
    return out


def run(recipe_name: str, checkpoint: str, sizes: list[tuple[int, int]], steps: int,
        dtype_name: str | None = None, vram_gib: float | None = None,
        sample_interval_s: float = 0.01, partial_json: Path | None = None) -> dict[str, Any]:
    """Run one recipe here; with ``partial_json``, what is measured is saved after each size.

    The partial file says ``error: "incomplete ..."`` until the final result replaces it, so a worker
    killed by the runner's timeout (or the kernel's OOM killer) still leaves the sizes it finished.
    """
    recipe = RECIPES[recipe_name]
    name = dtype_name or recipe.compute_dtype
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(name) or fluxnb.pick_dtype()
    result: dict[str, Any] = dict(recipe=recipe.name, description=recipe.description, model=recipe.model,
                                  compute_dtype=str(dtype),
                                  steps=steps, sample_interval_s=sample_interval_s, ok=False, error=None,
                                  failed_stage=None)
    if vram_gib is not None:
        result["envelope"] = {"vram_cap_gib": vram_gib, "cuda_context_gib": cap_vram(vram_gib, devices=[0])["cuda:0"]}
    fluxnb.allow_bitsandbytes_on_cpu()
    ctx = Context(checkpoint=checkpoint, sizes=sizes, steps=steps, dtype=dtype,
                  guidance=fluxnb.generation_settings(recipe.model_id)["guidance"],  # 3.5 for FLUX.1-dev, 1.0 for klein
                  tracker=MemoryTracker(interval_s=sample_interval_s))
    if partial_json is not None:
        ctx.on_size_done = lambda: partial_json.write_text(json.dumps(dict(
            _measured(result, ctx), error=INCOMPLETE), indent=1) + "\n")
    try:
        recipe.run(ctx)
        result["ok"] = all(s["latents_finite"] for s in ctx.sizes_out)  # True for a load-only recipe
        if not result["ok"]:
            result["error"] = "non-finite latents"
    except Exception as err:  # recorded with its stage and re-reported by the exit code, not hidden
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        result["failed_stage"] = ctx.tracker.records[-1].stage if ctx.tracker.records else None
        traceback.print_exc()
    return _measured(result, ctx)


INCOMPLETE = "incomplete: the worker ended before the recipe finished"


def _measured(result: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """``result`` with what the context has recorded so far: sizes, stages, peaks, load/compile times."""
    stages = [r.as_dict() for r in ctx.tracker.records]
    return dict(result, sizes=list(ctx.sizes_out), stages=stages, peaks=peaks(stages),
                **{k: ctx.extra.get(k) for k in TIME_FIELDS}, info=ctx.extra.get("info"),
                **{k: ctx.extra[k] for k in EXTRA_FIELDS if k in ctx.extra})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, type=parse_sizes)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="override the recipe's compute dtype")
    parser.add_argument("--vram-gib", type=float, help="cap VRAM (context included) to rehearse a smaller card")
    parser.add_argument("--sample-interval", type=float, default=0.01,
                        help="seconds between the memory sampler's readings (it shares the GIL with the run)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args.recipe, args.checkpoint, args.sizes, args.steps, args.dtype, args.vram_gib,
                 args.sample_interval, partial_json=args.json)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
