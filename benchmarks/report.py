"""Turn a results JSON into the markdown tables, the PNG chart, ``docs/results.md`` (every measured
table, written whole), README's short summary of it, and the marked sections of notebook 04. Nothing
here is typed by hand: rerun ``python -m benchmarks report`` after a run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fluxnb.envelopes import committed_runs

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- fluxnb:benchmark-table:start -->", "<!-- fluxnb:benchmark-table:end -->"
COURSE_START, COURSE_END = "<!-- fluxnb:course-table:start -->", "<!-- fluxnb:course-table:end -->"
SUMMARY_START, SUMMARY_END = "<!-- fluxnb:summary:start -->", "<!-- fluxnb:summary:end -->"
COURSE_RESULTS = ROOT / "fluxnb" / "results"  # package data: notebook 00 reads them on Colab too
RESULTS_DOC = ROOT / "docs" / "results.md"  # every measured table, generated whole
KLEIN_PREFIX = "klein-"  # FLUX.2 [klein] 4B's recipes (benchmarks/recipes.py): a table of their own
MODEL_NAMES = {"flux1": "FLUX.1-dev", "klein": "FLUX.2-klein-4B"}
KLEIN_TABLE = "FLUX.2 [klein] 4B recipes (notebook 12)"  # the klein table's first words
SUMMARY_RECIPES = (  # README's summary: the course's recipe on each target, and what the other extremes cost
    ("staged-nf4-fp16", "a free Colab T4 (fp16)"), ("staged-nf4-expandable", "an 8 GB card (bf16)"),
    ("nf4-streamed", "the least VRAM: every block streamed"), ("bf16-resident", "a big GPU, nothing quantized"),
)


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _stage(recipe: dict[str, Any], prefix: str, height: int, width: int) -> dict[str, Any]:
    name = f"{prefix} {height}x{width}"
    return next((s for s in recipe.get("stages", []) if s["stage"] == name), {})


def gpu_name(provenance: dict[str, Any]) -> str:
    """The GPU a run was made on, as ``2x NVIDIA H200`` where the machine had several."""
    gpus = provenance.get("gpus", 1)
    return f"{gpus}x {provenance['gpu']}" if gpus > 1 else provenance["gpu"]


def model_of(name: str, recipe: dict[str, Any]) -> str:
    """``"klein"`` for a FLUX.2 [klein] recipe (``klein-*``; its result says ``model``), else ``"flux1"``."""
    return recipe.get("model") or ("klein" if name.startswith(KLEIN_PREFIX) else "flux1")


def label(results: dict[str, Any], only: str | None = None, model: str = "flux1") -> str:
    """"measured on <GPU> with random weights of the real shapes", with versions, date and command; with
    ``only``, the commands of the recipes whose names start with it (one table's own commands); ``model``:
    whose shapes (``"klein"``: FLUX.2-klein-4B's) and whose recipes' commands."""
    p = results["provenance"]
    what = ("the tiny stand-in (NOT the real shapes: a test of the harness)" if p.get("stand_in") == "tiny"
            else f"random weights of the real {MODEL_NAMES[model]} shapes")
    entries = [*(r for name, r in results.get("recipes", {}).items() if model_of(name, r) == model),
               *(results.get("envelopes", {}).values() if model == "flux1" else ())]
    if only is not None:
        entries = [e for name, e in results.get("recipes", {}).items() if name.startswith(only)]
    commands = dict.fromkeys(e["provenance"]["command"] for e in entries if e.get("provenance")) or [p["command"]]
    from fluxnb.lab.course import versions_line

    return (f"measured on {gpu_name(p)} with {what} ({versions_line(p, ('accelerate',))}; made by "
            + "; ".join(f"`{c}`" for c in commands) + ")")


def _flow_recipes(results: dict[str, Any], model: str = "flux1") -> list[dict[str, Any]]:
    """The whole-flow recipes of ``model``: every result of it except the ``quant-*`` rows, which have their
    own table (FLUX.2 [klein]'s ``klein-*`` rows have theirs too: :func:`klein_markdown`)."""
    return [r for name, r in results["recipes"].items() if not name.startswith("quant-") and model_of(name, r) == model]


def recipes_table(results: dict[str, Any], model: str = "flux1") -> str:
    """One row per recipe and size: speed, the denoise stage's VRAM, and the whole flow's peaks."""
    head = ("| recipe | compute | size | s/step | denoise VRAM device / reserved / allocated (GiB) "
            "| flow peak VRAM device (GiB) | flow peak RAM anon (GiB) | load (s) | compile (s) | finite |")
    rows = [head, "|" + "---|" * 10]
    for r in _flow_recipes(results, model):
        if r.get("skipped"):
            rows.append(f"| {r['recipe']} | - | - | skipped: {r['skipped']} | | | | | | |")
            continue
        if r.get("ok") and not r.get("sizes"):
            continue  # a load-only recipe: reported as a sentence below the table
        if not r.get("sizes"):
            rows.append(_failure_row(r))
            continue
        for s in r["sizes"]:
            st = _stage(r, "denoise", s["height"], s["width"]) or _stage(r, "generate", s["height"], s["width"])
            vram = " / ".join(_f(st.get(k)) for k in ("vram_device_gib", "vram_reserved_gib", "vram_allocated_gib"))
            per_gpu = r.get("per_gpu_peaks_gib")  # multi-GPU: each GPU's peak instead of the runner's own view
            flow = " / ".join(_f(v) for v in per_gpu.values()) + " (per GPU)" if per_gpu else _f(r["peaks"]["vram_device_gib"])
            rows.append(
                f"| {r['recipe']} | {r['compute_dtype'].replace('torch.', '')} | {s['height']}x{s['width']} "
                f"| {_speed(r, s)} | {vram} | {flow} "
                f"| {_f(r['peaks']['ram_anon_gib'])} | {_f(r.get('load_s'), 1)} | {_f(r.get('compile_s'), 1)} "
                f"| {_f(s['latents_finite'])} |")
        if not r.get("ok"):  # some sizes measured, then it failed: say where
            rows.append(_failure_row(r))
    return "\n".join(rows)


def _failure(recipe: dict[str, Any]) -> str:
    """"failed in '<stage>': <error>", without repeating a stage the error already names."""
    error, stage = recipe.get("error") or "", recipe.get("failed_stage")
    text = error if stage and f"'{stage}'" in error else f"failed in '{stage}': {error}"
    return text[:160]


def _failure_row(recipe: dict[str, Any]) -> str:
    dtype = recipe.get("compute_dtype", "-").replace("torch.", "")
    return f"| {recipe['recipe']} | {dtype} | - | {_failure(recipe)} | | | | | | |"


def _speed(recipe: dict[str, Any], size: dict[str, Any]) -> str:
    """s/step; with repeated runs, also the range over the processes (the median run is the one shown)."""
    text = _f(size["s_per_step"], 3)
    key = f"{size['height']}x{size['width']}"
    values = [r["s_per_step"][key] for r in recipe.get("repeats", []) if key in r["s_per_step"]]
    if len(values) > 1:
        text += f" ({min(values):.3f}-{max(values):.3f}, {len(values)} runs)"
    return text


def envelopes_table(results: dict[str, Any]) -> str:
    envelopes = results.get("envelopes", {})
    if not envelopes:
        return ""
    rows = ["| envelope | VRAM cap (GiB, context incl.) | RAM cap (GiB) | compute | result | peak VRAM device (GiB) "
            "| peak RAM (GiB) | note |", "|" + "---|" * 8]
    for e in envelopes.values():
        rows.append(f"| {e['name']} | {_f(e['vram_gib'], 1)} | {_f(e['ram_gib'], 1)} "
                    f"({'cgroup' if e['ram_enforced'] else 'not enforced'}) | {e['dtype'].replace('torch.', '')} "
                    f"| {'**pass**' if e['passed'] else '**FAIL**'} | {_f(e['vram_device_peak_gib'])} "
                    f"| {_f(e['ram_peak_gib'])} | {e['reason']} |")
    return "\n".join(rows)


def ratios(results: dict[str, Any]) -> str:
    """The comparisons the course promises, as sentences computed from the same numbers."""
    rec = results["recipes"]

    def step(name: str, size: str = "1024x1024") -> float | None:
        for s in rec.get(name, {}).get("sizes", []):
            if f"{s['height']}x{s['width']}" == size:
                return s["s_per_step"]
        return None

    lines = []
    nf4, bf16 = step("staged-nf4"), step("bf16-resident")
    if nf4 and bf16:
        lines.append(f"- NF4 vs bf16 at 1024x1024: {nf4:.3f} vs {bf16:.3f} s/step, {nf4 / bf16:.2f}x.")
    for name, how in (("staged-nf4-compile", "regional (`compile_repeated_blocks`)"),
                      ("staged-nf4-compile-full", "whole model")):
        comp = step(name)
        if nf4 and comp:
            compiled = rec[name]
            per_size = ", ".join(f"{s['warmup_s']:.0f} s at {s['height']}x{s['width']}" for s in compiled["sizes"])
            lines.append(f"- torch.compile, {how}, on NF4 at 1024x1024: {comp:.3f} vs {nf4:.3f} s/step eager, "
                         f"{nf4 / comp:.2f}x faster; compile + warm-up step with empty caches: {per_size}"
                         + (f"; then **{_failure(compiled)}**." if not compiled["ok"] else "."))
    for name in ("staged-nf4", "staged-nf4-expandable"):
        staged = rec.get(name, {}).get("peaks", {}).get("vram_device_gib")
        if staged:
            lines.append(f"- `{name}` flow, device-level VRAM peak (CUDA context included): {staged:.2f} GiB.")
    base = step("staged-nf4-steps")
    for name, r in rec.items():
        if name.startswith("staged-nf4-cache-") and r.get("ok") and base:
            full = ", ".join(f"{v} of {r['steps']} steps at {k}" for k, v in (r.get("computed_steps") or {}).items())
            lines.append(f"- step cache `{r['cache']}`: {step(name):.3f} vs {base:.3f} s/step (mean over the steps, "
                         f"same command), {base / step(name):.2f}x; computed in full: {full}.")
    one, two = step("cp-bf16-1gpu"), step("cp-bf16-2gpu")
    if one and two:
        lines.append(f"- context parallel (Ulysses) on 2 GPUs, bf16, 1024x1024: {two:.3f} vs {one:.3f} s/step on 1 GPU, "
                     f"{one / two:.2f}x (target 1.6x).")
    for name in ("split-bf16-2gpu", "split-fp16-kaggle"):
        r = rec.get(name, {})
        if r.get("ok") and r.get("per_gpu_peaks_gib"):
            lines.append(f"- `{name}`: per-GPU peaks " + ", ".join(f"{k} {v:.2f} GiB" for k, v in r["per_gpu_peaks_gib"].items())
                         + f"; blocks per GPU {r.get('blocks_per_gpu')}; {step(name):.3f} s/step.")
    pair = rec.get("two-pipelines-nf4", {})
    if pair.get("ok") and step("two-pipelines-nf4"):
        per_min = pair["images_at_once"] * 60 / (50 * step("two-pipelines-nf4"))
        lines.append(f"- two NF4 pipelines on 2 GPUs: {step('two-pipelines-nf4'):.3f} s/step each, {per_min:.2f} images/minute "
                     "at 50 steps (denoising only).")
    loads = rec.get("nf4-save-reload", {})
    if loads.get("ok"):
        lines.append(f"- Loading the NF4 transformer: quantizing the bf16 shards on the fly {loads['on_the_fly_s']:.1f} s, "
                     f"from a saved NF4 checkpoint {loads['prequantized_s']:.1f} s (local disk; timed after a warm-up stage that "
                     "pays the first load's one-off costs: imports, CUDA start, bitsandbytes' kernels).")
    return "\n".join(lines)


def quant_table(results: dict[str, Any]) -> str:
    """The quantization recipes (``quant-*``) side by side, with the relative error of the transformer output
    at fixed inputs against ``quant-bf16`` from the same command; "" if there are none."""
    rows_in = {k: r for k, r in results["recipes"].items() if k.startswith("quant-")}
    if not rows_in:
        return ""
    sizes = sorted({f"{s['height']}x{s['width']}" for r in rows_in.values() for s in r.get("sizes", [])},
                   key=lambda t: -int(t.split("x")[0]) * int(t.split("x")[1]))
    head = ("| recipe | backend | weights in memory (GiB) | peak VRAM device (GiB) | peak RAM anon (GiB) | "
            + " | ".join(f"s/step {t}" for t in sizes)
            + " | load (s) | GGUF made (s) | rel. error vs bf16 | note |")
    rows = [head, "|" + "---|" * (9 + len(sizes))]
    for r in rows_in.values():
        if r.get("skipped"):
            rows.append(f"| {r['recipe']} | " + " | ".join([""] * (7 + len(sizes))) + f" | skipped: {r['skipped']} |")
            continue
        speed = {f"{s['height']}x{s['width']}": s["s_per_step"] for s in r.get("sizes", [])}
        note = "" if r.get("ok") else _failure(r).replace("|", "/")
        peaks = r.get("peaks", {})
        rows.append(f"| {r['recipe']} | {r.get('backend') or '-'} | {_f(r.get('weight_gib'))} | {_f(peaks.get('vram_device_gib'))} "
                    f"| {_f(peaks.get('ram_anon_gib'))} | " + " | ".join(_f(speed.get(t), 3) for t in sizes)
                    + f" | {_f(r.get('load_s'), 1)} | {_f(r.get('make_s'), 1)} | {_f(r.get('relative_error'), 4)} | {note} |")
    from fluxnb.quantization import SCHEMES

    for name in SCHEMES:  # a scheme of the course with no row: say so rather than leave it out silently
        if f"quant-{name}" not in rows_in:
            rows.append(f"| quant-{name} | " + " | ".join(["-"] * (7 + len(sizes))) + " | not measured in these runs |")
    return "\n".join(rows)


def quant_markdown(results: dict[str, Any]) -> str:
    """The quantization table with what it was measured on and what its numbers do and do not show."""
    table = quant_table(results)
    if not table:
        return ""
    return (f"Quantization recipes, {label(results, only='quant-')}.\n\n{table}\n\n"
            "Each row loads the full transformer with one recipe in its own process, times denoising with fixed "
            "embeddings (no text encoders, no decode) and runs one forward at a fixed 512x512 input; *rel. error* "
            "is ||out - ref|| / ||ref|| against the `quant-bf16` row's output from the same command. With random "
            "weights it measures each recipe's numerical error, not image quality. *Weights in memory* counts "
            "parameters and buffers as stored.\n")


def klein_markdown(results: dict[str, Any]) -> str:
    """FLUX.2 [klein] 4B's recipes (``klein-*``), in a table of their own beside FLUX.1's; "" if there are none."""
    if not _flow_recipes(results, "klein"):
        return ""
    return (f"{KLEIN_TABLE}, {label(results, model='klein')}.\n\n"
            f"{recipes_table(results, 'klein')}\n\n"
            "The staged flow of `fluxnb.klein`: the Qwen3-4B text encoder (in the compute dtype, or 4-bit NF4) "
            "encodes and is freed, then the transformer (in the compute dtype, or NF4) and the VAE denoise 4-step "
            "images at guidance 1.0, then decode. Timed as the FLUX.1 rows are (1-step warm-up, median of the "
            "timed steps); compare speeds between rows made by the same command.\n")


def markdown(results: dict[str, Any]) -> str:
    text = label(results)
    note = ("Each recipe ran in its own process: sizes in the order shown, after a 1-step warm-up; s/step is the "
            "median of the timed steps. Where a recipe ran in several processes (`--repeat`), the row is the run with "
            "the median 1024x1024 speed and the brackets give the range over all runs; compare speeds between rows made by the same command. *Device* VRAM includes the CUDA context; for a second size, *reserved* and "
            "*device* include what the allocator kept from the first, while *allocated* is that size's own.")
    parts = ([text[0].upper() + text[1:] + ".", "", recipes_table(results), "", note, "", ratios(results)]
             if _flow_recipes(results, "flux1") else [])  # a klein-only file (benchmarks/gpu_klein.sh): no empty table
    env = envelopes_table(results)
    if env:
        parts += ["", env]
    klein = klein_markdown(results)
    if klein:
        parts += ["", klein]
    quant = quant_markdown(results)
    if quant:
        parts += ["", quant]
    return "\n".join(parts).strip() + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    """Two panels per recipe: the flow's device-level VRAM peak, and s/step at each size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = [r for r in _flow_recipes(results) if r.get("sizes")]
    names = [r["recipe"] for r in rec]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    ax1.barh(names, [r["peaks"]["vram_device_gib"] or 0 for r in rec], color="tab:blue")
    from fluxnb.envelopes import ENVELOPES

    card, t4 = ENVELOPES["8gb-card"].vram_gib, ENVELOPES["colab-t4"].vram_gib
    for limit, text in ((card, f"8 GB card {card:g} GiB"), (t4, f"T4 {t4:g} GiB")):
        ax1.axvline(limit, color="tab:red", ls="--", lw=1)
        ax1.text(limit, len(rec) - 0.3, text, color="tab:red", fontsize=8, ha="center", va="bottom")
    ax1.set_ylim(-0.6, len(rec) + 0.1)
    ax1.set_xlabel("peak VRAM, device level (GiB)")
    sizes = sorted({f"{s['height']}x{s['width']}" for r in rec for s in r["sizes"]}, reverse=True)
    width = 0.8 / max(1, len(sizes))
    for i, size in enumerate(sizes):
        vals = [next((s["s_per_step"] for s in r["sizes"] if f"{s['height']}x{s['width']}" == size), 0) for r in rec]
        spread = [[r2["s_per_step"][size] for r2 in r.get("repeats", []) if size in r2["s_per_step"]] or [v]
                  for r, v in zip(rec, vals)]  # the range over repeated processes, where there was one
        xerr = [[v - min(sp) for v, sp in zip(vals, spread)], [max(sp) - v for v, sp in zip(vals, spread)]]
        ax2.barh([k + i * width for k in range(len(rec))], vals, width, xerr=xerr, capsize=2, label=size)
    ax2.set_yticks([k + width * (len(sizes) - 1) / 2 for k in range(len(rec))], names)
    ax2.set_xlabel("seconds per step (whiskers: range over processes)")
    if sizes:
        ax2.legend(fontsize="small")
    fig.suptitle(f"FLUX.1-dev recipes on {results['provenance']['gpu']} (random weights, real shapes)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_marked(text: str, body: str, start: str = START, end: str = END) -> str:
    """Replace what stands between two markers (markers kept); error if they are missing."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text)


def _write_notebook(path: Path, nb: dict[str, Any]) -> None:
    """Write a notebook as the repository keeps them (``.ci/strip_notebooks.py``'s format)."""
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def update_notebook(path: Path, body: str, start: str = START, end: str = END) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and start in source:
            cell["source"] = replace_marked(source, body, start, end).splitlines(keepends=True)
            _write_notebook(path, nb)
            return
    raise ValueError(f"{path}: no markdown cell with {start}")


# --- figures in notebook prose: computed, never typed ------------------------------------------------
# Prose states a few facts of the model and the targets ("the transformer in bf16 is 23.8 GB"). Each
# stands in a span, <!-- fact:NAME -->value<!-- /fact --> (the comments do not render), and
# ``python -m benchmarks report`` rewrites every value from the configs and envelopes below.

FACT = re.compile(r"<!-- fact:([a-z0-9_]+) -->(.*?)<!-- /fact -->", re.S)


def model_facts() -> dict[str, str]:
    """Every fact a span may name, formatted as prose shows it: parameter counts and bf16 sizes of
    FLUX.1-dev's models (:func:`fluxnb.parameter_counts`, from the real configs) and the free Colab
    T4's limits (:data:`fluxnb.envelopes.ENVELOPES`)."""
    import fluxnb
    from fluxnb.envelopes import COLAB_VM_RAM_GIB, ENVELOPES

    n = fluxnb.parameter_counts("dev")
    bf16 = {name: 2 * count for name, count in n.items()}  # 2 bytes per parameter
    t4 = ENVELOPES["colab-t4"]
    return {
        "flux_bf16_gb": f"{sum(bf16.values()) / 1e9:.1f} GB",  # what a download of the four models is
        "transformer_params": f"{n['transformer'] / 1e9:.1f}B",
        "transformer_bf16_gb": f"{bf16['transformer'] / 1e9:.1f} GB",
        "transformer_bf16_gib": f"{bf16['transformer'] / 2**30:.1f} GiB",
        "t5_params": f"{n['text_encoder_2'] / 1e9:.2f}B",
        "t5_bf16_gb": f"{bf16['text_encoder_2'] / 1e9:.1f} GB",
        "t5_bf16_gib": f"{bf16['text_encoder_2'] / 2**30:.1f} GiB",
        "clip_params": f"{n['text_encoder'] / 1e9:.2f}B",
        "vae_params": f"{n['vae'] / 1e6:.0f}M",
        "vae_bf16_gb": f"{bf16['vae'] / 1e9:.2f} GB",
        "t4_vram_gib": f"{t4.vram_gib} GiB",  # as PyTorch sees it, CUDA context included
        "colab_vm_ram_gib": f"{COLAB_VM_RAM_GIB} GiB",
        "colab_kernel_ram_gib": f"{t4.ram_gib:g} GiB",  # what the envelope leaves a notebook's kernel
    }


def fill_facts(text: str, facts: dict[str, str]) -> str:
    """``text`` with every fact span's value rewritten; an unknown name is an error, not a blank."""
    unknown = sorted({m.group(1) for m in FACT.finditer(text)} - set(facts))
    if unknown:
        raise ValueError(f"no fact named {', '.join(unknown)}; known: {', '.join(sorted(facts))}")
    return FACT.sub(lambda m: f"<!-- fact:{m.group(1)} -->{facts[m.group(1)]}<!-- /fact -->", text)


def write_facts(facts: dict[str, str] | None = None) -> list[Path]:
    """Rewrite the fact spans of README.md, CONTRIBUTING.md and every notebook's markdown; return the files changed."""
    facts = facts or model_facts()
    changed = []
    for page in (ROOT / "README.md", ROOT / "CONTRIBUTING.md"):
        text = page.read_text()
        filled = fill_facts(text, facts)
        if filled != text:
            page.write_text(filled)
            changed.append(page)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        dirty = False
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            filled = fill_facts(source, facts) if cell["cell_type"] == "markdown" else source
            if filled != source:
                cell["source"] = filled.splitlines(keepends=True)
                dirty = True
        if dirty:
            _write_notebook(path, nb)
            changed.append(path)
    return changed


def course_markdown(folder: Path = COURSE_RESULTS) -> str:
    """The committed course runs (``fluxnb/results/course-*.json``), one table each, envelopes in order."""
    from fluxnb.lab.course import results_markdown
    from fluxnb.envelopes import ENVELOPES

    order = {name: i for i, name in enumerate(ENVELOPES)}
    runs = [json.loads(p.read_text()) for p in folder.glob("course-*.json")]
    runs.sort(key=lambda r: (order.get((r.get("envelope") or {}).get("name"), len(order)), r["provenance"]["date"]))
    return "\n".join(results_markdown(r) for r in runs)


def write_course_docs(folder: Path = COURSE_RESULTS) -> str:
    """The course tables, for ``docs/results.md`` (notebook 04 shows a short table instead: :func:`measured_markdown`)."""
    return course_markdown(folder)


# --- notebook 04, section 5: a short table of the recipes its sections compare ----------------------

MEASURED_START, MEASURED_END = "<!-- fluxnb:measured-table:start -->", "<!-- fluxnb:measured-table:end -->"
MEASURED_RECIPES = (  # (recipe, what it is, in notebook 04's words), at most eight rows
    ("staged-nf4", "the staged flow (section 1), PyTorch's default allocator"),
    ("staged-nf4-expandable", "the staged flow with `expandable_segments:True` (this notebook's setting)"),
    ("staged-nf4-fp16", "the staged flow in fp16, as on a T4"),
    ("bf16-resident", "everything resident in bf16 (section 2)"),
    ("nf4-model-offload", "T5 and the transformer in one offloaded pipeline"),
    ("nf4-model-offload-transformer", "only the transformer pipeline offloaded (section 3)"),
    ("nf4-streamed", "every transformer block streamed from host RAM (notebook 08)"),
    ("staged-nf4-compile", "the staged flow with regional torch.compile (notebook 09)"),
)
MEASURED_SIZE = "1024x1024"


def measured_markdown(data: dict[str, Any]) -> str:
    """Notebook 04's short table: the recipes of :data:`MEASURED_RECIPES` at :data:`MEASURED_SIZE`, from
    ``fluxnb/results/recipes.json`` (the rows the planner and README's summary read), and a link to
    ``docs/results.md`` for everything else. A recipe with no such row is left out."""
    rows = {(r["recipe"], r["size"]): r for r in data["recipes"]}
    lines = ["| recipe | what | s/step | VRAM peak, device (GiB) | host RAM peak, anon (GiB) | measured on |",
             "|---|---|---|---|---|---|"]
    for name, what in MEASURED_RECIPES:
        row = rows.get((name, MEASURED_SIZE))
        if row is not None:
            lines.append(f"| `{name}` | {what} | {row['s_per_step']:.3f} | {_f(row['vram_peak_gib'])} "
                         f"| {_f(row['ram_peak_gib'])} | {row['gpu']}, {row['date']} |")
    return (f"Each recipe in its own process at {MEASURED_SIZE}, random weights of the real FLUX.1-dev shapes "
            "(memory and speed, not image quality). *VRAM* includes the CUDA context; *host RAM* is anonymous "
            "memory, as everywhere in the course.\n\n" + "\n".join(lines) + "\n\n"
            "Every recipe at every size, the commands that measured them, and each notebook's peaks inside a "
            "free Colab T4's and an 8 GB card's limits: [docs/results.md](../docs/results.md).\n")


def write_measured_table(data: dict[str, Any] | None = None) -> str:
    """Put :func:`measured_markdown` into notebook 04, between the measured-table markers; return it."""
    body = measured_markdown(data or json.loads(RECIPES_JSON.read_text()))
    update_notebook(ROOT / "notebooks" / "04_memory_profiling.ipynb", body, MEASURED_START, MEASURED_END)
    return body


DOWNLOADS_START, DOWNLOADS_END = "<!-- fluxnb:downloads-table:start -->", "<!-- fluxnb:downloads-table:end -->"
DOWNLOADS = ROOT / "benchmarks" / "results" / "downloads"  # course runs whose notebooks each began with an empty cache


def downloads_markdown(folder: Path = DOWNLOADS) -> str:
    """What each notebook downloads on a fresh VM, from the committed course runs that counted it
    (``benchmarks/results/downloads/*.json``: the runner's results, :func:`fluxnb.lab.course.downloads_markdown`)."""
    from fluxnb.lab.course import downloads_markdown as table

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return "\n".join(table(run) for run in runs) if runs else "No course run has counted its downloads yet.\n"


def write_downloads_docs() -> str:
    """Refresh the downloads section of ``docs/results.md`` (between its markers) from the committed runs."""
    body = downloads_markdown()
    text = RESULTS_DOC.read_text()
    if DOWNLOADS_START not in text:
        raise ValueError(f"{RESULTS_DOC} has no downloads section: regenerate it with `python -m benchmarks report`")
    start, end = text.index(DOWNLOADS_START) + len(DOWNLOADS_START), text.index(DOWNLOADS_END)
    RESULTS_DOC.write_text(text[:start] + "\n" + body.strip() + "\n" + text[end:])
    return body


def results_document(course: str, benchmark: str, chart_path: str | None) -> str:
    """``docs/results.md``, whole: the course inside each envelope, then every recipe on a GPU."""
    chart_line = f"\n![benchmark chart](../{chart_path})\n" if chart_path else ""
    shapes = ("the real FLUX.1-dev shapes with random weights (`random-dev`; the FLUX.2 [klein] rows: "
              "FLUX.2-klein-4B's, `random-klein`)" if KLEIN_TABLE in benchmark
              else "the real FLUX.1-dev shapes with random weights (`random-dev`)")
    return f"""# Measured: every figure of the course, with where it was measured

Generated whole by `python -m benchmarks report` from the committed results (`fluxnb/results/course-*.json`,
`benchmarks/results/*.json`); [benchmarks/README.md](../benchmarks/README.md) says which command made each
and on which machine. Everything ran on {shapes}:
memory and speed are real, image quality is not measured anywhere in this project.

## The whole course inside a free Colab T4 and an 8 GB card

`python -m fluxnb.course OUT --envelope NAME` on the lent GPU machines, oldest run first in each
envelope: a notebook run again later (after a fix) counts by its latest run, in the summary on the
front page and in `python -m fluxnb.planner`.

{COURSE_START}
{course.strip()}
{COURSE_END}

## What each notebook downloads on a fresh VM

The course runner gives each notebook an empty Hugging Face cache and counts every byte the stand-in Hub
sends it (`fluxnb.hub`): what a learner's fresh Colab VM would download, file for file, at the stand-in's
sizes. The tiny stand-in's files are a few MB; the real sizes come from a run on `random-dev`.

{DOWNLOADS_START}
{downloads_markdown().strip()}
{DOWNLOADS_END}

## Every recipe on a GPU

Offloading and the streamed NF4 transformer (notebook 08) have their own table,
[benchmarks/results/h100-offload.md](../benchmarks/results/h100-offload.md).

{START}
{benchmark.strip()}
{chart_line}{END}
"""


def summary_markdown(data: dict[str, Any]) -> str:
    """README's five rows: the course in each envelope (latest runs), and the recipes that bound it."""
    from fluxnb.envelopes import ENVELOPES
    from fluxnb.planner import T4, scaled_seconds

    rows = ["| what | result | measured on |", "|---|---|---|"]
    order = list(ENVELOPES)
    for run in sorted(data["course"], key=lambda r: order.index(r["envelope"]) if r["envelope"] in order else len(order)):
        verdict = (f"all {run['notebooks']} notebooks pass" if not run["failed"]
                   else f"{run['passed']} of {run['notebooks']} pass ({', '.join(run['failed'])} fail)")
        rows.append(f"| the course inside `{run['envelope']}` ({run['vram_gib']} GiB VRAM, {run['ram_gib']:g} GiB RAM) "
                    f"| {verdict}; VRAM peak {run['vram_peak_gib']:.2f} GiB | {run['gpu']}, {run['date']} |")
    by_name = {(r["recipe"], r["size"]): r for r in data["recipes"]}
    for name, what in SUMMARY_RECIPES:
        row = by_name.get((name, "1024x1024"))
        if row is not None and len(rows) < 7:
            t4 = scaled_seconds(row["s_per_step"], row["gpu"], T4) if row["compute"] == "float16" else None
            on_t4 = "" if t4 is None else f" (on a T4 about {t4:.1f} s, by datasheet FLOPS)"
            rows.append(f"| {what}: `{name}`, 1024x1024 | {row['s_per_step']:.3f} s/step{on_t4}, VRAM peak "
                        f"{row['vram_peak_gib']:.2f} GiB | {row['gpu']}, {row['date']} |")
    return "\n".join(rows) + "\n\nAll of it, with the commands: [docs/results.md](docs/results.md).\n"


def write_summary(data: dict[str, Any] | None = None) -> str:
    """README's summary, between the summary markers, from ``fluxnb/results/recipes.json``."""
    body = summary_markdown(data or json.loads(RECIPES_JSON.read_text()))
    readme = ROOT / "README.md"
    readme.write_text(replace_marked(readme.read_text(), body, SUMMARY_START, SUMMARY_END))
    return body


def write_all(results_path: Path, targets: bool = True) -> str:
    """Regenerate ``<name>.md`` and ``<name>.png`` beside the JSON, and (``targets``) docs/results.md,
    README's summary, notebook 04's short table, recipes.json and the fact spans."""
    results_path = results_path.resolve()
    results = json.loads(results_path.read_text())
    text = markdown(results)
    results_path.with_suffix(".md").write_text(text)
    quant = quant_markdown(results)
    if quant and targets:  # package data: notebooks 05-07 print it, on Colab too
        (COURSE_RESULTS / f"quant-{results_path.stem}.md").write_text(quant)
    charted = any(r.get("sizes") for r in results["recipes"].values())
    if charted:  # nothing to chart otherwise
        chart(results, results_path.with_suffix(".png"))
    if targets:
        rel = results_path.with_suffix(".png").relative_to(ROOT).as_posix() if charted else None
        course = write_course_docs()
        RESULTS_DOC.parent.mkdir(exist_ok=True)
        others = sorted(p for p in results_path.parent.glob("*.json") if p != results_path)
        runs = [json.loads(p.read_text()) for p in others]
        klein = [klein_markdown(r) for r in runs if "recipes" in r]  # FLUX.2 [klein]'s rows of other benchmark runs
        document = "\n".join([text, *[k for k in klein if k]]) if KLEIN_TABLE not in text else text
        RESULTS_DOC.write_text(results_document(course, document, rel))
        recipes = write_recipes_json()
        write_summary(recipes)
        write_measured_table(recipes)
        write_facts()
    return text


# --- notebook 08: the offloading rows (benchmarks/gpu_offload.sh) ---------------------------------

OFFLOAD_START, OFFLOAD_END = "<!-- fluxnb:offload-table:start -->", "<!-- fluxnb:offload-table:end -->"
OFFLOAD_REFERENCE = "nf4-resident"
PINNED_OUTSIDE_ANON = "group-offload"  # recipes whose host copies come from pin_memory(): not anonymous memory


def _peak(recipe: dict[str, Any], field: str) -> float | None:
    values = [s[field] for s in recipe.get("stages", []) if s.get(field) is not None]
    return max(values) if values else None


def offload_markdown(results: dict[str, Any]) -> str:
    """Notebook 08's table: each offloading recipe's s/step (and vs resident NF4), VRAM, host RAM, latents.

    Host RAM is anonymous memory, the course's one host-RAM figure. diffusers' group offload pins its host
    copies with ``pin_memory()``, which anonymous memory does not count (fluxnb's streamer page-locks
    anonymous memory, which it does): those rows say so, and a note gives their peak resident set, which
    counts the pinned copies (and the file pages the OS can drop)."""
    recipes = results["recipes"]
    ref = recipes.get(OFFLOAD_REFERENCE, {})
    ref_speed = {f"{s['height']}x{s['width']}": s["s_per_step"] for s in ref.get("sizes", [])}
    head = ("| recipe | size | s/step | vs resident NF4 | denoise VRAM device (GiB) | flow peak VRAM device (GiB) "
            "| host RAM peak, anon (GiB) | latents vs resident NF4 (max abs diff) |")
    rows = [head, "|" + "---|" * 8]
    notes, pinned = [], []
    for name, r in recipes.items():
        if not r.get("sizes"):
            if not r.get("ok"):
                text = _failure(r).replace("\n", " ").replace("|", "/")
                rows.append(f"| {name} | - | **{text}** | | | | | |")
            continue
        info = r.get("info") or {}
        sizes = [f"{s['height']}x{s['width']}" for s in r["sizes"]]
        for s, size in zip(r["sizes"], sizes):
            denoise = _stage(r, "denoise", s["height"], s["width"])
            ratio = s["s_per_step"] / ref_speed[size] if size in ref_speed and ref_speed[size] else None
            diff = (info.get(f"latents_vs_resident_nf4_{size}") or {}).get("max_abs_diff")
            ram = _f(_size_peak(r, "ram_anon_gib", size, sizes))  # as recipes.json has it: the planner's figure
            ram += " + pinned (below)" if PINNED_OUTSIDE_ANON in name else ""
            rows.append(f"| {name} | {size} | {_f(s['s_per_step'], 3)} | {_f(ratio) + 'x' if ratio else '-'} "
                        f"| {_f(denoise.get('vram_device_gib'))} | {_f(_peak(r, 'vram_device_gib'))} "
                        f"| {ram} | {'reference' if name == OFFLOAD_REFERENCE else _f(diff, 3)} |")
        if PINNED_OUTSIDE_ANON in name and _peak(r, "ram_maxrss_gib") is not None:
            pinned.append(f"`{name}` {_f(_peak(r, 'ram_maxrss_gib'))} GiB")
        if info.get("per_block"):
            b = info["per_block"]
            notes.append(f"- `{name}`: {info.get('resident_blocks')} of 57 blocks resident; {info.get('host_gib')} GiB "
                         f"of blocks in pinned host RAM, {info.get('slots_gib')} GiB of GPU slots; per streamed block, "
                         f"copy {b['copy_ms_mean']} ms ({b['copy_gb_per_s']} GB/s), compute {b['compute_ms_mean']} ms "
                         f"(means over {b['copies']} copies, both sizes).")
    for name, r in recipes.items():
        tiles = [s for s in r.get("stages", []) if s["stage"].startswith("decode ") and "(" in s["stage"]]
        if tiles:
            notes.append(f"- `{name}`: " + "; ".join(f"{s['stage']}: {_f(s['vram_device_gib'])} GiB device"
                                                     for s in tiles) + ".")
    if pinned:
        notes.append("- + pinned: diffusers' group offload keeps its host copies in memory from `pin_memory()`, which "
                     "anonymous memory does not count. The process's peak resident set counts them, and also the "
                     "weight files' pages the OS can drop: " + ", ".join(pinned) + ".")
    descriptions = "\n".join(f"- `{n}`: {r.get('description', '')}" for n, r in recipes.items())
    return (f"{label(results)}\n\n{chr(10).join(rows)}\n\n{chr(10).join(notes)}\n\nWhat each row ran:\n{descriptions}\n\n"
            "s/step is the median of the timed steps after a 1-step warm-up; rows of a size are comparable (one "
            "command, one machine). A latents difference is shown only against the resident run with the same "
            "steps and dtype. Random weights: these numbers are memory and speed, not image quality.")


def write_offload_docs(results_path: Path) -> str:
    """Regenerate ``<name>.md`` beside the offload results JSON and the table in notebook 08."""
    results = json.loads(results_path.read_text())
    body = offload_markdown(results)
    results_path.with_suffix(".md").write_text(body + "\n")
    update_notebook(ROOT / "notebooks" / "08_offloading.ipynb", body, OFFLOAD_START, OFFLOAD_END)
    return body

RECIPES_JSON = ROOT / "fluxnb" / "results" / "recipes.json"  # package data: fluxnb.planner reads it, on Colab too


def _size_peak(recipe: dict[str, Any], field: str, size: str, sizes: list[str]) -> float | None:
    """The largest ``field`` over the stages that belong to ``size`` or to no size (load, encode, free).

    For a recipe's second size the allocator still holds blocks from the first, so this is an upper
    bound there; for the first size it is that size's own peak.
    """
    others = [s for s in sizes if s != size]
    values = [st.get(field) for st in recipe.get("stages", []) if not any(o in st["stage"] for o in others)]
    values = [v for v in values if v is not None]
    return round(max(values), 3) if values else None


def recipe_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One compact row per finished recipe and size: what the planner needs to choose, and nothing else.

    A FLUX.2 [klein] row says ``"model": "klein"``; a row without ``model`` is FLUX.1's (the planner reads
    each model's rows apart)."""
    rows = []
    for r in results.get("recipes", {}).values():
        if not r.get("ok") or not r.get("sizes"):
            continue  # failed, skipped, or load-only: nothing to recommend
        p = r.get("provenance") or results["provenance"]
        sizes = [f"{s['height']}x{s['width']}" for s in r["sizes"]]
        for s, size in zip(r["sizes"], sizes):
            per_gpu = r.get("per_gpu_peaks_gib")  # multi-GPU recipes: {"cuda:0": GiB, ...} over the whole flow
            model = {"model": "klein"} if model_of(r["recipe"], r) == "klein" else {}  # absent: FLUX.1
            rows.append(dict(
                recipe=r["recipe"], description=r["description"], **model, size=size,
                compute=r["compute_dtype"].replace("torch.", ""), gpus=r.get("gpus") or 1,
                images_at_once=r.get("images_at_once") or 1, s_per_step=s["s_per_step"],
                vram_peak_gib=max(per_gpu.values()) if per_gpu else _size_peak(r, "vram_device_gib", size, sizes),
                ram_peak_gib=_size_peak(r, "ram_anon_gib", size, sizes), compile_s=r.get("compile_s"),
                warmup_s=s["warmup_s"], exact=r.get("exact", True),  # False: a step cache changes the outputs
                gpu=p["gpu"], date=p["date"][:10], command=p["command"],
                upper_bound=size != sizes[0] and not per_gpu))
    return rows


def course_rows(folder: Path = COURSE_RESULTS) -> list[dict[str, Any]]:
    """The committed course runs inside each envelope, one row per envelope: every notebook's latest run
    there (:func:`fluxnb.envelopes.committed_runs`, which notebook 00 reads too)."""
    rows = []
    for name, run in committed_runs(folder).items():
        env, nbs = run["envelope"], run["notebooks"]
        rows.append(dict(envelope=name, vram_gib=env.get("vram_gib"), ram_gib=env.get("ram_gib"),
                         bf16=env.get("bf16"), passed=sum(nb["passed"] for nb in nbs), notebooks=len(nbs),
                         failed=[nb["notebook"] for nb in nbs if not nb["passed"]],
                         vram_peak_gib=max([nb["vram_device_peak_gib"] or 0 for nb in nbs if nb["passed"]] or [0]),
                         gpu=run["provenance"]["gpu"], date=run["provenance"]["date"],
                         notebook_names=[nb["notebook"][:2] for nb in nbs]))
    return rows


def recipes_json(paths: list[Path], course_folder: Path = COURSE_RESULTS) -> dict[str, Any]:
    """What ``fluxnb/results/recipes.json`` holds: every finished recipe row of ``paths``, and the course runs."""
    per_path = {path: recipe_rows(json.loads(path.read_text())) for path in paths}
    rows = [row for path_rows in per_path.values() for row in path_rows]
    shapes = "FLUX.1-dev shapes" + (" (rows with model klein: FLUX.2-klein-4B's)" if any(r.get("model") for r in rows) else "")
    return dict(generated_by="python -m benchmarks report",  # sources: the files a row came from
                sources=[path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
                         for path, path_rows in per_path.items() if path_rows],
                note=f"random weights of the real {shapes}: memory and speed are real, image quality "
                     "is not measured; vram_peak_gib is the device-level peak (CUDA context included), per GPU "
                     "for multi-GPU recipes; ram_peak_gib is anonymous host memory",
                recipes=rows, course=course_rows(course_folder))


def write_recipes_json(folder: Path | None = None, out: Path = RECIPES_JSON) -> dict[str, Any]:
    """Regenerate ``fluxnb/results/recipes.json`` from every ``benchmarks/results/*.json``."""
    folder = folder or ROOT / "benchmarks" / "results"
    data = recipes_json(sorted(folder.glob("*.json")))
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


_NOISE = re.compile(r"(\d+%\|)|(it/s\])|(s/it\])|(^Loading )|(^\s*warnings\.warn)|(Warning:)|(^\s*deprecate\()")


def notebook_outputs(executed: Path, course_results: Path | None = None, command: str | None = None) -> str:
    """The printed results of an executed notebook as markdown: each code cell's text output (progress bars
    and library warnings dropped) under the first line of its source, headed by where it ran: the GPU,
    versions, date and command of ``course_results`` (``python -m fluxnb.course``'s JSON, or a benchmark
    results JSON made on the same machine in the same call, with ``command`` saying what ran the notebook)."""
    from fluxnb.lab.course import versions_line

    nb = json.loads(Path(executed).read_text())
    head = f"Outputs of `{Path(executed).name}`"
    if course_results is not None:
        res = json.loads(Path(course_results).read_text())
        p = res["provenance"]
        run = next((n for n in res.get("notebooks", []) if n["notebook"] == Path(executed).name), None)
        envelope = res.get("envelope", {}).get("name") if res.get("envelope") else None
        checkpoint = p["checkpoint"] if run else "random-dev"
        head += (f", executed on {gpu_name(p)} ({versions_line(p)}) with `{checkpoint}`" + (f" inside the `{envelope}` envelope" if envelope else "")
                 + f", by `{command or p['command']}`")
        if run:
            head += (f": {'passed' if run['passed'] else 'FAILED'} in {run['seconds']:.0f} s, device VRAM peak "
                     f"{_f(run['vram_device_peak_gib'])} GiB, host RAM anon peak {_f(run['ram_anon_peak_gib'])} GiB")
    parts = [head + ". Generated by `python -m benchmarks outputs`; random weights: memory and speed, not image quality.", ""]
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        text = []
        for out in cell.get("outputs", []):
            chunk = out.get("text") or out.get("data", {}).get("text/markdown") or out.get("data", {}).get("text/plain") or ""
            text.append("".join(chunk) if isinstance(chunk, list) else chunk)
            if out.get("output_type") == "error":
                text.append(f"{out['ename']}: {out['evalue']}")
        lines = [ln for ln in "\n".join(text).splitlines() if ln.strip() and not _NOISE.search(ln)]
        if not lines:
            continue
        source = "".join(cell["source"]).strip().splitlines()
        parts += [f"**cell {i}** `{source[0][:100] if source else ''}`", "", *[
            ln if ln.startswith("|") else f"    {ln}" for ln in lines], ""]
    return "\n".join(parts).rstrip() + "\n"
