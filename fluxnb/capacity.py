"""How much GPU memory FLUX.1's stages need, from the course's committed measurements.

The one place that answers "does it fit?": how much a denoising step needs on top of the loaded
weights, a VAE decode (whole, or in tiles), a step cache, and so how many transformer blocks must
stream from host RAM for a size to fit (:func:`fluxnb.streaming.resident_blocks` counts them); and, per recipe, the peak VRAM of a
whole image (:func:`estimate_vram_gib`, which :func:`fluxnb.check_size_fits` and the OOM advice use); and
"what should I try next?" when one ran out of memory (:func:`next_recipe`, walking the course's recipes
down from the most VRAM to the least and naming each one's script from :data:`fluxnb.recipes.RECIPES`).

Every number comes from :data:`CAPACITY` (``fluxnb/results/capacity.json``), which
``python -m fluxnb.capacity`` writes from the committed benchmark results
(``benchmarks/results/h100.json`` and ``h100-offload.json``: random-dev, the real FLUX.1-dev shapes,
allocator figures); ``tests/test_capacity.py`` fails if it is stale. What a stage needs beyond the
weights is allocated memory plus the allocator's slack (reserved but not allocated, measured at the
same stage), plus :data:`MARGIN_GIB` for what moves between runs and drivers. They are estimates of
the same machine's behaviour elsewhere: linear fits between two measured sizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from fluxnb.recipes import how_to_run

GIB = 1024**3  # the one definition: fluxnb counts memory in GiB, as PyTorch's messages do
CAPACITY = Path(__file__).parent / "results" / "capacity.json"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARGIN_GIB = 0.2  # VRAM a plan leaves free: peaks move by a few hundred MiB between runs and drivers
TIGHT_GIB = 0.5  # a measured run with less to spare is called tight: another program opening on the GPU could push it over
TEXT_TOKENS = 512  # FLUX.1-dev's T5 sequence (schnell: 256): part of every step's tokens
# The recipes with a size model, from the most VRAM to the least: the ladder :func:`next_recipe` walks down.
SIZE_MODEL_RECIPES = ("bf16-resident", "staged-nf4-expandable", "staged-nf4-fp16", "nf4-model-offload")
STREAMING_RECIPES = ("staged-nf4-expandable", "staged-nf4-fp16")  # notebooks 03-04 stream blocks when short
_SIZED = re.compile(r"(.*?)(\d+)x(\d+)(.*)$")


def tokens(height: int, width: int, text_tokens: int = TEXT_TOKENS) -> int:
    """The sequence FLUX's transformer runs on: one token per 16x16 pixels, plus the prompt's T5 tokens."""
    return (height // 16) * (width // 16) + text_tokens


# --- the generator: committed results -> capacity.json -------------------------------------------


def _stages(run: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {stage["stage"]: stage for stage in run["stages"]}


def _sized(run: Mapping[str, Any], phase: str, suffix: str = "") -> list[tuple[int, int, dict[str, float]]]:
    """The stages named "<phase> HxW<suffix>", in the order they ran: (height, width, stage)."""
    found = []
    for stage in run["stages"]:
        match = _SIZED.match(stage["stage"])
        if match and match.group(1).strip() == phase and match.group(4).strip() == suffix:
            found.append((int(match.group(2)), int(match.group(3)), stage))
    return found


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Intercept and slope through two measured points."""
    (x0, y0), (x1, y1) = sorted(points)[:2]
    slope = (y1 - y0) / (x1 - x0)
    return y0 - slope * x0, slope


