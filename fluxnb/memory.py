"""Memory helpers: free what can be freed, and measure what each stage of a run costs.

Three views of GPU memory, because they answer different questions:

* **allocated**: bytes in live tensors (``torch.cuda.max_memory_allocated``) -- what your code holds;
* **reserved**: what PyTorch's caching allocator took from the driver (``max_memory_reserved``) --
  allocated plus cached blocks and fragmentation;
* **device**: what the GPU itself has in use (``torch.cuda.mem_get_info``, sampled), which adds the
  CUDA context (0.6-0.7 GiB measured on an H100) and any other process. This is the number that must
  fit on an 8 GB card.

Host RAM is sampled the same way, and the course shows one figure for it everywhere a learner reads
whether something fits: the **anonymous memory** of this process (``RssAnon``: tensors and Python
objects). It leaves out the pages of the safetensors files that loading maps into memory: the OS
can drop those under pressure and read them again, so a RAM cap does not end a run for them, yet
the process's lifetime peak resident set (``ru_maxrss``) counts them, which is why that number can
stand far above what a machine really needs. ``ru_maxrss`` is still recorded (``ram_maxrss_gib``,
for the benchmarks' notes), never shown in a table. Memory pinned by ``torch``'s ``pin_memory()``
(diffusers' group offload) is not anonymous either; the course's own streamer page-locks
anonymous memory, which is counted.
On a CPU-only machine the VRAM fields are ``None`` (absent), never zero.
"""

from __future__ import annotations

import gc
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from fluxnb.capacity import GIB
from fluxnb.envelopes import others_vram_bytes



def bytes_to_giga_bytes(n_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes), the unit nvidia-smi and PyTorch's docs call "GB"."""
    return n_bytes / GIB


def flush() -> None:
    """Free memory between stages: collect garbage, empty PyTorch's CUDA cache, reset peak stats.

    Delete your own references first (``del pipe``): nothing can free a tensor a variable holds.
    On a CPU-only machine only the garbage collection runs.
    """
    for sampler in list(_ACTIVE_SAMPLERS):  # a running MemoryTracker stage keeps its peak
        sampler.sample()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def anon_ram_bytes(pid: int | None = None) -> int:
    """Anonymous resident memory of process ``pid``, this one by default (Linux ``RssAnon``); plain RSS
    elsewhere. A process that is gone raises ``psutil.NoSuchProcess``."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.Process(pid).memory_info().rss)


def max_rss_bytes() -> int:
    """The kernel's peak resident set of this process over its whole life (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def course_ram_peak_gib(row: Mapping[str, Any]) -> float | None:
    """The host RAM one notebook took in a committed course run, as the course's one host-RAM figure.

    ``row`` is one of :func:`fluxnb.committed_run`'s ``notebooks``. The runner summed the anonymous
    memory of the notebook's kernel and its child processes (``ram_anon_peak_gib``), reading them one
    after another; a page a forked child still shares with the kernel counts once in each (torch.compile's
    workers are forked), so the sum can exceed what the group ever held at once: 09 and 06 inside
    colab-t4 read above the cgroup's own peak. That peak (``ram_peak_gib``, where a RAM cap was enforced)
    counts each page once, but with the file pages the OS can drop. Both bound the anonymous memory in
    use from above, so this is the smaller of them; None if neither was measured.
    """
    values = [v for v in (row.get("ram_anon_peak_gib"), row.get("ram_peak_gib")) if v is not None]
    return min(values) if values else None


