"""Run the whole course: execute every notebook, each in a fresh kernel, into one output folder.

    FLUXNB_CHECKPOINT=tiny python -m fluxnb.course course-output

writes ``course-output/00_setup.ipynb`` ... (executed copies, the originals are untouched), and
everything the notebooks make (embeddings, the NF4 transformer, images) under the same folder, since
the runner sets ``FLUXNB_OUTPUT`` to it. A fresh kernel per notebook is how Colab runs them: each one
must stand on its own. A failing cell stops the run; the partly executed notebook is still written,
so the traceback can be read in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _this_python_kernel() -> object:
    """A kernel manager whose "python3" is this interpreter, not whatever kernelspec is installed."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def run_course(output: Path, notebooks: list[Path], timeout_s: int = 1800) -> list[tuple[str, float]]:
    """Execute ``notebooks`` in order, each in its own kernel; return (name, seconds) per notebook."""
    import nbformat
    from nbclient import NotebookClient

    output.mkdir(parents=True, exist_ok=True)
    os.environ["FLUXNB_OUTPUT"] = str(output.resolve())  # the kernels inherit it
    times = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, km=_this_python_kernel(), timeout=timeout_s,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
        finally:
            nbformat.write(nb, output / path.name)  # written even when a cell failed
        times.append((path.name, time.perf_counter() - start))
        print(f"{path.name}: {times[-1][1]:.1f} s", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder for executed notebooks and what they make")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/[0-9]*.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if not notebooks:
        parser.error(f"no notebooks found in {NOTEBOOKS}")
    print(f"FLUXNB_CHECKPOINT={os.environ.get('FLUXNB_CHECKPOINT', '') or '(unset: real models)'}", flush=True)
    times = run_course(args.output, notebooks, args.timeout)
    print(f"all {len(times)} notebooks ran in {sum(t for _, t in times):.1f} s; executed copies in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
