"""Will the course fit this GPU? A dry run of its staged flow, before the 34 GB download.

    python -m fluxnb.fit                                   # FLUX.1-dev's real shapes on this GPU
    python -m fluxnb.fit --height 768 --width 768          # another image size
    python -m fluxnb.fit --checkpoint tiny --height 64 --width 64 --steps 2   # the mechanics, on a CPU
    python -m fluxnb.fit --model klein                     # FLUX.2 [klein] 4B's flow (notebook 12)

It runs the course's staged flow as the notebooks run it (the functions of :mod:`fluxnb.stages`, the
dtype of :func:`fluxnb.pick_dtype` -- fp16 on a GPU without bf16, such as a T4, with the text encoders
in fp32 there, as notebook 01 explains -- and the notebooks' ``PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True``). It quantizes T5 and the transformer while loading them from the
stand-in, where the notebooks load a pre-quantized copy of the same NF4 weights (no 10 GB export
needed for a dry run). One
:class:`fluxnb.MemoryTracker` stage per step: encode with the NF4 T5 and free it, load the NF4
transformer and the VAE, denoise, free the transformer, decode.

The default checkpoint, ``random-dev``, has FLUX.1-dev's shapes and random weights. Memory and speed
depend on shapes, not on values, so the verdict holds for the real model (its images are noise). It
is built once, on first use (:func:`fluxnb.build_random`: ~34 GB of disk, about a minute on a big GPU).

The flow runs in a child process: an out-of-memory kill or a CUDA crash is then reported instead of
ending the dry run, and the measured process holds nothing but the flow. This process never touches
the GPU, because its CUDA context would be counted in the device-level peak. The child saves what it
has measured at every stage boundary, so a killed child still leaves its finished stages.

``--model klein`` runs FLUX.2 [klein] 4B's staged flow instead (:mod:`fluxnb.klein`, as notebook 12 and the
benchmark's ``klein-fp16-encoder4bit`` row run it on a T4): Qwen3-4B in 4-bit NF4 encodes and is freed, the
transformer in the compute dtype (``--nf4-transformer``: in NF4, for a card smaller than its 7.75 GB) and the
VAE denoise klein's 4 steps at guidance 1.0, the transformer is freed, the VAE decodes. Its random stand-in
is ``random-klein`` (``random-dev`` gives it too: one ``--checkpoint`` names the stand-in, the model its family;
about 16 GB of disk).

Exit code: 0 it fits (on a CPU: the mechanics work), 1 it does not fit or the run failed, 2 it cannot
run here (no GPU, no disk to build the stand-in, a size FLUX cannot make).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from fluxnb.capacity import TIGHT_GIB
from fluxnb import klein
from fluxnb.checkpoints import (STAND_INS, build_random, cache_dir, generation_settings, is_stand_in,
                                random_stand_in_gb, random_variant, stand_in_dir, stand_in_folder)
from fluxnb.errors import NeedsGPUError, check_generation_request
from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu
from fluxnb.environment import machine_info, pick_dtype
from fluxnb.lab.supervisor import module_command, run_process, signal_name
from fluxnb.memory import MemoryTracker, StepTimer, flush, records_to_markdown
from fluxnb.stages import (
    decode,
    denoise,
    encode_prompt,
    load_denoising_pipeline,
    load_text_encoders_4bit,
    load_transformer_4bit,
)

MODEL_ID = "black-forest-labs/FLUX.1-dev"
MODEL_IDS = {"flux1": MODEL_ID, "klein": klein.MODEL_ID}  # --model: whose staged flow the dry run runs
MODEL_NAMES = {"flux1": "FLUX.1-dev", "klein": "FLUX.2 [klein] 4B"}
PROMPT, GUIDANCE, SEED = "A cat holding a sign that says hello world", 3.5, 0  # notebook 04's parameters
BUILD_TIMEOUT_S = 3600  # the random stand-in: about a minute on a big GPU, far longer on a CPU or a slow disk
NOTEBOOK_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # every notebook's parameters cell
PEAK_FIELDS = ("vram_device_gib", "vram_reserved_gib", "vram_allocated_gib", "ram_anon_gib")
Stage = Callable[[str], AbstractContextManager[None]]  # run_flow's stage(name): measured, saved at its boundaries
NO_GPU = ("No GPU here: the dry run measures a GPU. `--checkpoint tiny` runs the same path on the CPU to "
          "check the mechanics (it measures no VRAM).")


# --- the child: run the flow, measure, save ------------------------------------------------------


def run_flow(checkpoint: str, height: int, width: int, steps: int, json_path: Path, model: str = "flux1",
             nf4_transformer: bool = False) -> dict[str, Any]:
    """The child's work: the staged flow as notebook 04 runs it (``model="klein"``: as notebook 12 runs
    FLUX.2 [klein]'s, :func:`_klein_flow`), one tracker stage per step.

    The result is saved to ``json_path`` when each stage starts and ends, so a killed process still
    leaves the stages it finished and the one it was in (``stage_in_progress``). An exception is
    recorded with its stage and its traceback printed: the parent reports it, nothing is swallowed.
    """
    dtype = pick_dtype()
    text_dtype = torch.float32 if dtype == torch.float16 else dtype  # the notebooks' TEXT_DTYPE (notebook 01)
    allow_bitsandbytes_on_cpu()  # as every notebook's parameters cell: a no-op on a GPU
    machine = machine_info()
    result: dict[str, Any] = dict(
        ok=False, error=None, error_type=None, failed_stage=None, stage_in_progress="start-up",
        checkpoint=checkpoint, stand_in=is_stand_in(checkpoint), height=height, width=width, steps=steps,
        model=model, compute_dtype=str(dtype), text_encoder_dtype=str(dtype if model == "klein" else text_dtype),
        gpu=machine.gpu_name, vram_total_gib=machine.vram_gib,
        allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), stages=[], peaks={},
        s_per_step=None, step_s=[],
    )
    tracker = MemoryTracker()

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        print(f"STAGE {name}", flush=True)
        result["stage_in_progress"] = name
        _save(json_path, result)
        with tracker.stage(name):
            yield
        _record(result, tracker)
        _save(json_path, result)

    _save(json_path, result)
    try:
        if model == "klein":
            _klein_flow(stage, result, checkpoint, dtype, height, width, steps, nf4_transformer)
        else:
            _flux1_flow(stage, result, checkpoint, dtype, text_dtype, height, width, steps)
        result.update(ok=True, stage_in_progress=None)
    except Exception as err:  # recorded with its stage, reported by the parent and the exit code
        result.update(error=f"{type(err).__name__}: {err}"[:2000], error_type=type(err).__name__,
                      failed_stage=result["stage_in_progress"])
        traceback.print_exc()
    _record(result, tracker)
    _save(json_path, result)
    return result


def _flux1_flow(stage: Stage, result: dict[str, Any], checkpoint: str, dtype: torch.dtype, text_dtype: torch.dtype,
                height: int, width: int, steps: int) -> None:
    """FLUX.1's staged flow (:mod:`fluxnb.stages`) inside ``stage`` contexts, as notebook 04 runs it."""
    with stage("encode (NF4 T5 + CLIP)"):
        pipe = load_text_encoders_4bit(checkpoint, text_dtype)
        embeds = {k: v.detach() for k, v in encode_prompt(pipe, PROMPT).items()}
        del pipe
        flush()
    with stage("load NF4 transformer + VAE"):
        pipe = load_denoising_pipeline(checkpoint, load_transformer_4bit(checkpoint, dtype), dtype)
    timer = StepTimer()
    with stage(f"denoise {height}x{width}"):
        latents = denoise(pipe, embeds, height, width, steps, GUIDANCE, SEED, step_timer=timer)
    result.update(s_per_step=round(timer.seconds_per_step, 4), step_s=[round(s, 4) for s in timer.step_seconds])
    with stage("free transformer (keep VAE)"):
        vae = pipe.vae
        del pipe
        flush()
    with stage("decode (VAE)"):
        image = decode(vae, latents, height, width)
    result["image_size"] = list(image.size)