def device_used_bytes() -> int | None:
    """Bytes in use on the current GPU as the device reports it (CUDA context included).

    Inside an envelope (:mod:`fluxnb.envelopes`) the memory the runner holds to cap the card is not
    counted: the number is what this notebook would use on the small card itself.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(total - free) - others_vram_bytes()


@dataclass
class StageRecord:
    """What one stage cost. GiB and seconds; VRAM fields are None on a machine without a GPU."""

    stage: str
    seconds: float
    vram_allocated_gib: float | None
    vram_reserved_gib: float | None
    vram_device_gib: float | None
    ram_anon_gib: float
    ram_maxrss_gib: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_ACTIVE_SAMPLERS: set[PeakSampler] = set()


class PeakSampler(threading.Thread):
    """Background thread that keeps the peak of each value ``read()`` returns (bytes, by name).

    :class:`MemoryTracker` reads host anon RAM and the three VRAM views of this process's GPU,
    :class:`GpuTracker` the device memory of every GPU: one sampler, two readings. It samples once when
    made, every ``interval_s`` while it runs, and once when stopped; :func:`flush` samples every running
    one first, so a reset of the allocator's peak counters inside a stage does not hide that stage's peak.
    """

    def __init__(self, read: Callable[[], Mapping[str, int]], interval_s: float) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._stop_event = threading.Event()
        self.sample()
        _ACTIVE_SAMPLERS.add(self)

    def sample(self) -> None:
        for key, value in self.read().items():
            self.peaks[key] = max(self.peaks.get(key, value), value)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def stop(self) -> dict[str, int]:
        """Stop sampling (after one last sample) and return the peaks."""
        _ACTIVE_SAMPLERS.discard(self)
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peaks


def _this_process() -> dict[str, int]:
    """MemoryTracker's reading: host anon RAM, and on a GPU the device's use and the allocator's peak counters
    (polled, because a ``flush()`` inside a stage resets them)."""
    out = {"ram": anon_ram_bytes()}
    used = device_used_bytes()
    if used is not None:
        out["device"] = used
    if torch.cuda.is_available():
        out["allocated"] = torch.cuda.max_memory_allocated()
        out["reserved"] = torch.cuda.max_memory_reserved()
    return out


class MemoryTracker:
    """Record wall time and peak VRAM/RAM for named stages of a run.

    >>> tracker = MemoryTracker()
    >>> with tracker.stage("encode prompt"):
    ...     pass  # load T5, encode, free
    >>> print(tracker.to_markdown())  # doctest: +SKIP

    Peaks are per stage: the allocator's peak counters are reset when a stage starts, and the
    background sampler (every ``interval_s``) starts from the current level. A ``flush()`` inside a
    stage does not hide the stage's peak: the sampler polls the peak counters before they are reset.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.records: list[StageRecord] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sampler = PeakSampler(_this_process, self.interval_s)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peaks = sampler.stop()
            self.records.append(StageRecord(
                stage=name,
                seconds=round(seconds, 3),
                vram_allocated_gib=_gib(peaks["allocated"]) if cuda else None,
                vram_reserved_gib=_gib(peaks["reserved"]) if cuda else None,
                vram_device_gib=_gib(peaks["device"]) if "device" in peaks else None,
                ram_anon_gib=_gib(peaks["ram"]),
                ram_maxrss_gib=_gib(max_rss_bytes()),
            ))

    def to_markdown(self) -> str:
        """The stages as a markdown table (``IPython.display.Markdown`` renders it)."""
        return records_to_markdown([r.as_dict() for r in self.records])

    def plot(self, title: str = "Peak memory per stage") -> Any:
        """Bar chart of VRAM (device, reserved, allocated) and host RAM per stage; returns the figure."""
        return plot_records([r.as_dict() for r in self.records], title=title)


# --- every GPU at once (notebook 10) ---------------------------------------------------------------


def _every_gpu() -> dict[str, int]:
    """Device-level bytes in use on each GPU now (CUDA contexts and other processes included)."""
    out = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out[f"cuda:{i}"] = int(total - free)
    return out


class GpuTracker:
    """Per-stage peak device memory on every GPU, sampled every ``interval_s`` (MemoryTracker watches one)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.records: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sampler = PeakSampler(_every_gpu, self.interval_s)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
            peaks = sampler.stop()
            self.records.append(dict(stage=name, seconds=round(time.perf_counter() - start, 3),
                                     gpus={key: _gib(value) for key, value in peaks.items()}))

    def peaks(self) -> dict[str, float]:
        """The whole run's peak per GPU (GiB)."""
        out: dict[str, float] = {}
        for record in self.records:
            for key, value in record["gpus"].items():
                out[key] = max(out.get(key, 0.0), value)
        return out

    def to_markdown(self) -> str:
        gpus = sorted({k for r in self.records for k in r["gpus"]})
        rows = ["| stage | time (s) | " + " | ".join(f"{g} peak (GiB)" for g in gpus) + " |",
                "|---|---|" + "---|" * len(gpus)]
        rows += [f"| {r['stage']} | {r['seconds']:.1f} | " + " | ".join(f"{r['gpus'][g]:.2f}" for g in gpus) + " |"
                 for r in self.records]
        return "\n".join(rows)


