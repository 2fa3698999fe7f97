"""Which recipe should *this* machine run? The fastest measured one that fits, from committed results.

    python -m fluxnb.planner                      # this machine
    python -m fluxnb.planner --vram 14.74 --ram 12 --no-bf16     # a free Colab T4
    python -m fluxnb.planner --vram 7.6 --ram 16                  # an 8 GB card with a desktop

The answer is read from ``fluxnb/results/recipes.json`` (shipped with fluxnb, so a Colab install has
it), which ``python -m benchmarks report`` generates from the benchmark's results: every recipe ran on
the real FLUX.1-dev shapes with random weights, so its memory and speed are real, its image quality
unknown. A recipe fits when its measured device-level VRAM peak (CUDA context included; per GPU for a
multi-GPU recipe) plus a 0.2 GiB margin is at most this card's VRAM, its host RAM peak at most this machine's RAM, it needs
no more GPUs than there are, and it computed in a dtype this GPU has (no bf16 on a T4: fp16 rows only).
Speeds were measured on the GPU each row names; on another GPU they are scaled by a rough ratio of
peak tensor FLOPS, and say so. Where the recipe picked has a copy-paste script, the plan names it
(:data:`fluxnb.recipes.RECIPES`).

Each row is a recipe of one model: FLUX.1 (the rows without ``model``) or FLUX.2 [klein] 4B (``"model":
"klein"``, the benchmark's ``klein-*`` rows, notebook 12). ``model=`` (``--model klein``) picks whose rows are
read; FLUX.1 is the default. A model with no measured rows says so: no number is made up.

The planner answers "which recipe should this machine run?" at a measured size; "this ran out of
memory: what next?" at any size is :func:`fluxnb.capacity.next_recipe`'s (the errors ask it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxnb import recipes  # the one table of recipes: the script of the one picked
from fluxnb.capacity import MARGIN_GIB, tokens

RECIPES_JSON = Path(__file__).resolve().parent / "results" / "recipes.json"
T4 = "Tesla T4"  # a free Colab GPU, as torch.cuda.get_device_name names it
DEFAULT_SOURCE = "the benchmark's GPU"

# Dense fp16/bf16 tensor-core TFLOPS (fp32 accumulate) from the vendors' datasheets: a rough guide to
# how much slower a step is than where it was measured, nothing more. FLUX's NF4 steps also depend on
# memory bandwidth and bitsandbytes' kernels, so a real step is usually slower than this ratio says.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "T4": 65.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "A10": 125.0}


MODELS = {"flux1": "FLUX.1", "klein": "FLUX.2 [klein]"}  # a row's "model" (absent: "flux1"), and its name in prose
STEP_RECIPES = {  # (model, bf16): the measured recipes step_seconds reads, the first with two sizes measured
    ("flux1", True): ("staged-nf4",), ("flux1", False): ("staged-nf4-fp16",),
    ("klein", True): ("klein-bf16",), ("klein", False): ("klein-fp16-encoder4bit", "klein-fp16"),
}


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, not {model!r}")


def rows_of(data: dict[str, Any], model: str = "flux1") -> list[dict[str, Any]]:
    """The measured recipe rows of ``model`` (``"flux1"`` or ``"klein"``) in ``data``."""
    _check_model(model)
    return [r for r in data["recipes"] if r.get("model", "flux1") == model]


def load_recipes(path: str | Path | None = None) -> dict[str, Any]:
    """The measured recipes and course runs (``fluxnb/results/recipes.json`` unless ``path``)."""
    path = Path(path) if path is not None else RECIPES_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m benchmarks report` to generate it from "
                                "benchmarks/results/*.json, or reinstall fluxnb.")
    return json.loads(path.read_text())


def peak_tflops(gpu_name: str | None) -> float | None:
    """The datasheet figure for a GPU named like ``NVIDIA H100 80GB HBM3`` or ``Tesla T4``; None if unknown."""
    if not gpu_name:
        return None
    words = gpu_name.upper().replace("-", " ").split()  # "NVIDIA A100-SXM4-40GB" -> [..., "A100", "SXM4", ...]
    text = " ".join(words)
    for key, tflops in PEAK_TFLOPS.items():
        if (key in words) or (" " in key and f" {key} " in f" {text} "):
            return tflops
    return None


@dataclass
class Plan:
    """The planner's answer: the recipe (a row of recipes.json) or None, and the sentences that explain it."""

    machine: dict[str, Any]
    recipe: dict[str, Any] | None
    fitting: list[dict[str, Any]] = field(default_factory=list)  # every row that fits, fastest first
    smallest: dict[str, Any] | None = None  # when nothing fits: the row needing the least VRAM
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.recipe is not None

    def __str__(self) -> str:
        return "\n".join(self.notes)