def _klein_flow(stage: Stage, result: dict[str, Any], checkpoint: str, dtype: torch.dtype, height: int, width: int,
                steps: int, nf4_transformer: bool) -> None:
    """FLUX.2 [klein]'s staged flow (:mod:`fluxnb.klein`) inside ``stage`` contexts: NF4 Qwen3 encodes and is
    freed; the transformer (``dtype``, or NF4) and the VAE denoise at klein's guidance; free; decode."""
    guidance = generation_settings(klein.MODEL_ID)["guidance"]
    quant = "nf4" if nf4_transformer else None
    with stage("encode (NF4 Qwen3)"):
        pipe = klein.load_text_encoder(checkpoint, dtype, "nf4")
        embeds = klein.encode_prompt(pipe, PROMPT)
        del pipe
        flush()
    with stage(f"load {'NF4' if quant else str(dtype).removeprefix('torch.')} transformer + VAE"):
        pipe = klein.load_denoising_pipeline(checkpoint, klein.load_transformer(checkpoint, dtype, quant), dtype)
    timer = StepTimer()
    with stage(f"denoise {height}x{width}"):
        latents = klein.denoise(pipe, embeds, height, width, steps, guidance, SEED, step_timer=timer)
    result.update(s_per_step=round(timer.seconds_per_step, 4), step_s=[round(s, 4) for s in timer.step_seconds])
    with stage("free transformer (keep VAE)"):
        vae = pipe.vae
        del pipe
        flush()
    with stage("decode (VAE)"):
        image = klein.decode(vae, latents)
    result["image_size"] = list(image.size)


