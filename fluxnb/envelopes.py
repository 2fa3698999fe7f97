"""The small machines the course promises to fit, as limits a big GPU machine can rehearse.

An *envelope* is what a target machine gives a notebook: VRAM as PyTorch sees it (CUDA context
included), host RAM, and whether the GPU computes in bf16. ``python -m fluxnb.course OUT --envelope
colab-t4`` runs every notebook inside one (see :mod:`fluxnb.course`); while it does, the kernels see
``FLUXNB_ENVELOPE=<name>`` and fluxnb's machine checks answer as the target would:
:func:`fluxnb.environment.pick_dtype` picks fp16 where the target has no bf16, and
:func:`fluxnb.environment.machine_info` reports the target's VRAM.

The limits themselves are enforced from outside the kernel, not simulated inside it: VRAM by a
process that holds everything above the cap (so ``torch.cuda.mem_get_info`` and a real CUDA
out-of-memory error behave as on the small card), host RAM by a cgroup v2 ``memory.max`` with swap
off (so an overflow is a real OOM kill, as when Colab says "Your session crashed").
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # committed course runs, shipped with fluxnb
ENV_VAR = "FLUXNB_ENVELOPE"
OTHERS_VAR = "FLUXNB_VRAM_OTHERS_BYTES"  # device memory held by other processes when the kernel started


COLAB_VM_RAM_GIB = 12.7  # host RAM of a free Colab VM in all; the colab-t4 envelope leaves its kernel ram_gib of it


@dataclass(frozen=True)
class Envelope:
    """One target machine's limits, as a notebook on it meets them."""

    name: str
    vram_gib: float  # what PyTorch can use in all, the CUDA context included
    ram_gib: float  # host RAM the notebook's kernel may use
    bf16: bool  # does the GPU compute in bf16 (compute capability 8.0+)?
    description: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


ENVELOPES: dict[str, Envelope] = {e.name: e for e in [
    Envelope("colab-t4", vram_gib=14.74, ram_gib=12.0, bf16=False,
             description="free Colab T4: PyTorch sees 14.74 GiB in all (its out-of-memory messages say so), "
                         f"compute capability 7.5 (no bf16: fp16), a {COLAB_VM_RAM_GIB} GiB VM of which about 12 GiB is left "
                         "for the notebook's kernel"),
    Envelope("8gb-card", vram_gib=7.6, ram_gib=16.0, bf16=True,
             description="an 8 GB consumer card with a desktop running: about 7.8 GiB for PyTorch on a headless "
                         "card, count 7.6 GiB with a desktop; Ampere or newer (bf16); 16 GiB of host RAM"),
]}


def active_envelope() -> Envelope | None:
    """The envelope this process runs in (``FLUXNB_ENVELOPE``), or None on a plain machine.

    An unknown name is an error, not a silent plain run: a rehearsal that rehearses nothing would
    report numbers for the wrong machine.
    """
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return None
    if name not in ENVELOPES:
        raise ValueError(f"{ENV_VAR}={name!r} is not an envelope fluxnb knows: use one of {', '.join(ENVELOPES)}.")
    return ENVELOPES[name]


def others_vram_bytes() -> int:
    """Device memory other processes held when this one started (the envelope's VRAM holder), else 0.

    :func:`fluxnb.memory.device_used_bytes` subtracts it, so a notebook measures its own use, as it
    would on the small card where it is alone.
    """
    return int(os.environ.get(OTHERS_VAR, "0") or 0)


def committed_runs(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every envelope's merged committed runs (:func:`committed_run`), by envelope name, in the order the
    files first name them; each file is read once."""
    latest: dict[str, dict[str, dict[str, Any]]] = {}
    envelopes: dict[str, dict[str, Any]] = {}
    enforced: dict[str, list[bool]] = {}
    for path in sorted(folder.glob("course-*.json")):  # the file names say what ran; the envelope is inside
        run = json.loads(path.read_text())
        name = (run.get("envelope") or {}).get("name")
        if not name:
            continue
        envelopes.setdefault(name, run["envelope"])
        enforced.setdefault(name, []).append(bool(run.get("ram_enforced")))
        p = run["provenance"]
        for nb in run["notebooks"]:
            seen = latest.setdefault(name, {}).get(nb["notebook"])
            if seen is None or p["date"] > seen["date"]:
                latest[name][nb["notebook"]] = dict(nb, date=p["date"], gpu=p["gpu"], source=path.name,
                                                    libraries=p.get("libraries", {}))
    merged = {}
    for name, envelope in envelopes.items():
        notebooks = [latest[name][k] for k in sorted(latest[name])]
        dates = sorted(nb["date"][:10] for nb in notebooks)
        provenance = dict(gpu=", ".join(sorted({nb["gpu"] for nb in notebooks})),
                          date=dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}",
                          sources=sorted({nb["source"] for nb in notebooks}))
        merged[name] = dict(envelope=envelope, provenance=provenance, notebooks=notebooks,
                            ram_enforced=all(enforced[name]), passed=all(nb["passed"] for nb in notebooks))
    return merged


def committed_run(name: str, folder: Path = RESULTS) -> dict[str, Any] | None:
    """Every notebook's latest committed run inside envelope ``name``, or None if there is none.

    ``python -m fluxnb.course OUT --envelope <name>`` on the GPU machine writes one JSON per run
    (``fluxnb/results/course-<name>-<what>.json``: per notebook pass/fail and peaks, with GPU, versions
    and date). A notebook fixed and run again replaces its earlier result, so
    this merges them: each notebook row keeps the run it came from (``date``, ``gpu``, ``source``).
    Notebook 00, the planner and ``docs/results.md`` all read this one answer.
    """
    return committed_runs(folder).get(name)
