"""Enter a cgroup and/or ask to die with the parent, then become the given command (``exec``).

    python -m fluxnb.lab.enter --cgroup /sys/fs/cgroup/fluxnb-colab-t4-03 -- python -m ipykernel_launcher -f CONN
    python -m fluxnb.lab.enter --die-with-parent SIGTERM -- python -m torch.distributed.run ...

:func:`fluxnb.lab.supervisor.run_process` and the course runner's kernels start children through it:
the process joins the cgroup before it imports anything, so everything it and its children allocate
counts against ``memory.max`` and an overflow OOM-kills it, not its parent; ``--die-with-parent`` is
``prctl(PR_SET_PDEATHSIG)``, which ``exec`` keeps. The process id stays the same, so the parent
watches the command itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from fluxnb.lab.supervisor import die_with_parent


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fluxnb.lab.enter")
    parser.add_argument("--cgroup", type=Path, help="cgroup v2 folder to join first")
    parser.add_argument("--die-with-parent", choices=[s.name for s in signal.Signals], help="signal at the parent's death")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    if args.cgroup is not None:
        (args.cgroup / "cgroup.procs").write_text(str(os.getpid()))
    if args.die_with_parent:
        die_with_parent(signal.Signals[args.die_with_parent])
    program = command[0] if os.sep in command[0] else (shutil.which(command[0]) or command[0])
    os.execv(program, command)


if __name__ == "__main__":
    main(sys.argv[1:])