def _per_image_step(row: dict[str, Any]) -> float:
    """Seconds per step per image: two pipelines making two images at once halve it."""
    return row["s_per_step"] / row.get("images_at_once", 1)


def _why_not(row: dict[str, Any], vram: float | None, ram: float | None, gpus: int, bf16: bool,
             margin: float) -> str | None:
    if row["gpus"] > gpus:
        return f"needs {row['gpus']} GPUs"
    if vram is None:
        return "needs a GPU"
    if row["vram_peak_gib"] + margin > vram:
        return f"needs {row['vram_peak_gib']:.2f} GiB of VRAM"
    if ram is not None and row["ram_peak_gib"] is not None and row["ram_peak_gib"] > ram:
        return f"needs {row['ram_peak_gib']:.2f} GiB of host RAM"
    if row["compute"] == "bfloat16" and not bf16:
        return "computes in bf16, which this GPU lacks"
    return None


def scaled_seconds(seconds: float, measured_on: str | None, gpu_name: str | None) -> float | None:
    """``seconds`` measured on one GPU, scaled to another by their datasheet tensor FLOPS (a rough
    guide); None where either GPU is not in :data:`PEAK_TFLOPS`."""
    there, here = peak_tflops(measured_on), peak_tflops(gpu_name)
    return None if there is None or here is None else seconds * there / here


def _speed_note(row: dict[str, Any], gpu_name: str | None) -> str:
    """s/step where it was measured, and a rough figure for this GPU where the two differ."""
    text = f"{row['s_per_step']:.3f} s/step measured on {row['gpu']} ({row['date']})"
    if row.get("images_at_once", 1) > 1:
        text += f" for {row['images_at_once']} images at once"
    if not gpu_name or gpu_name == row["gpu"]:
        return text
    guess = scaled_seconds(row["s_per_step"], row["gpu"], gpu_name)
    if guess is None:
        return text + f"; your {gpu_name} is not in fluxnb's table of GPUs, so no estimate: time a step with StepTimer"
    return (text + f"; on your {gpu_name} roughly {guess:.2f} s/step or slower (scaled by datasheet tensor "
            f"FLOPS {peak_tflops(row['gpu']):g}/{peak_tflops(gpu_name):g}, a rough guide: measure it with StepTimer)")