def _record(result: dict[str, Any], tracker: MemoryTracker) -> None:
    """Copy the tracker's stages (a failed stage's record included) and their peaks into ``result``."""
    result["stages"] = [r.as_dict() for r in tracker.records]
    result["peaks"] = {f: max((s[f] for s in result["stages"] if s.get(f) is not None), default=None)
                       for f in PEAK_FIELDS}


def _save(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` whole or not at all: a process killed mid-write must not leave half a JSON file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, path)


# --- the random stand-in, built in a process of its own ------------------------------------------


def build_device() -> str:
    """Where :func:`fluxnb.build_random` makes its random numbers: the GPU if there is one, else the CPU.
    Either way it writes the weights to disk one tensor at a time (a few hundred MB of memory), so any
    GPU or host RAM will do, a free Colab T4 with its 12.7 GB VM included."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_stand_in(choice: str, model: str = "flux1") -> int:
    """The ``--build`` child: build the ``random-*`` stand-in of ``model``'s family (:func:`random_variant`:
    ``random-dev``/``-schnell`` for FLUX.1, ``random-klein`` for klein) and print its folder (exit 0), or say
    why it cannot be built here (exit 2). Its CUDA context ends with it, not in the dry run."""
    variant = random_variant(MODEL_IDS[model], choice)
    device = build_device()
    print(f"Building on the {device.upper()}.", file=sys.stderr, flush=True)
    try:
        folder = build_random(variant, device=device)
    except (OSError, NeedsGPUError) as err:  # check_free_disk's "needs about 36 GB of disk ...", a full disk, no GPU
        print(f"Could not build {choice}: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def prepare_checkpoint(choice: str, model: str = "flux1") -> str | None:
    """The folder the child loads for ``--checkpoint`` and ``model``; None (after saying why) if it cannot be built.

    ``tiny`` is built here (CPU only, a second): the model's own tiny stand-in. ``random-*`` (for klein every
    one of them gives ``random-klein``) is built by a child process, because building on the GPU would leave
    a CUDA context in this process, counted in every later peak. Anything else is used as given.
    """
    if choice == "tiny" or choice not in STAND_INS:
        return stand_in_folder(MODEL_IDS[model], choice)
    variant = random_variant(MODEL_IDS[model], choice)
    folder = stand_in_dir("random", variant)
    if is_stand_in(folder) == "random":
        return str(folder)
    print(f"Building the random-{variant} stand-in once ({MODEL_NAMES[model]}'s real shapes, random weights): "
          f"~{random_stand_in_gb(variant):.0f} GB of disk in {cache_dir()} (FLUXNB_CACHE), about a minute on a big "
          "GPU, longer on the CPU. Later runs reuse it.", flush=True)
    build = run_process(module_command("fluxnb.fit", "--build", "--checkpoint", choice, "--model", model),
                        BUILD_TIMEOUT_S, output="stdout")
    if build.returncode != 0:
        how = "stopped" if build.returncode and build.returncode > 0 else build.describe()
        print(f"The random-{variant} build {how}; nothing was measured. The reason is above.", file=sys.stderr)
        return None
    return build.output.strip().splitlines()[-1]


# --- the parent: run the child, judge ------------------------------------------------------------


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ``environ`` plus the allocator setting the notebooks make with
    ``os.environ.setdefault`` -- so, as in the notebooks, a value the user set wins."""
    return {**NOTEBOOK_ENV, **environ}


def child_command(worker_args: list[str]) -> list[str]:
    """The command line of the measured child (the tests replace it with one that dies)."""
    return module_command("fluxnb.fit", "--worker", *worker_args)


def run_child(checkpoint: str, height: int, width: int, steps: int, timeout_s: int, out: Path,
              model: str = "flux1", nf4_transformer: bool = False) -> dict[str, Any]:
    """Run the flow in a child process and return its result, completed with how the child ended.

    The child's output goes straight to ours (its ``STAGE`` lines show progress). After ``timeout_s``
    the child is killed: the dry run never hangs.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # an old result must never pass for this run's
    cmd = child_command(["--checkpoint", checkpoint, "--height", str(height), "--width", str(width),
                         "--steps", str(steps), "--json", str(out), "--model", model,
                         *(["--nf4-transformer"] if nf4_transformer else [])])
    code = run_process(cmd, timeout_s, env=child_env(os.environ)).returncode  # None: killed at the timeout
    result = json.loads(out.read_text()) if out.is_file() else dict(
        ok=False, error=None, failed_stage=None, stage_in_progress="start-up", stages=[], peaks={})
    stage = result.get("stage_in_progress") or "start-up"
    if code is None:
        result.update(ok=False, failed_stage=stage, timed_out_s=timeout_s,
                      error=f"timed out after {timeout_s} s in stage '{stage}'")
    elif code < 0:
        name = signal_name(code)
        result.update(ok=False, failed_stage=stage, signal=name, error=f"killed by {name} in stage '{stage}'")
    elif (code != 0 or not result.get("ok")) and not result.get("error"):
        result.update(ok=False, failed_stage=stage,
                      error=f"its process exited with code {code} in stage '{stage}' without recording an error")
    _save(out, result)
    return result


def _is_vram_oom(result: dict[str, Any]) -> bool:
    error = result.get("error") or ""
    return "OutOfMemoryError" in error or "out of memory" in error.lower()


def _next_step(result: dict[str, Any]) -> str:
    """What to do about a run that did not finish, by how it ended."""
    if result.get("signal") == "SIGKILL":
        return ("SIGKILL is what the kernel's out-of-memory killer sends: probably host RAM ran out. The course "
                "does NOT fit this machine's RAM as it is: close other programs, or use a machine with more RAM "
                "(the RAM columns show what each finished stage used).")
    if result.get("signal"):
        return (f"{result['signal']} is a crash (CUDA, driver or a library), not a measurement: the output above "
                "shows where. Update the GPU driver or the libraries and run again.")
    if result.get("timed_out_s"):
        return "Loading from a slow disk can take long: run again with a larger --timeout."
    if _is_vram_oom(result) and result.get("model") == "klein":
        return ("It does NOT fit as it is; `--nf4-transformer` (the transformer in 4 bits) needs about 5 GB less, "
                "and a smaller --height/--width needs less too.")
    if _is_vram_oom(result):
        return ("It does NOT fit as it is; notebook 04 compares recipes that need less VRAM "
                "(a smaller --height/--width needs less too).")
    return "That is not a memory verdict: the error and the output above say what went wrong; fix it and run again."


def fit_verdict(result: dict[str, Any], total_gib: float | None, tight_gib: float = TIGHT_GIB) -> tuple[bool, str]:
    """Did the flow fit the GPU it ran on, and with how much to spare? ``total_gib`` None: no GPU.

    The dry run runs on the user's own GPU, so finishing is the proof that it fits; the device-level
    peak (CUDA context and other processes, such as a desktop, included) says by how much. Less than
    ``tight_gib`` to spare is flagged: another program opening on the GPU could push it over. On a
    CPU, or with the tiny stand-in, only the mechanics were checked, and the message says so.
    """
    where = f"this {total_gib:.2f} GiB GPU" if total_gib is not None else "this machine"
    klein_run = result.get("model") == "klein"
    flow, plain = (("FLUX.2 [klein]'s staged flow",) * 2 if klein_run
                   else ("The course's staged NF4 flow", "The course's staged flow"))
    command, stand_in, real = (("`python -m fluxnb.fit --model klein`", "random-klein", "FLUX.2 [klein] 4B") if klein_run
                               else ("`python -m fluxnb.fit`", "random-dev", "FLUX.1-dev"))
    if not result.get("ok"):
        return False, (f"{flow} did not finish on {where}: {result.get('error')}. " + _next_step(result))
    if total_gib is None:
        return True, (f"{plain} ran end to end on the CPU: this checked the mechanics only and "
                      f"measured no VRAM. On a GPU, {command} ({stand_in}: {real}'s real shapes) "
                      "says whether the course fits it.")
    if result.get("stand_in") == "tiny":
        return True, (f"{plain} ran end to end on {where} with the tiny stand-in: this checked the "
                      f"mechanics only, and its VRAM says nothing about {real}. Run {command} "
                      f"({stand_in}) for the verdict.")
    peak = result.get("peaks", {}).get("vram_device_gib") or 0.0
    spare = total_gib - peak
    message = (f"{flow} fits: its peak was {peak:.2f} GiB of VRAM (CUDA context and other "
               f"processes included) on this {total_gib:.2f} GiB GPU, {spare:.2f} GiB to spare.")
    if spare < tight_gib:
        message += " That is tight: close other programs that use the GPU before you run the course."
    else:
        message += " Next: notebook 00 checks your token and disk for the real download."
    return True, message


def report(result: dict[str, Any], verdict: str) -> str:
    """What the dry run prints at the end: the per-stage table, s/step, the machine, the verdict."""
    lines = [""]
    if result.get("stages"):
        lines += [records_to_markdown(result["stages"]), ""]
    if result.get("s_per_step") is not None:
        steps = result["steps"]
        which = ("one step, one-off costs included" if steps == 1 else
                 f"{'step 2' if steps == 2 else f'median of steps 2-{steps}'}: the first carries one-off costs")
        lines.append(f"{result['height']}x{result['width']}: {result['s_per_step']:.3f} s/step ({which})")
    if result.get("gpu"):
        lines.append(f"GPU: {result['gpu']}, {result['vram_total_gib']:.2f} GiB, computing in {result['compute_dtype']}, "
                     f"PYTORCH_CUDA_ALLOC_CONF={result['allocator_conf'] or '(unset)'}")
    elif result.get("compute_dtype"):
        lines.append(f"CPU only, computing in {result['compute_dtype']}: no VRAM was measured.")
    lines += ["", verdict]
    return "\n".join(lines)


def dry_run(checkpoint_choice: str, height: int, width: int, steps: int, timeout_s: int,
            json_path: Path | None, model: str = "flux1", nf4_transformer: bool = False) -> int:
    """Check what can be checked here, build the stand-in if needed, run the child, print the verdict.

    ``model``: ``"flux1"`` (the course's FLUX.1-dev flow) or ``"klein"`` (FLUX.2 [klein] 4B's, with the
    transformer in NF4 if ``nf4_transformer``)."""
    is_tiny = checkpoint_choice == "tiny" or is_stand_in(checkpoint_choice) == "tiny"
    if not torch.cuda.is_available() and not is_tiny:  # this process must not start CUDA: only ask
        print(NO_GPU, file=sys.stderr)
        return 2
    checkpoint = prepare_checkpoint(checkpoint_choice, model)
    if checkpoint is None:
        return 2
    flow = "the course's staged NF4 flow" if model == "flux1" else (
        f"FLUX.2 [klein]'s staged flow (NF4 Qwen3, {'NF4 transformer' if nf4_transformer else 'transformer in the compute dtype'})")
    print(f"Dry run: {flow} at {height}x{width}, {steps} steps, on {checkpoint} "
          f"(in a child process, at most {timeout_s} s).", flush=True)
    with tempfile.TemporaryDirectory(prefix="fluxnb-fit-") as tmp:
        out = json_path or Path(tmp) / "fit.json"
        result = run_child(checkpoint, height, width, steps, timeout_s, out, model, nf4_transformer)
        fits, verdict = fit_verdict(result, result.get("vram_total_gib"))
        result.update(fits=fits, verdict=verdict)
        _save(out, result)
    print(report(result, verdict) + (f"\nDetails: {json_path}" if json_path else ""), flush=True)
    return 0 if fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fluxnb.fit", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="random-dev",
                        help="random-dev (default: FLUX.1-dev's real shapes, random weights; built once, ~34 GB of "
                             "disk; with --model klein: random-klein, ~16 GB), random-schnell, random-klein, tiny "
                             "(checks the mechanics, on a CPU too), or a pipeline folder of the model")
    parser.add_argument("--model", choices=sorted(MODEL_IDS), default="flux1",
                        help="flux1 (default: the course's FLUX.1-dev flow) or klein (FLUX.2 [klein] 4B, notebook 12)")
    parser.add_argument("--nf4-transformer", action="store_true",
                        help="with --model klein: the transformer in NF4 (for a card smaller than its 7.75 GB)")
    parser.add_argument("--height", type=int, default=1024, help="image height, a multiple of 16 (default 1024)")
    parser.add_argument("--width", type=int, default=1024, help="image width, a multiple of 16 (default 1024)")
    parser.add_argument("--steps", type=int, default=4,
                        help="denoising steps (default 4); memory does not grow with steps, s/step is their median")
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds the measured run may take before it is stopped (default 900); building "
                             "random-dev the first time is not counted")
    parser.add_argument("--json", type=Path, help="also write the full result (every stage, peaks, verdict) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the measured child
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # the stand-in's builder
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.build:
        return build_stand_in(ns.checkpoint, ns.model)
    if ns.worker:
        if ns.json is None:
            parser.error("--worker needs --json")
        return 0 if run_flow(ns.checkpoint, ns.height, ns.width, ns.steps, ns.json, ns.model,
                             ns.nf4_transformer)["ok"] else 1
    try:
        check_generation_request(ns.height, ns.width, ns.steps)  # a second here, not after loading 34 GB
    except ValueError as err:
        parser.error(str(err))
    if ns.timeout < 1:
        parser.error(f"--timeout={ns.timeout} must be at least 1 second")
    if ns.nf4_transformer and ns.model != "klein":
        parser.error("--nf4-transformer is for --model klein (FLUX.1's flow always loads its transformer in NF4)")
    return dry_run(ns.checkpoint, ns.height, ns.width, ns.steps, ns.timeout, ns.json, ns.model, ns.nf4_transformer)


if __name__ == "__main__":
    sys.exit(main())
