"""Run the whole course: every notebook in a fresh kernel, optionally inside a small machine's limits.

    FLUXNB_CHECKPOINT=tiny python -m fluxnb.course course-output                 # any machine, CPU is fine
    FLUXNB_CHECKPOINT=random-dev python -m fluxnb.course OUT --envelope colab-t4  # a GPU machine, as root

writes ``OUT/00_setup.ipynb`` ... (executed copies; the originals are untouched), everything the
notebooks make under ``OUT`` (the runner sets ``FLUXNB_OUTPUT``), and ``OUT/course-results.json``:
per notebook pass/fail, wall time, the failing cell and its cause, and, where measured, the peaks.

A fresh kernel per notebook is how Colab runs them: each one must stand on its own. With
``--envelope`` each notebook also gets its own output folder (a fresh Colab VM has none of the
earlier notebooks' files) and runs inside the target's limits (:mod:`fluxnb.envelopes`):

* **VRAM**: this process holds all device memory above the target's (``14.74`` GiB for a T4), so the
  kernel's CUDA context, ``torch.cuda.mem_get_info`` and a real out-of-memory error behave as there;
* **no bf16** where the target has none: the kernels see ``FLUXNB_ENVELOPE`` and ``fluxnb.pick_dtype``
  answers fp16, as on the T4;
* **host RAM**: each kernel runs in its own cgroup v2 group with ``memory.max`` and swap off (needs
  root and the memory controller; otherwise the results say "RAM not enforced").

The runner never hangs on a dead kernel: it watches the kernel process, and when it dies (an OOM kill,
a segfault) that notebook ends within seconds, its cause is named (the signal, the cgroup's
``oom_kill`` count) and its partly executed copy is kept. SIGINT/SIGTERM stop the run and its kernels.
The exit code is 0 only if every notebook passed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fluxnb import hub
from fluxnb.capacity import GIB
from fluxnb.checkpoints import ENV_VAR as CHECKPOINT_VAR, stand_in_kind
from fluxnb.envelopes import ENV_VAR, ENVELOPES, OTHERS_VAR, Envelope
from fluxnb.lab.limits import RamCgroup, VramHolder
from fluxnb.lab.supervisor import entry_command, run_process, signal_name
from fluxnb.memory import anon_ram_bytes
from fluxnb.prequantized import size_text
from fluxnb.slices import SLICES_VAR

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
RESULTS_NAME = "course-results.json"


@dataclass
class NotebookResult:
    """What one notebook did. GiB and seconds; a peak is None where it was not measured."""

    notebook: str
    passed: bool
    seconds: float
    failed_cell: int | None = None  # index of the cell that failed, in the notebook's cells
    failed_source: str | None = None  # its first line, to find it
    cause: str | None = None
    vram_device_peak_gib: float | None = None  # device memory of the kernel (CUDA context included)
    ram_peak_gib: float | None = None  # the cgroup's memory.peak (page cache it charged included)
    ram_anon_peak_gib: float | None = None  # sampled anonymous RAM of the kernel and its children
    oom_kills: int | None = None
    executed: str = ""
    downloaded_bytes: int | None = None  # what the notebook fetched from the stand-in Hub into its empty cache
    downloads: dict[str, int] | None = None  # the same, by repository


# --- one notebook ---------------------------------------------------------------------------------


def kernel_spec_manager(cgroup: RamCgroup | None) -> Any:
    """Kernel specs whose "python3" is this interpreter, started in ``cgroup`` (:mod:`fluxnb.lab.enter`)."""
    from ipykernel.kernelspec import RESOURCES
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    argv = entry_command([sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                         cgroup=cgroup.path if cgroup else None)

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir=RESOURCES, argv=argv, display_name="Python 3 (fluxnb course)",
                              language="python", metadata={"debugger": False})

    return ThisPython()


@dataclass
class _Execution:
    """State shared between the thread that runs nbclient and the main thread that watches it."""

    km: Any = None
    cell: int | None = None
    shutting_down: bool = False  # set before the runner's own shutdown: that death is not a crash
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def process(self) -> subprocess.Popen[bytes] | None:
        return getattr(getattr(self.km, "provisioner", None), "process", None)


def _execute(nb: Any, state: _Execution, cwd: Path, env: dict[str, str], timeout_s: int, cgroup: RamCgroup | None) -> None:
    """Run ``nb`` in a new kernel (this thread's own event loop); record the failure, if any, in ``state``."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    async def run() -> None:
        state.km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager(cgroup))

        def on_cell(cell: Any, cell_index: int, **_: Any) -> None:
            state.cell = cell_index

        client = NotebookClient(nb, km=state.km, timeout=timeout_s, on_cell_execute=on_cell,
                                resources={"metadata": {"path": str(cwd)}})
        try:
            await client.async_execute(env=env)
        finally:
            state.shutting_down = True
            if state.km.has_kernel:
                await state.km.shutdown_kernel(now=True)

    try:
        asyncio.run(run())
    except BaseException as err:  # handed to the main thread, which reports it: nothing is swallowed
        state.error = err
    finally:
        state.done.set()