# --- a small card on a big GPU ------------------------------------------------------------------------


def cap_vram(vram_gib: float, devices: list[int] | None = None) -> dict[str, float]:
    """Make this process meet a card of ``vram_gib`` GiB in all, CUDA context included, on each GPU in
    ``devices`` (all by default): the one in-process VRAM cap of fluxnb (notebook 10, the benchmarks).

    It creates each device's context first, so it is counted, then lets PyTorch's allocator take only
    what is left (``torch.cuda.set_per_process_memory_fraction``); going over it is a real CUDA OOM. It
    does not change what ``torch.cuda.mem_get_info`` reports: the course runner, whose kernels must see
    the small card there too, holds the memory above the cap from outside instead
    (``fluxnb.lab.limits.VramHolder``, the same cap: ``vram_gib`` in all with the context). On the small
    card itself it changes nothing. Returns each device's CUDA context in GiB.
    """
    contexts = {}
    for i in range(torch.cuda.device_count()) if devices is None else devices:
        torch.zeros(1, device=f"cuda:{i}")  # create the context first, so it is counted
        free, total = torch.cuda.mem_get_info(i)
        contexts[f"cuda:{i}"] = _gib(total - free)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (vram_gib * GIB - (total - free)) / total), device=i)
    return contexts


def _gib(n_bytes: float) -> float:
    return round(bytes_to_giga_bytes(n_bytes), 3)


class StepTimer:
    """A diffusers ``callback_on_step_end`` that records the wall time of every denoising step.

    The first step carries one-off costs (kernel selection, lazy initialisation, compilation), so
    :attr:`seconds_per_step` is the median of the later steps; with one step it is that step.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        return callback_kwargs

    @property
    def step_seconds(self) -> list[float]:
        """Duration of each step; the first is measured from this timer's creation."""
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]

    @property
    def seconds_per_step(self) -> float:
        steps = self.step_seconds
        if not steps:
            raise ValueError("no step was timed: pass the timer as callback_on_step_end")
        later = sorted(steps[1:] or steps)
        return later[len(later) // 2]


_HEADERS = {
    "stage": "stage", "seconds": "time (s)", "vram_allocated_gib": "VRAM allocated (GiB)",
    "vram_reserved_gib": "VRAM reserved (GiB)", "vram_device_gib": "VRAM device (GiB)",
    "ram_anon_gib": "RAM anon (GiB)",
}
NOT_SHOWN = frozenset({"ram_maxrss_gib"})  # recorded, not shown: host RAM is shown as anonymous memory only


def records_to_markdown(records: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table of records (dicts), one row each. By default every field except :data:`NOT_SHOWN`,
    leaving out those that are None everywhere (the VRAM columns on a machine without a GPU)."""
    keys = dict.fromkeys(k for r in records for k in r)  # first-seen order
    cols = columns or [c for c in keys if c not in NOT_SHOWN and any(r.get(c) is not None for r in records)]
    head = "| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    rows = ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join([head, rule, *rows])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def plot_records(records: list[dict[str, Any]], title: str = "Peak memory per stage") -> Any:
    """Grouped bars per stage: VRAM (device/reserved/allocated) where present, and host RAM (anonymous
    memory, the one host-RAM figure the course shows)."""
    import matplotlib.pyplot as plt

    series = [c for c in ("vram_device_gib", "vram_reserved_gib", "vram_allocated_gib", "ram_anon_gib")
              if any(r.get(c) is not None for r in records)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(records)), 3.6))
    width = 0.8 / len(series)
    for i, col in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(records))]
        ax.bar(xs, [r.get(col) or 0.0 for r in records], width, label=_HEADERS[col])
    ax.set_xticks(range(len(records)), [r["stage"] for r in records], rotation=15, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
