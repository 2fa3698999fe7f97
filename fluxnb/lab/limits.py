"""The limits of a small machine, imposed on a child process from outside (the course runner, the benchmark).

* host RAM: :class:`RamCgroup`, a cgroup v2 group with ``memory.max`` and swap off; the child joins it
  before it runs anything (:func:`fluxnb.lab.supervisor.entry_command`);
* VRAM: :class:`VramHolder`, this process holding every byte above the cap, so the child's CUDA context,
  its allocations and ``torch.cuda.mem_get_info`` meet the small card's limit. A process that caps
  itself uses :func:`fluxnb.memory.cap_vram` instead: the same cap (``vram_gib`` in all, CUDA context
  included), without changing what ``mem_get_info`` reports.

The machines' numbers are in :mod:`fluxnb.envelopes`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fluxnb.capacity import GIB

CGROUP_ROOT = Path("/sys/fs/cgroup")


# --- host RAM: one cgroup v2 group per kernel ----------------------------------------------------


class RamCgroup:
    """A cgroup v2 group with ``memory.max`` and swap off, for one kernel; ``None`` from :meth:`create`
    where that is impossible (not root, no cgroup v2, no memory controller)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str, ram_gib: float, root: Path = CGROUP_ROOT) -> RamCgroup | None:
        controllers = root / "cgroup.controllers"
        if os.geteuid() != 0 or not controllers.is_file() or "memory" not in controllers.read_text().split():
            return None
        subtree = root / "cgroup.subtree_control"
        if "memory" not in subtree.read_text().split():
            subtree.write_text("+memory")
        path = root / name
        if path.exists():
            path.rmdir()  # a leftover of an earlier run: empty once its processes are gone
        path.mkdir()
        (path / "memory.max").write_text(str(int(ram_gib * GIB)))
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")
        return cls(path)

    def oom_kills(self) -> int:
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(events.get("oom_kill", 0))

    def peak_gib(self) -> float | None:
        peak = self.path / "memory.peak"  # Linux 5.19+
        return round(int(peak.read_text()) / GIB, 3) if peak.exists() else None

    def remove(self) -> None:
        for _ in range(50):  # the kernel's processes leave the group a moment after they exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# --- VRAM: hold everything above the target's cap ------------------------------------------------


class VramHolder:
    """Hold device memory in this process until exactly ``vram_gib`` is left free for the kernels.

    The kernel then meets the card's real limit: its CUDA context, every allocation and
    ``torch.cuda.mem_get_info`` count against the cap, and going over it is a real CUDA OOM.
    """

    def __init__(self, vram_gib: float) -> None:
        import torch

        torch.zeros(1, device="cuda")  # this process's own context comes out of the held part
        self.target = int(vram_gib * GIB)
        self.blocks: list[Any] = []
        free, self.total = torch.cuda.mem_get_info()
        if free < self.target:
            raise RuntimeError(f"This GPU has {free / GIB:.2f} GiB free, less than the envelope's {vram_gib} GiB.")
        for chunk in (GIB, 64 * 2**20, 2 * 2**20):
            while torch.cuda.mem_get_info()[0] - chunk >= self.target:
                self.blocks.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        self.free_gib = round(torch.cuda.mem_get_info()[0] / GIB, 3)

    def used_bytes(self) -> int:
        """Device memory in use now, by every process (the held part and the contexts included)."""
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free)