def _process_tree_anon_bytes(pid: int) -> int:
    """Anonymous RAM of a process and its children (0 once they are gone), summed over the processes: a page
    a forked child still shares with its parent (copy-on-write) counts once in each."""
    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += anon_ram_bytes(proc.pid)
        except psutil.Error:  # it ended between the listing and the reading
            continue
    return total


class Stop(Exception):
    """SIGINT or SIGTERM arrived: the run stops after the current notebook's kernel is killed."""


_STOP: dict[str, int] = {}
_RUNNING: set[int] = set()  # process groups of running kernels, killed on SIGINT/SIGTERM


def _on_signal(signum: int, frame: Any) -> None:
    _STOP.setdefault("signal", signum)
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_notebook(path: Path, output: Path, env: dict[str, str], timeout_s: int, cgroup: RamCgroup | None = None,
                 vram: VramHolder | None = None, sample_s: float = 0.05, grace_s: float = 10.0) -> NotebookResult:
    """Execute one notebook in a fresh kernel; write the executed (or partly executed) copy to ``output``.

    The main thread watches the kernel process: if it dies, the notebook ends at most ``grace_s``
    later, with the signal and the cgroup's OOM kills as its cause, whatever nbclient is doing.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    state = _Execution()
    others = vram.used_bytes() if vram else 0  # everything on the device before the kernel starts
    kernel_env = {**env, **({OTHERS_VAR: str(others)} if vram else {})}
    thread = threading.Thread(target=_execute, args=(nb, state, path.parent, kernel_env, timeout_s, cgroup),
                              name=f"nbclient {path.name}", daemon=True)
    start = time.perf_counter()
    thread.start()
    vram_peak = ram_peak = 0
    died_at: float | None = None
    returncode = None
    pgid = None
    while not state.done.wait(sample_s):
        proc = state.process()
        if proc is None:
            continue
        if pgid is None:
            pgid = proc.pid
            _RUNNING.add(pgid)
        ram_peak = max(ram_peak, _process_tree_anon_bytes(proc.pid))
        if vram:
            vram_peak = max(vram_peak, vram.used_bytes() - others)
        if died_at is None and not state.shutting_down and proc.poll() is not None:
            died_at, returncode = time.perf_counter(), proc.returncode
        if died_at is not None and time.perf_counter() - died_at > grace_s:
            break  # nbclient did not notice: stop waiting for it (its thread is a daemon)
    seconds = time.perf_counter() - start
    if pgid is not None:
        _RUNNING.discard(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)  # anything the kernel started that outlived it
        except ProcessLookupError:
            pass
    output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, output)  # written even when a cell failed: the traceback is in it
    result = NotebookResult(notebook=path.name, passed=state.error is None and state.done.is_set(),
                            seconds=round(seconds, 1), executed=str(output),
                            vram_device_peak_gib=round(vram_peak / GIB, 3) if vram else None,
                            ram_anon_peak_gib=round(ram_peak / GIB, 3) if ram_peak else None)
    if cgroup is not None:
        result.oom_kills = cgroup.oom_kills()
        result.ram_peak_gib = cgroup.peak_gib()
    if not result.passed:
        result.failed_cell = state.cell
        if state.cell is not None:
            lines = "".join(nb.cells[state.cell].source).strip().splitlines()
            result.failed_source = lines[0][:120] if lines else ""
        result.cause = _cause(state, returncode, result.oom_kills, cgroup)
    return result


def _cause(state: _Execution, returncode: int | None, oom_kills: int | None, cgroup: RamCgroup | None) -> str:
    """One line: why the notebook failed."""
    if "signal" in _STOP:
        return f"stopped by {signal.Signals(_STOP['signal']).name}"
    err = state.error
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:  # the cell raised; the kernel was fine
        return f"{ename}: {evalue}"[:400]
    if returncode is not None:  # the kernel died
        why = "kernel died: " + (f"killed by {signal_name(returncode)}" if returncode < 0
                                 else f"exited with code {returncode}")
        if oom_kills:
            limit = int((cgroup.path / "memory.max").read_text()) / GIB if cgroup else None
            why += f" (cgroup oom_kill={oom_kills}: host RAM over {limit:g} GiB)"
        return why
    if err is None:
        return "kernel died and nbclient did not return"
    return f"{type(err).__name__}: {err}"[:400]


# --- the whole course -----------------------------------------------------------------------------


def provenance(command: str) -> dict[str, Any]:
    """GPU, driver, versions, date and command: what a reader needs to weigh the numbers."""
    import torch

    from fluxnb.environment import library_versions

    driver = None
    if torch.cuda.is_available() and shutil.which("nvidia-smi"):
        out = run_process(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30, output="stdout")
        driver = out.output.strip().splitlines()[0] if out.output.strip() else None  # one line per GPU: the same
    return dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, driver=driver,
                gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                cuda=torch.version.cuda, libraries=library_versions(), python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command,
                checkpoint=os.environ.get("FLUXNB_CHECKPOINT", ""))


def run_course(output: Path, notebooks: list[Path], timeout_s: int = 1800, envelope: Envelope | None = None,
               command: str = "") -> dict[str, Any]:
    """Execute ``notebooks`` in order, each in its own kernel; return (and save) the results.

    A failed notebook does not stop the run: each one stands alone, so each gets its verdict.
    SIGINT/SIGTERM do stop it, after killing the running kernel.
    """
    output.mkdir(parents=True, exist_ok=True)
    served = stand_in_kind(os.environ.get(CHECKPOINT_VAR, "")) is not None  # downloads go through the stand-in Hub
    results: dict[str, Any] = dict(envelope=envelope.as_dict() if envelope else None, provenance=provenance(command),
                                   notebooks=[])
    vram = VramHolder(envelope.vram_gib) if envelope else None
    if vram:
        results["vram_free_for_kernels_gib"] = vram.free_gib
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for path in notebooks:
            folder = output / path.stem if envelope else output  # a fresh Colab VM has no earlier outputs
            env = {**os.environ, "FLUXNB_OUTPUT": str(folder.resolve())}
            downloads = _fresh_hub_cache(env, output, path.stem) if served else None
            cgroup = None
            if envelope:
                env[ENV_VAR] = envelope.name
                cgroup = RamCgroup.create(f"fluxnb-{envelope.name}-{path.stem}", envelope.ram_gib)
                results["ram_enforced"] = cgroup is not None
            try:
                result = run_notebook(path, output / path.name, env, timeout_s, cgroup, vram)
            finally:
                if cgroup is not None:
                    cgroup.remove()
                if downloads is not None:
                    shutil.rmtree(env[hub.CACHE_VAR], ignore_errors=True)  # a VM's disk goes with the VM
            if downloads is not None:
                result.downloads = downloaded_by_repository(downloads)
                result.downloaded_bytes = sum(result.downloads.values())
            results["notebooks"].append(asdict(result))
            _save(output / RESULTS_NAME, results)
            print(_line(result), flush=True)
            if "signal" in _STOP:
                raise Stop(signal.Signals(_STOP["signal"]).name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    results["passed"] = all(r["passed"] for r in results["notebooks"])
    _save(output / RESULTS_NAME, results)
    return results


def _fresh_hub_cache(env: dict[str, str], output: Path, name: str) -> Path:
    """Give the next kernel an empty Hugging Face cache, an empty slices folder and a download log of its own, as
    a fresh Colab VM has (its stand-in Hub reads them from ``env``: :mod:`fluxnb.hub`); return the log's path."""
    cache, log = output / "hub-cache" / name, output / "downloads" / f"{name}.jsonl"
    shutil.rmtree(cache, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    env[hub.CACHE_VAR], env[hub.LOG_VAR] = str(cache.resolve()), str(log.resolve())
    env[SLICES_VAR] = str((cache / "slices").resolve())  # 05-07's slices are fetched again too
    return log


def downloaded_by_repository(log: Path) -> dict[str, int]:
    """Bytes the stand-in Hub sent, by repository, from its log (one JSON line per transfer; none: nothing)."""
    totals: dict[str, int] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            totals[entry["repo"]] = totals.get(entry["repo"], 0) + entry["bytes"]
    return totals


def _save(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def _line(r: NotebookResult) -> str:
    peaks = ", ".join(f"{k} {v:.2f} GiB" for k, v in (("VRAM", r.vram_device_peak_gib), ("RAM", r.ram_peak_gib),
                                                      ("RAM anon", r.ram_anon_peak_gib)) if v is not None)
    verdict = "passed" if r.passed else f"FAILED in cell {r.failed_cell} ({r.failed_source!r}): {r.cause}"
    fetched = "" if r.downloaded_bytes is None else f"; downloaded {size_text(r.downloaded_bytes)}"
    return f"{r.notebook}: {verdict}; {r.seconds:.1f} s" + (f"; {peaks}" if peaks else "") + fetched


# --- the results as a table (README and notebook 04 show it, generated) --------------------------


def versions_line(p: dict[str, Any], extra: tuple[str, ...] = ()) -> str:
    """What a run's numbers depend on, from its :func:`provenance`: "date; driver, CUDA, torch, diffusers,
    transformers, bitsandbytes" (and the ``extra`` libraries), as every results table states it."""
    names = ("torch", "diffusers", "transformers", "bitsandbytes", *extra)
    return (f"{p['date'][:10]}; driver {p['driver']}, CUDA {p.get('cuda')}, "
            + ", ".join(f"{name} {p['libraries'][name]}" for name in names))


def results_markdown(results: dict[str, Any]) -> str:
    """A markdown table of a course run, with what it ran on: nothing in it is typed by hand."""
    p, env = results["provenance"], results.get("envelope")
    where = (f"envelope `{env['name']}` ({env['vram_gib']} GiB VRAM with the CUDA context, "
             f"{'no bf16 (fp16)' if not env['bf16'] else 'bf16'}, host RAM {env['ram_gib']:g} GiB "
             f"{'enforced by a cgroup v2 memory.max, swap off' if results.get('ram_enforced') else 'NOT enforced'})"
             if env else "no envelope")
    head = (f"`{p['command']}` with `FLUXNB_CHECKPOINT={p['checkpoint'] or '(unset)'}`, {where}, on "
            f"{p['gpu'] or 'a CPU'} ({versions_line(p)})"
            + (f"; {results['source']}" if results.get("source") else "") + ":")
    rows = ["| notebook | result | VRAM peak, device (GiB) | RAM peak, cgroup (GiB) | RAM peak, anon (GiB) | time (s) |",
            "|---|---|---|---|---|---|"]
    for r in results["notebooks"]:
        verdict = "pass" if r["passed"] else f"**FAIL** in cell {r['failed_cell']}: {_short(r['cause'])}"
        rows.append(f"| {r['notebook']} | {verdict} | {_f(r['vram_device_peak_gib'])} | {_f(r['ram_peak_gib'])} "
                    f"| {_f(r['ram_anon_peak_gib'])} | {r['seconds']:.0f} |")
    note = ("*VRAM* is the kernel's own device memory (CUDA context included), sampled every 50 ms by the runner; "
            "*RAM, cgroup* is the kernel's cgroup `memory.peak`, which also counts the file pages it read "
            "(the OS can drop those under pressure); *RAM, anon* is the sampled anonymous memory of the kernel and "
            "its child processes, summed: pages a forked child shares with its parent count twice, so it can "
            "exceed the cgroup's figure, which is the one a RAM cap enforces.")
    return "\n".join([head, "", *rows, "", note]) + "\n"


def downloads_markdown(results: dict[str, Any]) -> str:
    """What each notebook of a course run downloaded from the stand-in Hub into its empty cache (as on a fresh
    VM), as a markdown table with where it was measured: from the runner's counts, not from file lists."""
    p = results["provenance"]
    head = (f"`{p['command']}` with `FLUXNB_CHECKPOINT={p['checkpoint'] or '(unset)'}`, each notebook starting "
            f"from an empty Hugging Face cache, on {p['gpu'] or 'a CPU'} ({p['date'][:10]}; Python {p['python']}, "
            + ", ".join(f"{name} {p['libraries'][name]}" for name in ("torch", "diffusers", "transformers",
                                                                      "huggingface_hub")) + "):")
    rows = ["| notebook | result | downloaded | from |", "|---|---|---|---|"]
    for r in results["notebooks"]:
        fetched = r.get("downloaded_bytes")
        sources = ", ".join(f"{repo} {size_text(n)}" for repo, n in sorted((r.get("downloads") or {}).items()))
        rows.append(f"| {r['notebook']} | {'pass' if r['passed'] else 'FAIL'} | "
                    f"{'-' if fetched is None else size_text(fetched)} | {sources or '-'} |")
    total = sum(r.get("downloaded_bytes") or 0 for r in results["notebooks"])
    return "\n".join([head, "", *rows, "", f"All notebooks together: {size_text(total)}."]) + "\n"


def _short(cause: str | None) -> str:
    """The first two sentences of a cause (a CUDA OOM message runs on for a paragraph), for a table cell."""
    sentences = (cause or "").replace("|", "/").split(". ")
    return ". ".join(sentences[:2])[:200].rstrip(".") + "."


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxnb.course", description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder for executed notebooks, what they make, and the results JSON")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    parser.add_argument("--envelope", choices=sorted(ENVELOPES),
                        help="run inside a small machine's limits (GPU machine; root for the RAM cap)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_intermixed_args(argv)  # notebooks may follow the options
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if not notebooks:
        parser.error(f"no notebooks found in {NOTEBOOKS}")
    envelope = ENVELOPES[args.envelope] if args.envelope else None
    if envelope:
        import torch

        if not torch.cuda.is_available():
            print(f"--envelope {envelope.name} caps a GPU's memory: run it on a machine with a GPU.", file=sys.stderr)
            return 2
    print(f"FLUXNB_CHECKPOINT={os.environ.get('FLUXNB_CHECKPOINT', '') or '(unset: real models)'}"
          + (f"; envelope {envelope.name}: {envelope.description}" if envelope else ""), flush=True)
    command = "python -m fluxnb.course " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        results = run_course(args.output, notebooks, args.timeout, envelope, command)
    except Stop as stop:
        print(f"stopped by {stop}; results so far in {args.output / RESULTS_NAME}", file=sys.stderr)
        return 128 + int(signal.Signals[str(stop)])
    n, failed = len(results["notebooks"]), [r for r in results["notebooks"] if not r["passed"]]
    total = sum(r["seconds"] for r in results["notebooks"])
    if envelope and not results.get("ram_enforced"):
        print("RAM not enforced: the RAM cap needs root and cgroup v2 with the memory controller.", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {n} notebooks FAILED ({', '.join(r['notebook'] for r in failed)}); executed copies "
              f"and {RESULTS_NAME} in {args.output}", file=sys.stderr)
        return 1
    print(f"all {n} notebooks ran in {total:.1f} s; executed copies in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
