"""Strip notebook outputs for git, keeping the reference outputs that nbval checks.

    python .ci/strip_notebooks.py                      # strip notebooks/*.ipynb in place
    python .ci/strip_notebooks.py --refresh DIR        # also take reference outputs from executed copies in DIR
    python .ci/strip_notebooks.py --check              # exit 1 if anything would change (CI)

Cells marked ``# NBVAL_CHECK_OUTPUT`` keep their stream outputs: ``pytest --nbval-lax`` compares a
fresh run against them. They must print the same thing on every machine (arithmetic, error messages),
so refresh them from a tiny-mode run (``FLUXNB_CHECKPOINT=tiny python -m fluxnb.course DIR``).
"""

import argparse
import json
import sys
from pathlib import Path

CHECKED = "# NBVAL_CHECK_OUTPUT"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def strip(nb: dict, executed: dict | None) -> dict:
    ran = {c.get("id"): c for c in executed["cells"]} if executed else {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if CHECKED in "".join(cell["source"]):
            source = ran.get(cell.get("id"), cell)
            outputs = [o for o in source.get("outputs", []) if o["output_type"] == "stream"]
            for o in outputs:
                o["text"] = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
            cell["outputs"] = outputs
            cell["execution_count"] = 1  # nbval skips reference outputs of a cell that never ran
        else:
            cell["outputs"] = []
            cell["execution_count"] = None
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("execution", "scrolled")}
    nb["metadata"].pop("widgets", None)
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refresh", type=Path, help="folder of executed notebooks to take reference outputs from")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not stripped")
    args = parser.parse_args()
    dirty = []
    for path in sorted([*NOTEBOOKS.glob("*.ipynb"), *NOTEBOOKS.glob("solutions/*.ipynb")]):  # lessons, their solutions
        before = path.read_text()
        ran = args.refresh / path.name if args.refresh else None
        executed = json.loads(ran.read_text()) if ran and ran.is_file() else None  # else keep what is there
        after = json.dumps(strip(json.loads(before), executed), indent=1, ensure_ascii=False) + "\n"
        if after != before:
            dirty.append(path.name)
            if not args.check:
                path.write_text(after)
    if args.check and dirty:
        print("not stripped:", ", ".join(dirty), "-> run: python .ci/strip_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
