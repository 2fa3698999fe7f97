"""GPU benchmark of the course's recipes on full-size FLUX.1-dev shapes with random weights.

    python -m benchmarks run                 # every recipe, each in its own process -> results/<gpu>.json
    python -m benchmarks run --recipes staged-nf4,bf16-resident
    python -m benchmarks envelope            # the staged flow in fluxnb.envelopes' Colab T4 and 8 GB card limits
    python -m benchmarks merge a.json b.json --out results/h100.json   # runs split over GPU sessions
    python -m benchmarks report              # regenerate table, chart, README and notebook 04 from the JSON,
                                             # and the fact spans of the notebooks' prose

"Will it fit?" on your own GPU, before a 34 GB download, is ``python -m fluxnb.fit`` (in the package,
so a Colab install has it).

The checkpoint is ``random-dev`` (built on first use, ~34 GB of disk, about a minute on a GPU) unless
``--checkpoint`` names another folder. Results carry their provenance: GPU, driver, versions, date,
and the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import fluxnb
from benchmarks import report, worker
from benchmarks.recipes import DEFAULT_SIZES, RECIPES
from fluxnb.lab import course
from fluxnb import envelopes as fluxnb_envelopes
from fluxnb.lab.limits import RamCgroup
from fluxnb.lab.supervisor import module_command, run_process

RESULTS = Path(__file__).resolve().parent / "results"
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
ENVELOPES = {  # name: (target machine of fluxnb.envelopes, extra environment); limits are defined there only
    "colab-t4": (fluxnb_envelopes.ENVELOPES["colab-t4"], {}),
    "8gb-card": (fluxnb_envelopes.ENVELOPES["8gb-card"], {}),
    "8gb-card-expandable": (fluxnb_envelopes.ENVELOPES["8gb-card"], EXPANDABLE),
}


def gpu_slug() -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; ``Tesla T4`` -> ``t4``; no GPU -> ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    match = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def provenance(checkpoint: str, command: str) -> dict[str, Any]:
    """The course runner's provenance (GPU, driver, versions, date, command), plus what a recipe ran on."""
    p = course.provenance(command)
    return dict(p, gpu=p["gpu"] or "CPU only", driver=p["driver"] or "-", checkpoint=checkpoint,
                stand_in=fluxnb.is_stand_in(checkpoint), allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"recipes": {}, "envelopes": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def run_worker(args: list[str], log: Path, timeout_s: int, cgroup: RamCgroup | None = None,
               env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``benchmarks.worker`` in a fresh process (``env`` added to ours, inside ``cgroup`` from its first
    byte); return (exit code, output); -1 if it ran past ``timeout_s`` (then it is killed).

    Each worker gets empty torch.compile caches beside its log, so a compile time is a cold one, as on
    a fresh Colab VM, and never depends on which recipe ran before on the same machine.
    """
    cold_caches = {"TORCHINDUCTOR_CACHE_DIR": str(log.parent / "inductor-cache"),
                   "TRITON_CACHE_DIR": str(log.parent / "triton-cache")}
    done = run_process(module_command("benchmarks.worker", *args), timeout_s, output="all",
                       cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **cold_caches, **(env or {})},
                       cgroup=cgroup.path if cgroup else None)
    code, output = (-1, done.output + f"\nTIMEOUT after {timeout_s} s") if done.timed_out else (done.returncode, done.output)
    log.write_text(output)
    return code, output


def run_recipe(name: str, checkpoint: str, ns: argparse.Namespace) -> tuple[dict[str, Any], int, str]:
    """One recipe in one fresh worker process; a worker killed before writing still gets a result."""
    recipe = RECIPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        code, output = run_worker(["--recipe", name, "--checkpoint", checkpoint, "--sizes", ns.sizes,
                                   "--steps", str(ns.steps), "--sample-interval", str(ns.sample_interval),
                                   "--json", str(out)],
                                  Path(tmp) / "log.txt", ns.timeout, env=recipe.env)
        if out.is_file():
            result = json.loads(out.read_text())
            if result.get("error") == worker.INCOMPLETE:  # killed after some sizes: keep them, say where it stopped
                mark_killed(result, code, output)
            return result, code, output
    # killed before it could write (timeout, OOM kill): say so, with the end of its log
    return (dict(recipe=name, description=recipe.description, ok=False, sizes=[], stages=[],
                 error=f"worker exited {code} without a result: {output[-600:]}", failed_stage=None), code, output)


def mark_killed(result: dict[str, Any], code: int, output: str) -> None:
    """A partial result of a killed worker: not ok, and the stage it was in (from its ``STAGE`` lines,
    else the one after the last stage it finished)."""
    announced = re.findall(r"^STAGE (.+)$", output, re.M)
    finished = [s["stage"] for s in result.get("stages", [])]
    stage = announced[-1] if announced else (f"after {finished[-1]}" if finished else "start-up")
    timeout = re.search(r"TIMEOUT after \d+ s", output)
    result.update(ok=False, failed_stage=stage,
                  error=f"{timeout.group() if timeout else f'worker exited {code}'} in stage '{stage}'")


def pick_median(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a recipe's repeated runs (each its own process), the one with the median s/step at the first size.

    A failed run is returned as it is. Every run's s/step and device peak are kept under ``repeats``,
    so the spread between processes is visible next to the median.
    """
    if not attempts[-1]["ok"] or len(attempts) == 1:
        return attempts[-1]
    timed = [a for a in attempts if a.get("sizes")]
    ordered = sorted(timed, key=lambda a: a["sizes"][0]["s_per_step"]) if timed else attempts
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [dict(s_per_step={f"{s['height']}x{s['width']}": s["s_per_step"] for s in a.get("sizes", [])},
                              vram_device_gib=a.get("peaks", {}).get("vram_device_gib"),
                              **{k: a.get(k) for k in worker.TIME_FIELDS
                                 if a.get(k) is not None})
                         for a in attempts]
    return chosen


def recipe_checkpoint(choice: str, model_id: str, resolved: dict[str, str]) -> str:
    """``--checkpoint`` resolved for one recipe's model (:func:`fluxnb.checkpoints.stand_in_folder`: a benchmark
    loads a stand-in from its folder, since it measures memory and speed, not a download): ``random-dev`` is
    FLUX.1-dev's random stand-in for the FLUX.1 recipes and ``random-klein`` for the ``klein-*`` ones, ``tiny``
    each model's tiny one; a folder is used as given. Each model is resolved (built) once, when a recipe of it
    first runs, so a run of klein rows alone never builds FLUX.1's 34 GB stand-in."""
    if model_id not in resolved:
        resolved[model_id] = fluxnb.checkpoints.stand_in_folder(model_id, choice)
    return resolved[model_id]


def cmd_run(ns: argparse.Namespace) -> int:
    names = ns.recipes.split(",")
    resolved: dict[str, str] = {}
    first = next((RECIPES[n] for n in names if not RECIPES[n].needs_gpu or torch.cuda.is_available()), RECIPES[names[0]])
    checkpoint = recipe_checkpoint(ns.checkpoint, first.model_id, resolved)
    path = ns.results or RESULTS / f"{gpu_slug()}.json"
    results = load_results(path)
    results["provenance"] = provenance(checkpoint, ns.command_line)
    failures = 0
    for name in names:
        recipe = RECIPES[name]
        if recipe.needs_gpu and not torch.cuda.is_available():
            results["recipes"][name] = dict(recipe=name, description=recipe.description, skipped="needs a GPU")
            print(f"{name}: skipped (needs a GPU)", flush=True)
            continue
        if recipe.gpus > 1 and torch.cuda.device_count() < recipe.gpus:
            results["recipes"][name] = dict(recipe=name, description=recipe.description,
                                            skipped=f"needs {recipe.gpus} GPUs")
            print(f"{name}: skipped (needs {recipe.gpus} GPUs, this machine has {torch.cuda.device_count()})", flush=True)
            continue
        attempts = []
        checkpoint = recipe_checkpoint(ns.checkpoint, recipe.model_id, resolved)
        for _ in range(ns.repeat):
            result, code, output = run_recipe(name, checkpoint, ns)
            attempts.append(result)
            if not result["ok"]:
                break
        result = pick_median(attempts)
        result["provenance"] = dict(results["provenance"], allocator_conf=recipe.env.get(
            "PYTORCH_CUDA_ALLOC_CONF", results["provenance"]["allocator_conf"]),
            checkpoint=checkpoint, stand_in=fluxnb.is_stand_in(checkpoint))
        results["recipes"][name] = result
        save_results(path, results)  # after each recipe, so a later crash keeps what was measured
        failures += not result["ok"]
        status = "ok" if result["ok"] else f"FAILED in {result.get('failed_stage')}: {result.get('error')}"
        print(f"{name}: {status}; " + ", ".join(f"{s['height']}x{s['width']} {s['s_per_step']} s/step"
                                                 for s in result.get("sizes", [])), flush=True)
        if not result["ok"]:
            print(output[-3000:], file=sys.stderr)
    print(report.write_all(path, targets=ns.update_docs))
    return 1 if failures else 0


def judge_envelope(result: dict[str, Any] | None, code: int, output: str, vram_gib: float, ram_gib: float,
                   oom_kills: int, ram_peak_gib: float | None) -> tuple[bool, str]:
    """Did the flow stay inside the envelope? Returns (passed, why) naming the stage that broke it."""
    stages = re.findall(r"^STAGE (.+)$", output, re.M)
    last = stages[-1] if stages else "start-up"
    if oom_kills:
        return False, f"host RAM over {ram_gib:g} GiB: OOM-killed in stage '{last}'"
    if result is None:
        return False, f"worker exited {code} in stage '{last}' without a result"
    if not result["ok"]:
        return False, f"failed in stage '{result.get('failed_stage') or last}': {result.get('error')}"
    device = result["peaks"]["vram_device_gib"] or 0.0
    if device > vram_gib:
        worst = max(result["stages"], key=lambda s: s["vram_device_gib"] or 0)
        return False, f"device VRAM {device:.2f} GiB > {vram_gib:g} GiB in stage '{worst['stage']}'"
    ram = ram_peak_gib if ram_peak_gib is not None else result["peaks"]["ram_anon_gib"]
    if ram > ram_gib:
        return False, f"host RAM {ram:.2f} GiB > {ram_gib:g} GiB"
    return True, "all stages finished inside the envelope; latents finite"


def cmd_envelope(ns: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("The envelope caps a GPU's memory: it needs a GPU.", file=sys.stderr)
        return 2
    checkpoint = fluxnb.checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", ns.checkpoint)
    path = ns.results or RESULTS / f"{gpu_slug()}.json"
    results = load_results(path)
    results.setdefault("envelopes", {})
    results.setdefault("provenance", provenance(checkpoint, ns.command_line))
    failures = 0
    for name in ns.names.split(","):
        target, env = ENVELOPES[name]
        vram_gib, ram_gib, dtype = target.vram_gib, target.ram_gib, "auto" if target.bf16 else "fp16"
        group = RamCgroup.create(f"fluxnb-{name}", ram_gib)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            args = ["--recipe", "staged-nf4", "--checkpoint", checkpoint, "--sizes", ns.sizes, "--steps",
                    str(ns.steps), "--vram-gib", str(vram_gib), "--sample-interval", str(ns.sample_interval),
                    "--json", str(out)]
            if dtype != "auto":
                args += ["--dtype", dtype]
            code, output = run_worker(args, Path(tmp) / "log.txt", ns.timeout, cgroup=group, env=env)
            result = json.loads(out.read_text()) if out.is_file() else None
        oom_kills, ram_peak = 0, None
        if group is not None:
            oom_kills, ram_peak = group.oom_kills(), group.peak_gib()
            group.remove()
        passed, reason = judge_envelope(result, code, output, vram_gib, ram_gib, oom_kills, ram_peak)
        results["envelopes"][name] = dict(
            name=name, vram_gib=vram_gib, ram_gib=ram_gib, dtype=result["compute_dtype"] if result else dtype,
            ram_enforced=group is not None, passed=passed, reason=reason, sizes=ns.sizes, env=env,
            vram_device_peak_gib=result["peaks"]["vram_device_gib"] if result else None,
            ram_peak_gib=ram_peak if ram_peak is not None else (result["peaks"]["ram_anon_gib"] if result else None),
            cgroup_memory_peak_gib=ram_peak, result=result, provenance=provenance(checkpoint, ns.command_line))
        save_results(path, results)
        failures += not passed
        print(f"{name}: {'PASS' if passed else 'FAIL'}: {reason}", flush=True)
        if not passed:
            print(output[-3000:], file=sys.stderr)
    print(report.write_all(path, targets=ns.update_docs))
    return 1 if failures else 0


def cmd_merge(ns: argparse.Namespace) -> int:
    """Combine results files (e.g. runs split across GPU sessions) into one; later files win per entry.

    Each recipe and envelope keeps the provenance (command, date, versions) of the run that made it.
    """
    merged: dict[str, Any] = {"recipes": {}, "envelopes": {}}
    for path in ns.inputs:
        part = load_results(path)
        merged["provenance"] = part.get("provenance", merged.get("provenance"))
        for key in ("recipes", "envelopes"):
            for name, entry in part.get(key, {}).items():
                keep = merged[key].get(name)
                if keep and keep.get("ok", keep.get("passed")) and not entry.get("ok", entry.get("passed")):
                    continue  # never replace a good measurement by a failed attempt
                merged[key][name] = entry
    save_results(ns.out, merged)
    print(report.write_all(ns.out, targets=ns.update_docs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "envelope"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", default="random-dev", help="random-dev (default), tiny, or a folder")
        p.add_argument("--sizes", default=DEFAULT_SIZES if name != "envelope" else "1024x1024")
        p.add_argument("--steps", type=int, default=5, help="timed steps per size, after a 1-step warm-up")
        p.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/<gpu>.json)")
        p.add_argument("--timeout", type=int, default=900, help="seconds per recipe process")
        p.add_argument("--sample-interval", type=float, default=0.01,
                       help="seconds between memory readings (a coarser one disturbs the timing less)")
        p.add_argument("--no-docs", dest="update_docs", action="store_false",
                       help="do not rewrite README.md and notebook 04")
    sub.choices["run"].add_argument("--recipes", default=",".join(RECIPES), help=",".join(RECIPES))
    sub.choices["run"].add_argument("--repeat", type=int, default=1,
                                    help="run each recipe this many times (each its own process); keep the median")
    sub.choices["envelope"].add_argument("--names", default=",".join(ENVELOPES), help=",".join(ENVELOPES))
    mrg = sub.add_parser("merge", help="combine results files; later files win per recipe/envelope")
    mrg.add_argument("inputs", nargs="+", type=Path)
    mrg.add_argument("--out", type=Path, required=True)
    mrg.add_argument("--no-docs", dest="update_docs", action="store_false")
    outs = sub.add_parser("outputs", help="an executed notebook's printed results as markdown (committed evidence)")
    outs.add_argument("executed", type=Path)
    outs.add_argument("--course-results", type=Path, help="python -m fluxnb.course's JSON of that run")
    outs.add_argument("--ran-by", help="what ran the notebook, where --course-results is a benchmark results JSON")
    outs.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--results", type=Path, default=None)
    rep.add_argument("--no-docs", dest="update_docs", action="store_false")
    args = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(args)
    ns.command_line = "python -m benchmarks " + " ".join(shlex.quote(a) for a in args)
    if ns.command == "outputs":
        ns.out.write_text(report.notebook_outputs(ns.executed, ns.course_results, ns.ran_by))
        print(f"wrote {ns.out}")
        return 0
    if ns.command == "report":
        path = ns.results or next(iter(sorted(p for p in RESULTS.glob("*.json") if not p.stem.endswith("-offload"))), None)
        if path is None:
            parser.error("no results JSON in benchmarks/results: run `python -m benchmarks run` on a GPU first")
        print(report.write_all(path, targets=ns.update_docs))
        for offload in sorted(RESULTS.glob("*-offload.json")) if ns.update_docs else []:  # notebook 08's table
            print(report.write_offload_docs(offload))
        return 0
    return {"run": cmd_run, "envelope": cmd_envelope, "merge": cmd_merge}[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