def size_model_from_benchmarks(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per recipe, how its peak VRAM grows with the image size, from ``benchmarks/results/h100.json``.

    Each recipe was measured at two sizes. A stage named by a size ("denoise 1024x1024", "decode ...")
    is fitted as ``a + b * pixels`` (activations grow with the pixel count); the other stages (loading,
    encoding) do not depend on the size. ``overhead_gib``: the device-level peak minus the allocated
    peak (CUDA context, allocator cache).
    """
    model: dict[str, Any] = {}
    for name in SIZE_MODEL_RECIPES:
        run = results["recipes"][name]
        fixed = 0.0
        points: dict[str, dict[int, float]] = {}
        for stage in run["stages"]:
            match = _SIZED.match(stage["stage"])
            if match:
                phase = match.group(1).strip().replace("warm-up", "denoise").replace("generate", "denoise")
                pixels = int(match.group(2)) * int(match.group(3))
                points.setdefault(phase, {})[pixels] = max(points.get(phase, {}).get(pixels, 0.0),
                                                           stage["vram_allocated_gib"])
            else:
                fixed = max(fixed, stage["vram_allocated_gib"])
        phases = {}
        for phase, by_pixels in points.items():
            at_0, slope = _line(list(by_pixels.items()))
            phases[phase] = {"gib_at_0": round(at_0, 4), "gib_per_megapixel": round(slope * 1e6, 4)}
        model[name] = {
            "compute_dtype": run["compute_dtype"], "fixed_gib": fixed, "phases": phases,
            "overhead_gib": round(run["peaks"]["vram_device_gib"] - run["peaks"]["vram_allocated_gib"], 3),
        }
    return model


def needs_from_benchmarks(main: Mapping[str, Any], offload: Mapping[str, Any]) -> dict[str, Any]:
    """What a step, a decode and a step cache need beyond the loaded weights, from the committed runs.

    * step: ``nf4-resident`` (the NF4 transformer and the VAE resident, bf16): allocated memory over
      the loaded model at two sizes, linear in tokens; slack = reserved - allocated at the step;
    * decode next to the loaded transformer (the Studio): the same run's decode stages, linear in pixels;
    * decode in 512-pixel tiles: ``vae-tiling``, over the VAE's own weights, the largest measured;
    * all blocks streamed: what stays on the GPU (``nf4-streamed``: slots, the non-block layers, the VAE);
    * step caches: each ``staged-nf4-cache-*`` run's denoise over ``staged-nf4-steps``' at 1024x1024,
      per 1000 tokens (the caches keep activations of every block: they grow with the sequence).
    """
    resident = offload["recipes"]["nf4-resident"]
    stages = _stages(resident)
    loaded = next(s for name, s in stages.items() if name.startswith("load NF4 transformer"))
    steps = _sized(resident, "denoise")
    at_0, per_token = _line([(tokens(h, w), s["vram_allocated_gib"] - loaded["vram_allocated_gib"]) for h, w, s in steps])
    biggest = max(steps, key=lambda hws: hws[0] * hws[1])[2]
    decodes = _sized(resident, "decode")
    decode_0, per_pixel = _line([(h * w, s["vram_allocated_gib"] - loaded["vram_allocated_gib"]) for h, w, s in decodes])
    first_decode = decodes[0][2]  # later, smaller decodes reuse what the allocator kept from it
    tiling = offload["recipes"]["vae-tiling"]
    plain = _sized(tiling, "decode", "(plain)")
    h0, w0, plain_stage = min(plain, key=lambda hws: hws[0] * hws[1])
    vae_weights = plain_stage["vram_allocated_gib"] - (decode_0 + per_pixel * h0 * w0)
    tiled = _sized(tiling, "decode", "(512-pixel tiles)")
    tiled_need = max(s["vram_allocated_gib"] - vae_weights for _, _, s in tiled)
    tiled_slack = max(s["vram_reserved_gib"] - s["vram_allocated_gib"] for _, _, s in tiled)
    streamed = offload["recipes"]["nf4-streamed"]
    streamed_load = next(s for name, s in _stages(streamed).items() if name.startswith("load NF4 transformer"))
    reference = {h * w: s["vram_allocated_gib"] for h, w, s in _sized(main["recipes"]["staged-nf4-steps"], "denoise")}
    caches = {}
    for name, run in main["recipes"].items():
        if name.startswith("staged-nf4-cache-"):
            h, w, stage = _sized(run, "denoise")[0]
            caches[name.removeprefix("staged-nf4-cache-")] = round(
                max(0.0, stage["vram_allocated_gib"] - reference[h * w]) / tokens(h, w) * 1000, 4)
    return {
        "step": {"gib_at_0": round(at_0, 4), "gib_per_1000_tokens": round(per_token * 1000, 4),
                 "slack_gib": round(biggest["vram_reserved_gib"] - biggest["vram_allocated_gib"], 3)},
        "decode": {"gib_at_0": round(decode_0, 4), "gib_per_megapixel": round(per_pixel * 1e6, 4),
                   "slack_gib": round(first_decode["vram_reserved_gib"] - first_decode["vram_allocated_gib"], 3)},
        "decode_tiled": {"gib": round(tiled_need, 3), "slack_gib": round(tiled_slack, 3), "tile_pixels": 512},
        "vae_gib": round(vae_weights, 3),
        "all_streamed_resident_gib": streamed_load["vram_allocated_gib"],
        "cache_gib_per_1000_tokens": dict(sorted(caches.items())),
    }


def from_benchmarks(main: Mapping[str, Any], offload: Mapping[str, Any]) -> dict[str, Any]:
    """All of :data:`CAPACITY`: the recipes' size model and the stages' needs."""
    return {"source": "benchmarks/results/h100.json, benchmarks/results/h100-offload.json (python -m fluxnb.capacity)",
            "measured": {"gpu": main["provenance"]["gpu"], "date": main["provenance"]["date"][:10]},
            "recipes": size_model_from_benchmarks(main), "needs": needs_from_benchmarks(main, offload)}


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(CAPACITY.read_text())


def _needs() -> dict[str, Any]:
    return _data()["needs"]


# --- what a stage needs --------------------------------------------------------------------------


def step_bytes(height: int, width: int, text_tokens: int = TEXT_TOKENS) -> int:
    """VRAM a FLUX denoising step needs on top of the loaded weights: activations and attention (linear
    in tokens), the allocator's slack, and :data:`MARGIN_GIB`."""
    step = _needs()["step"]
    gib = step["gib_at_0"] + step["gib_per_1000_tokens"] * tokens(height, width, text_tokens) / 1000
    return int((gib + step["slack_gib"] + MARGIN_GIB) * GIB)


def decode_bytes(height: int, width: int, tiled: bool = False) -> int:
    """VRAM the VAE's decode of a ``height`` x ``width`` image needs on top of the loaded weights:
    whole (activations grow with the pixels), or in 512-pixel tiles (about constant)."""
    needs = _needs()
    if tiled:
        gib = needs["decode_tiled"]["gib"] + needs["decode_tiled"]["slack_gib"]
    else:
        decode = needs["decode"]
        gib = decode["gib_at_0"] + decode["gib_per_megapixel"] * height * width / 1e6 + decode["slack_gib"]
    return int((gib + MARGIN_GIB) * GIB)


def cache_bytes(name: str, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> int:
    """VRAM step cache ``name`` (``fluxnb.faster.CACHES``) keeps on top of an uncached step."""
    per_1000 = _needs()["cache_gib_per_1000_tokens"][name]
    return int(per_1000 * tokens(height, width, text_tokens) / 1000 * GIB)


def all_streamed_resident_bytes() -> int:
    """What stays on the GPU when every transformer block streams: two block slots, the layers that are
    not blocks, and the VAE (the NF4 transformer of FLUX.1's shapes)."""
    return int(_needs()["all_streamed_resident_gib"] * GIB)


# --- a whole image, per recipe (the course's recipes) ---------------------------------------------


def estimate_vram_gib(recipe: str, height: int, width: int, stream_blocks: bool = True) -> float:
    """Peak VRAM (GiB, device level) that ``recipe`` needs for one ``height`` x ``width`` image with
    FLUX.1-dev's shapes (an estimate: the fit is linear in pixels between and beyond the two measured sizes).

    ``stream_blocks``: the course's staged flow (:data:`STREAMING_RECIPES`) streams transformer blocks
    from host RAM when a step does not fit next to them (:func:`fluxnb.blocks_to_keep`, notebook 08), so
    its denoising step needs the loaded model's VRAM minus the streamable blocks (at most all of them).
    Loading the transformer whole is then what limits the card.
    """
    entry = _data()["recipes"][recipe]
    pixels = height * width
    sized = {name: p["gib_at_0"] + p["gib_per_megapixel"] * pixels / 1e6 for name, p in entry["phases"].items()}
    if stream_blocks and recipe in STREAMING_RECIPES and "denoise" in sized:
        streamed = sized["denoise"] - (entry["fixed_gib"] - _needs()["all_streamed_resident_gib"])
        sized["denoise"] = min(sized["denoise"], max(streamed, entry["fixed_gib"]))
    return max([entry["fixed_gib"], *sized.values()]) + entry["overhead_gib"]


def recipe_dtype(recipe: str) -> str:
    """The compute dtype a recipe was measured in (``"torch.bfloat16"``, ``"torch.float16"``)."""
    return str(_data()["recipes"][recipe]["compute_dtype"])


def largest_size_where(height: int, width: int, fits: Callable[[int, int], bool],
                       start_percent: int = 99) -> tuple[int, int] | None:
    """The largest size with about the aspect ratio of ``height`` x ``width`` (multiples of 16, at least 256
    pixels a side, from ``start_percent`` of it down) for which ``fits(h, w)``; None if none does."""
    for scale in [s / 100 for s in range(start_percent, 0, -1)]:
        h, w = max(16, int(height * scale) // 16 * 16), max(16, int(width * scale) // 16 * 16)
        if min(h, w) < 256:
            return None
        if fits(h, w):
            return h, w
    return None


def largest_size_that_fits(recipe: str, height: int, width: int, vram_gib: float) -> tuple[int, int] | None:
    """The largest size with about the aspect ratio of ``height`` x ``width`` (multiples of 16) that
    :func:`estimate_vram_gib` puts within ``vram_gib``; None if not even 256 px a side fits."""
    return largest_size_where(height, width, lambda h, w: estimate_vram_gib(recipe, h, w) <= vram_gib)


def next_recipe(recipe: str, height: int, width: int, vram_gib: float, bf16: bool = True) -> str:
    """What to try after ``recipe`` ran out of memory at ``height`` x ``width`` on a GPU of ``vram_gib``, in words.

    The first recipe after ``recipe`` in :data:`SIZE_MODEL_RECIPES` whose estimated peak fits, and that
    computes in a dtype the GPU has (no bf16 recipe without ``bf16``: a T4), named by its script
    (:func:`fluxnb.recipes.how_to_run`); if none fits, the last one at the largest size that does. The
    estimates leave block streaming out: the recipe that failed may already have streamed.

    This, not :func:`fluxnb.planner.plan`, answers an out-of-memory error: the planner ranks whole
    measured runs at the sizes the benchmark ran, this model covers any size.
    """
    names = list(SIZE_MODEL_RECIPES)
    start = names.index(recipe) + 1 if recipe in names else 0
    for name in names[start:]:
        if recipe_dtype(name) == "torch.bfloat16" and not bf16:
            continue  # a T4 has no bf16
        need = estimate_vram_gib(name, height, width, stream_blocks=False)
        if need <= vram_gib:
            return f"{how_to_run(name)}, estimated {need:.1f} GiB at {height}x{width}"
    fits = largest_size_that_fits(names[-1], height, width, vram_gib)
    size = f"at {fits[0]}x{fits[1]}" if fits else "at a much smaller size"
    return f"{how_to_run(names[-1])} {size} (no recipe in the course's list fits {height}x{width} here)"


def course_recipe(dtype: Any = None) -> str:
    """The size model's name for the course's staged NF4 flow in ``dtype`` (fp16: as on a T4)."""
    import torch

    return "staged-nf4-fp16" if dtype == torch.float16 else "staged-nf4-expandable"


def main() -> None:
    """Regenerate :data:`CAPACITY` from the committed benchmark results."""
    main_results = json.loads((BENCHMARKS / "h100.json").read_text())
    offload = json.loads((BENCHMARKS / "h100-offload.json").read_text())
    CAPACITY.write_text(json.dumps(from_benchmarks(main_results, offload), indent=1) + "\n")
    print("wrote", CAPACITY)


if __name__ == "__main__":
    main()