def plan(vram_gib: float | None = None, ram_gib: float | None = None, gpu_count: int | None = None,
         bf16: bool | None = None, gpu_name: str | None = None, size: str = "1024x1024",
         data: dict[str, Any] | None = None, allow_approximate: bool = False, allow_compile: bool = False,
         margin_gib: float = MARGIN_GIB, model: str = "flux1") -> Plan:
    """The fastest measured recipe at ``size`` that fits the machine; by default this machine.

    Arguments left as None are read from :func:`fluxnb.machine_info` (inside a course envelope, the
    target's VRAM, RAM and bf16). ``vram_gib`` is what PyTorch sees for the whole card (CUDA context
    included), per GPU; a recipe fits with ``margin_gib`` to spare (allocator fragmentation differs
    between runs). Compiled recipes are extras on top of a recipe (a compile per process and image
    size first; notebook 09), named after the choice, and ranked only with ``allow_compile``.
    Step-caching recipes change the model's outputs, so they are left out unless ``allow_approximate``.
    ``data`` replaces the shipped results (tests pass a fixture). ``model``: whose recipes, ``"flux1"`` or
    ``"klein"`` (FLUX.2 [klein] 4B); with none of its recipes measured yet the plan says so and picks nothing.
    """
    _check_model(model)
    if None in (vram_gib, ram_gib, gpu_count, bf16):
        from fluxnb.environment import machine_info

        info = machine_info()
        vram_gib = info.vram_gib if vram_gib is None and info.gpu_count else vram_gib
        ram_gib = info.ram_gib if ram_gib is None else ram_gib
        gpu_count = info.gpu_count if gpu_count is None else gpu_count
        bf16 = info.bf16_supported if bf16 is None else bf16
        gpu_name = gpu_name or info.gpu_name
    if gpu_count == 0:
        vram_gib = None
    data = load_recipes() if data is None else data
    machine = dict(vram_gib=vram_gib, ram_gib=ram_gib, gpu_count=gpu_count, bf16=bf16, gpu_name=gpu_name, size=size,
                   model=model)
    of_model = rows_of(data, model)
    if not of_model:  # e.g. FLUX.2 [klein] before its benchmark rows are committed
        return Plan(machine, None, notes=[
            f"No {MODELS[model]} recipe has been measured yet (fluxnb/results/recipes.json has no row of it), so "
            "there is nothing to choose from and no time to give: `python -m benchmarks run --recipes "
            + ",".join(n for (m, _), names in STEP_RECIPES.items() if m == model for n in names)
            + "` on a GPU measures them, `python -m fluxnb.fit --model klein` checks this machine."])
    measured = [r for r in of_model if r["size"] == size and (allow_approximate or r["exact"])]
    rows = [r for r in measured if allow_compile or not r.get("compile_s")]
    if not rows:
        sizes = sorted({r["size"] for r in of_model})
        raise ValueError(f"no measured recipe at size {size!r}: measured sizes are {', '.join(sizes)}.")
    def fit(r: dict[str, Any]) -> bool:
        return _why_not(r, vram_gib, ram_gib, gpu_count or 0, bool(bf16), margin_gib) is None

    fitting = sorted(filter(fit, rows), key=_per_image_step)
    where = (f"{gpu_count} x " if gpu_count and gpu_count > 1 else "") + (
        f"{gpu_name or 'GPU'} with {vram_gib:.2f} GiB" if vram_gib is not None else "no GPU")
    precision = "" if vram_gib is None else (", bf16" if bf16 else ", no bf16: fp16")
    head = f"On this machine ({where}, {ram_gib:.1f} GiB host RAM{precision}), at {size}:"
    if not fitting:
        smallest = min((r for r in rows if r["gpus"] <= max(gpu_count or 1, 1)), key=lambda r: r["vram_peak_gib"])
        short = (f"{smallest['vram_peak_gib'] - vram_gib:.2f} GiB more VRAM than this GPU has, and fluxnb asks "
                 f"{margin_gib:g} GiB to spare" if vram_gib is not None else "a GPU")
        notes = [head, f"nothing measured fits: the smallest, `{smallest['recipe']}`, needs "
                       f"{smallest['vram_peak_gib']:.2f} GiB of VRAM and {smallest['ram_peak_gib']:.2f} GiB of host RAM "
                       f"({short}).",
                 "Next: a smaller image, offloading more to the CPU, or a larger GPU (a free Colab T4 fits the "
                 "course); without a GPU, the tiny stand-in (FLUXNB_CHECKPOINT=tiny) teaches every step on the CPU."]
        return Plan(machine, None, [], smallest, notes)
    best = fitting[0]
    vram_left = vram_gib - best["vram_peak_gib"]
    notes = [head, f"fastest measured recipe that fits: `{best['recipe']}` ({best['description']}); "
                   f"{_speed_note(best, gpu_name)}.",
             f"expected peaks: {best['vram_peak_gib']:.2f} GiB VRAM" + (" per GPU" if best["gpus"] > 1 else "")
             + f" (CUDA context included; {vram_left:.2f} GiB to spare), {best['ram_peak_gib']:.2f} GiB host RAM."]
    script = recipes.RECIPES[best["recipe"]].script if best["recipe"] in recipes.RECIPES else None
    if script:
        notes.append(f"the same recipe as one copy-paste script: `{script}` (in the course's repository).")
    if best.get("compile_s"):
        notes.append(f"it compiles first: {best['compile_s']:.0f} s once per process on {best['gpu']} (notebook 09 "
                     "says when that pays off).")
    compiled = sorted((r for r in measured if r.get("compile_s") and r not in fitting and fit(r)), key=_per_image_step)
    if compiled and not allow_compile and compiled[0]["s_per_step"] < best["s_per_step"]:
        c = compiled[0]
        notes.append(f"faster with torch.compile: `{c['recipe']}` {c['s_per_step']:.3f} s/step after {c['compile_s']:.0f} s "
                     f"of compiling, peak {c['vram_peak_gib']:.2f} GiB (notebook 09).")
    if best["compute"] == "float16" and model == "flux1":
        notes.append("measured in fp16, as this GPU computes (no bf16): the text encoders run in fp32 (notebook 01).")
    if best.get("upper_bound"):
        notes.append("the VRAM peak at this size is an upper bound (measured after a larger size in the same process).")
    if len(fitting) > 1:
        notes.append("also fitting: " + ", ".join(f"`{r['recipe']}` {r['s_per_step']:.3f} s/step" for r in fitting[1:4])
                     + ("" if len(fitting) <= 4 else f", and {len(fitting) - 4} more") + ".")
    for run in data.get("course", []) if model == "flux1" else ():  # the course runs are FLUX.1's notebooks
        if vram_gib >= run["vram_gib"] and ram_gib >= run["ram_gib"] and (bf16 or not run["bf16"]):
            names = run.get("notebook_names")
            which = f"notebooks {', '.join(names)}" if names else f"{run['notebooks']} notebooks"
            verdict = (f"all {run['notebooks']} passed" if not run["failed"]
                       else f"{run['passed']} of {run['notebooks']} passed ({', '.join(run['failed'])} did not)")
            notes.append(f"the course inside the `{run['envelope']}` envelope ({run['vram_gib']} GiB, "
                         f"{run['ram_gib']} GiB RAM, a machine no larger than this one), {which}, each in its "
                         f"latest run: {verdict} (measured {run['date']} on {run['gpu']}).")
    return Plan(machine, best, fitting, None, notes)


