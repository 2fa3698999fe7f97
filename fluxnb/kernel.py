"""Start an IPython kernel, first moving this process into a cgroup (``python -m fluxnb.kernel``).

    python -m fluxnb.kernel --cgroup /sys/fs/cgroup/fluxnb-colab-t4-03 -f CONNECTION_FILE

The course runner (:mod:`fluxnb.course`) starts its kernels through this module when it caps host
RAM: the kernel joins the cgroup before it imports anything, so everything it and its children
allocate counts against ``memory.max``, and an overflow OOM-kills the kernel, not the runner.
Without ``--cgroup`` it simply starts the kernel with this interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if argv[:1] == ["--cgroup"]:
        (Path(argv[1]) / "cgroup.procs").write_text(str(os.getpid()))
        argv = argv[2:]
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
