"""Start a child process and watch it: the one supervisor of fluxnb's child processes.

The dry run (:mod:`fluxnb.fit`) measures in a child, the benchmark (``python -m benchmarks``) runs each
recipe in a fresh worker, ``fluxnb.multigpu.launch`` runs torchrun, and the course runner starts each
notebook's kernel: all of them need the same four things, done once here.

* **A timeout that never hangs**: after ``timeout_s`` the child gets SIGTERM (when ``stop_grace_s`` is
  set, so torchrun can stop its ranks) and SIGKILL after that grace; the result says it timed out.
* **A RAM cap that holds from the first byte**: the child joins its cgroup (:class:`fluxnb.lab.limits.RamCgroup`)
  before it runs anything, through :mod:`fluxnb.lab.enter`, not through a ``preexec_fn`` (which is not
  safe in a process that runs threads, as every fluxnb process with a memory sampler does).
* **No orphan holding a GPU**: with ``parent_death_signal`` the child asks Linux for that signal when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``).
* **A cause in words**: :func:`signal_name` turns ``-9`` into ``SIGKILL``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

Output = Literal["inherit", "stdout", "all"]


def signal_name(returncode: int) -> str:
    """``-9`` -> ``"SIGKILL"``: the signal that ended a child, from subprocess's negative return code."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name in the enum
        return f"signal {-returncode}"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so a
    killed launcher leaves no process holding a GPU. Does nothing on other systems."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG


def entry_command(argv: list[str], cgroup: str | os.PathLike[str] | None = None,
                  parent_death_signal: int | None = None) -> list[str]:
    """``argv`` started through :mod:`fluxnb.lab.enter`: first into ``cgroup`` and/or dying with its parent,
    then ``exec`` of ``argv`` (same process id). Without either it is ``argv`` itself."""
    if cgroup is None and parent_death_signal is None:
        return list(argv)
    options = [*(["--cgroup", str(cgroup)] if cgroup is not None else []),
               *(["--die-with-parent", signal.Signals(parent_death_signal).name] if parent_death_signal else [])]
    return [sys.executable, "-m", "fluxnb.lab.enter", *options, "--", *argv]


@dataclass
class Finished:
    """How a supervised child ended: its exit code (negative: the signal; None: stopped at the timeout)
    and what it printed, when asked to capture it ("" otherwise)."""

    returncode: int | None
    output: str

    @property
    def timed_out(self) -> bool:
        """Stopped at the timeout (then it has no exit code of its own)."""
        return self.returncode is None

    def describe(self) -> str:
        """"exited with code 3", "killed by SIGKILL" or "timed out"."""
        if self.timed_out:
            return "timed out"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal_name(self.returncode)}"
        return f"exited with code {self.returncode}"


def run_process(argv: list[str], timeout_s: float, *, env: dict[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None, output: Output = "inherit",
                cgroup: str | os.PathLike[str] | None = None, parent_death_signal: int | None = None,
                stop_grace_s: float = 0.0) -> Finished:
    """Run ``argv`` to its end or to ``timeout_s``; never hangs.

    ``env`` is the child's whole environment (default: this process's). ``output``: "inherit" (the
    child prints to our terminal), "stdout" (its stdout captured, stderr to ours) or "all" (both
    captured, interleaved). At the timeout the child is killed at once, or with ``stop_grace_s`` asked
    first with SIGTERM and killed that many seconds later; what it printed so far is kept.
    """
    pipe = None if output == "inherit" else subprocess.PIPE
    proc = subprocess.Popen(entry_command(argv, cgroup, parent_death_signal), env=env, cwd=cwd,
                            stdout=pipe, stderr=subprocess.STDOUT if output == "all" else None,
                            text=True, errors="replace")
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return Finished(proc.returncode, out or "")
    except subprocess.TimeoutExpired:
        if stop_grace_s > 0:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=stop_grace_s)
                return Finished(None, out or "")
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        out, _ = proc.communicate()
        return Finished(None, out or "")
    except BaseException:  # KeyboardInterrupt in a notebook: the child must not outlive the call
        proc.kill()
        proc.wait()
        raise


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


__all__ = ["Finished", "die_with_parent", "entry_command", "module_command", "run_process", "signal_name"]