def step_seconds(height: int, width: int, gpu_name: str | None, bf16: bool = True,
                 data: dict[str, Any] | None = None, model: str = "flux1") -> float | None:
    """An estimate of one denoising step of ``model`` at ``height`` x ``width`` on ``gpu_name``.

    FLUX.1 (``model="flux1"``): from the course's measured staged NF4 recipe (``staged-nf4``, or
    ``staged-nf4-fp16`` without bf16). FLUX.2 [klein] (``"klein"``): from ``klein-bf16``, or without bf16
    ``klein-fp16-encoder4bit`` (the T4 path), else ``klein-fp16`` (:data:`STEP_RECIPES`). At the recipe's two
    measured sizes, linear in tokens, scaled by datasheet tensor FLOPS to ``gpu_name`` (:func:`peak_tflops`):
    a rough guide, usually optimistic for small GPUs. None for a GPU not in the table (or none at all), and
    where the recipe is not measured at two sizes (klein's, until its benchmark rows are committed)."""
    _check_model(model)
    data = load_recipes() if data is None else data
    rows: list[dict[str, Any]] = []
    for name in STEP_RECIPES[(model, bool(bf16))]:
        rows = [r for r in rows_of(data, model) if r["recipe"] == name]
        if len(rows) >= 2:
            break
    if len(rows) < 2:
        return None
    points = sorted((tokens(*map(int, r["size"].split("x"))), r["s_per_step"]) for r in rows)[:2]
    (t0, s0), (t1, s1) = points
    measured = s0 + (s1 - s0) / (t1 - t0) * (tokens(height, width) - t0)
    return scaled_seconds(max(measured, 0.001), rows[0]["gpu"], gpu_name)


def _about(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    return "about " + (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min")


def eta(steps: int, height: int, width: int, what: str = "this cell", data: dict[str, Any] | None = None,
        model: str = "flux1") -> str:
    """One line to print before a cell that denoises ``steps`` steps at ``height`` x ``width``: about how long
    it takes on this GPU and on a free Colab T4, said to be an estimate (:func:`step_seconds`).

    ``model``: ``"flux1"`` (FLUX.1's staged NF4 rows) or ``"klein"`` (FLUX.2 [klein]'s rows, notebook 12:
    ``eta(4, 1024, 1024, what="the 4 denoising steps", model="klein")``). Where no step of it is measured, the
    line says that a T4 time is not known yet."""
    import torch

    _check_model(model)
    data = load_recipes() if data is None else data
    t4 = step_seconds(height, width, T4, bf16=False, data=data, model=model)
    unknown = "a T4 time is not known" if model == "flux1" else "a T4 time is not known yet"
    on_t4 = f"{_about(steps * t4)} on a free Colab T4" if t4 else unknown
    names = [n for (m, _), recipes_ in STEP_RECIPES.items() if m == model for n in recipes_]
    source = next((r["gpu"] for name in names for r in rows_of(data, model) if r["recipe"] == name), None)
    if model == "flux1":
        how = f"estimates from the course's measured steps on {source or DEFAULT_SOURCE}, scaled by datasheet FLOPS"
    elif source is None:
        how = "no FLUX.2 [klein] step is measured in fluxnb's results yet"
    else:
        how = f"estimates from FLUX.2 [klein]'s measured steps on {source}, scaled by datasheet FLOPS"
    if not torch.cuda.is_available():
        return (f"{what}: {steps} steps at {height}x{width} (height x width): {on_t4} with {MODELS[model]} ({how}); "
                "here, without a GPU, the tiny stand-in takes seconds.")
    from fluxnb.environment import bf16_supported

    gpu = torch.cuda.get_device_name(0)
    here = step_seconds(height, width, gpu, bf16=bf16_supported(), data=data, model=model)
    on_here = f"{_about(steps * here)} on this {gpu}" if here else f"no estimate for this {gpu}"
    return f"{what}: {steps} steps at {height}x{width} (height x width): {on_here}, {on_t4} ({how})."


def advice(**kwargs: Any) -> str:
    """:func:`plan` as text, for a notebook cell or an out-of-memory message."""
    return str(plan(**kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxnb.planner", description=__doc__.split("\n")[0])
    parser.add_argument("--vram", type=float, help="GiB of VRAM per GPU, CUDA context included (default: this GPU)")
    parser.add_argument("--ram", type=float, help="GiB of host RAM (default: this machine)")
    parser.add_argument("--gpus", type=int, help="number of GPUs (default: this machine)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="does the GPU compute in bf16 (default: this GPU; --no-bf16 for a T4)")
    parser.add_argument("--gpu-name", help="e.g. 'Tesla T4', for a rough speed estimate")
    parser.add_argument("--size", default="1024x1024", help="height x width, as measured (default 1024x1024)")
    parser.add_argument("--approximate", action="store_true", help="include step-caching recipes")
    parser.add_argument("--compile", action="store_true", help="rank torch.compile recipes too")
    parser.add_argument("--model", choices=sorted(MODELS), default="flux1",
                        help="whose recipes: flux1 (FLUX.1, default) or klein (FLUX.2 [klein] 4B, notebook 12)")
    ns = parser.parse_args(argv)
    if ns.vram is not None and ns.bf16 is None:
        parser.error("with --vram, say whether that GPU has bf16: --bf16 (Ampere or newer) or --no-bf16 (a T4)")
    result = plan(ns.vram, ns.ram, ns.gpus if ns.gpus is not None else (1 if ns.vram is not None else None), ns.bf16,
                  ns.gpu_name, ns.size, allow_approximate=ns.approximate, allow_compile=ns.compile, model=ns.model)
    print(result)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
