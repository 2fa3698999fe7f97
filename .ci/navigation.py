"""Every notebook's header and footer, its Colab metadata and install line, and README's badges, made
from one list so no link can drift:

    python .ci/navigation.py                    # rewrite notebooks/*.ipynb, notebooks/solutions/*.ipynb, README.md
    python .ci/navigation.py --check            # exit 1 if anything would change (tests/test_navigation.py)
    python .ci/navigation.py --solutions-only   # only notebooks/solutions/ (while the lessons are being edited)

The header (between ``fluxnb:nav`` markers at the top of the first cell) has the Colab and Binder
badges and links to the previous and next notebook; the footer (the last cell) says what comes next
and links to the lesson's solutions. Each lesson in ``COURSE`` has one solutions notebook,
``notebooks/solutions/<lesson>_solutions.ipynb`` (derived from ``COURSE``, never listed twice): its header
has the same badges and a link back to its lesson, its footer leads to the next lesson's solutions, and
its setup cell is the lesson's (the same install on Colab and Kaggle), under a markdown cell made here too.
Colab's metadata asks for a T4 GPU. ``REPO`` is the one place the repository's GitHub path is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO, BRANCH = "fluxnb/fluxnb", "main"  # the GitHub repository the badges and the Colab install line point to
COURSE = [  # (file, title): the course, in order
    ("00_setup.ipynb", "00 · Setup"),
    ("01_encode_prompt_4bit_t5.ipynb", "01 · Encode the prompt with a 4-bit T5"),
    ("02_load_transformer_vae_4bit.ipynb", "02 · Load the transformer in 4 bits, and the VAE"),
    ("03_generate.ipynb", "03 · Generate"),
    ("04_memory_profiling.ipynb", "04 · Memory profiling"),
    ("05_bitsandbytes_options.ipynb", "05 · bitsandbytes, every option"),
    ("06_quantization_backends.ipynb", "06 · Every quantization backend"),
    ("07_spot_the_quantized.ipynb", "07 · Spot the quantized image"),
    ("08_offloading.ipynb", "08 · The smallest GPU: offloading, and a streamed 4-bit transformer"),
    ("09_faster.ipynb", "09 · Faster: torch.compile and step caching"),
    ("10_multi_gpu.ipynb", "10 · Two GPUs: split the model, share one image, or make two"),
    ("11_studio.ipynb", "11 · The Studio"),
    ("12_flux2_klein.ipynb", "12 · FLUX.2 [klein] 4B on a free T4"),
]
SOLUTIONS = "solutions"  # notebooks/solutions/: one notebook of worked answers per lesson
START, END = "<!-- fluxnb:nav:start -->", "<!-- fluxnb:nav:end -->"
FOOTER = "<!-- fluxnb:footer -->"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
BINDER_BADGE = "https://mybinder.org/badge_logo.svg"
INSTALL = re.compile(r'%pip install -q "fluxnb @ git\+https://github\.com/[^"]+"')
SETUP = "## Setup"  # the heading of the markdown cell before each lesson's setup cell; both are made here
BACKENDS = ("torchao", "optimum-quanto", "gguf", "torchmetrics", "sdnq")  # 05-07's extra installs, pinned as in requirements.txt
SETUP_KIND = {  # what a lesson's setup cell installs besides the course's libraries: 05-07 the backends
    "05_bitsandbytes_options.ipynb": "backends", "06_quantization_backends.ipynb": "backends",
    "07_spot_the_quantized.ipynb": "backends",
}
KAGGLE_CHECK = '"KAGGLE_KERNEL_RUN_TYPE" in os.environ'  # what fluxnb.environment.runtime() checks (KAGGLE_ENV_VAR)
SOLUTIONS_SETUP = (f"{SETUP}\n\nThe lesson's setup cell, unchanged: on Colab and Kaggle it installs the pinned libraries (the\n"
                   "lesson's setup section says what each needs first); anywhere else the README's setup command already\n"
                   "did. It prints where the downloads and the outputs go.")


def colab_url(name: str) -> str:
    """Colab's link to ``notebooks/<name>`` (``name`` may be ``solutions/<file>``)."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}"


def binder_url(name: str | None = None) -> str:
    return f"https://mybinder.org/v2/gh/{REPO}/{BRANCH}?urlpath=lab/tree/notebooks" + (f"/{name}" if name else "")


def solutions_name(lesson: str) -> str:
    """The solutions notebook of a lesson: ``03_generate.ipynb`` -> ``03_generate_solutions.ipynb``."""
    return f"{Path(lesson).stem}_solutions.ipynb"


def solutions_title(i: int) -> str:
    """The heading a solutions notebook's first cell carries: ``Solutions · 03 · Generate``."""
    return f"Solutions · {COURSE[i][1]}"


def _badges(path: str) -> list[str]:
    return [f"[![Open In Colab]({COLAB_BADGE})]({colab_url(path)})", f"[![Binder]({BINDER_BADGE})]({binder_url(path)})"]


def header(i: int) -> str:
    name = COURSE[i][0]
    links = _badges(name)
    if i > 0:
        links.append(f"[← {COURSE[i - 1][1]}]({COURSE[i - 1][0]})")
    if i + 1 < len(COURSE):
        links.append(f"[{COURSE[i + 1][1]} →]({COURSE[i + 1][0]})")
    return f"{START}\n{' · '.join(links)}\n{END}"


def footer(i: int) -> str:
    nxt = (f"**Next:** [{COURSE[i + 1][1]}]({COURSE[i + 1][0]})" if i + 1 < len(COURSE)
           else "**That was the last notebook of the core course.**")
    return (f"{FOOTER}\n---\n{nxt} · [solutions to the exercises]({SOLUTIONS}/{solutions_name(COURSE[i][0])}) · "
            f"[all notebooks](../README.md) · [{COURSE[i][0]} on Colab]({colab_url(COURSE[i][0])})")


def solutions_header(i: int) -> str:
    """A solutions notebook's header: the same badges as a lesson's, and the way back to its lesson."""
    name = COURSE[i][0]
    links = [*_badges(f"{SOLUTIONS}/{solutions_name(name)}"), f"[← back to the lesson: {COURSE[i][1]}](../{name})"]
    return f"{START}\n{' · '.join(links)}\n{END}"


def solutions_footer(i: int) -> str:
    name = COURSE[i][0]
    nxt = (f" · [{solutions_title(i + 1)} →]({solutions_name(COURSE[i + 1][0])})" if i + 1 < len(COURSE) else "")
    return (f"{FOOTER}\n---\n**Back to the lesson:** [{COURSE[i][1]}](../{name}){nxt} · [all notebooks](../../README.md) · "
            f"[{solutions_name(name)} on Colab]({colab_url(f'{SOLUTIONS}/{solutions_name(name)}')})")


def pins(names: tuple[str, ...], root: Path = ROOT) -> str:
    """``name==version`` for each of ``names``, read from requirements.txt (the one place versions are pinned)."""
    lines = (root / "requirements.txt").read_text().splitlines()
    found = {line.split("==")[0].strip().lower(): line.strip() for line in lines if "==" in line and not line.startswith("#")}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"requirements.txt pins no {', '.join(missing)}")
    return " ".join(found[n] for n in names)


def setup_cells(i: int, root: Path = ROOT) -> tuple[str, str]:
    """Lesson ``i``'s setup: the markdown that says what the cell does, and the cell. Made here for every
    lesson, so the thirteen say the same thing the same way and install the same pinned versions, on
    Colab and on Kaggle alike, and all keep files where ``fluxnb.environment.set_up_storage`` says."""
    kind = SETUP_KIND.get(COURSE[i][0])
    what = "the course's pinned libraries" + (" and the quantization backends" if kind == "backends" else "")
    text = (f"{SETUP}\n\nRun this cell first. On Colab and Kaggle it installs {what}\n"
            "next to the PyTorch already there (about a minute); anywhere else the README's setup command\n"
            "installed them. Then it prints where the downloads and the outputs go.\n\n"
            "- **Colab:** pick **Runtime → Change runtime type → T4 GPU** first. Each notebook gets a fresh machine:\n"
            "  with `USE_GOOGLE_DRIVE = True` what the notebooks make (embeddings, images, the 4-bit transformer\n"
            "  notebook 02 saves for 03) stays on your Google Drive. The downloads go there too only if Drive has\n"
            "  room for the largest of them; a free Drive has not, so they stay on this machine's disk and are\n"
            "  downloaded again in each notebook.\n"
            "- **Kaggle:** switch on **Settings → Internet** and pick **Settings → Accelerator → GPU T4 x2** (both need\n"
            "  a phone-verified account; notebook 10 uses the two T4s, the others one). What a notebook writes to\n"
            "  `/kaggle/working` is kept with its saved version, in limited space, so only the outputs go there;\n"
            "  the downloads go to scratch space, emptied when the session ends.")
    code = [f"# On Colab and Kaggle: install {what} (their PyTorch stays).",
            "# Elsewhere the README's setup command installed them.", "import os", "import sys", "",
            "USE_GOOGLE_DRIVE = False  # Colab: True keeps the outputs (and, if Drive has room, the downloads) on Drive",
            f'if "google.colab" in sys.modules or {KAGGLE_CHECK}:',
            f'    %pip install -q "fluxnb @ git+https://github.com/{REPO}"']
    if kind == "backends":
        code.append(f"    %pip install -q {pins(BACKENDS, root)}")
    code += ["import fluxnb.environment  # imports neither PyTorch nor huggingface_hub: the downloads' folder can still be set", "",
             "print(fluxnb.environment.set_up_storage(USE_GOOGLE_DRIVE))  # mounts Drive if asked; says where files go"]
    return text, "\n".join(code)


def _cell(text: str) -> dict:
    return {"cell_type": "markdown", "id": "nav-footer", "metadata": {}, "source": text.splitlines(keepends=True)}


def update_notebook(nb: dict, i: int, solutions: bool = False, lesson: dict | None = None) -> dict:
    """The notebook with its header, footer, Colab metadata and install line made from ``COURSE``:
    lesson ``i``'s, or with ``solutions`` the header and footer of lesson ``i``'s solutions notebook, whose
    setup cell (its first code cell) becomes the ``lesson`` notebook's, when given, so both install alike."""
    if solutions and lesson is not None:
        setup = next(c for c in lesson["cells"] if c["cell_type"] == "code")
        next(c for c in nb["cells"] if c["cell_type"] == "code")["source"] = list(setup["source"])
    first = "".join(nb["cells"][0]["source"])
    first = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n*", "", first, flags=re.S)
    first = re.sub(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n*", "", first)  # the older, hand-made badge
    nb["cells"][0]["source"] = ((solutions_header(i) if solutions else header(i)) + "\n\n" + first).splitlines(keepends=True)
    cells = [c for c in nb["cells"] if not "".join(c["source"]).startswith(FOOTER)]
    if solutions:  # the solutions' setup markdown says the cell is the lesson's
        for cell in cells:
            if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith(SETUP):
                cell["source"] = SOLUTIONS_SETUP.splitlines(keepends=True)
                break
    else:  # the setup: the "## Setup" markdown cell and the first code cell, right after it
        text, code = setup_cells(i)
        at = next((k for k, c in enumerate(cells)
                   if c["cell_type"] == "markdown" and "".join(c["source"]).startswith(SETUP)), None)
        if at is not None:
            if at + 1 >= len(cells) or cells[at + 1]["cell_type"] != "code":
                raise SystemExit(f"{COURSE[i][0]}: the setup code cell must follow its {SETUP!r} cell")
            cells[at]["source"] = text.splitlines(keepends=True)
            cells[at + 1]["source"] = code.splitlines(keepends=True)
    for cell in cells:
        if cell["cell_type"] == "code":
            cell["source"] = INSTALL.sub(f'%pip install -q "fluxnb @ git+https://github.com/{REPO}"',
                                         "".join(cell["source"])).splitlines(keepends=True)
    nb["cells"] = [*cells, _cell(solutions_footer(i) if solutions else footer(i))]
    nb["metadata"]["accelerator"] = "GPU"
    nb["metadata"].setdefault("colab", {})["gpuType"] = "T4"  # Colab opens it asking for a T4
    return nb


def update_readme(text: str) -> str:
    text = re.sub(r"https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/[^/]+/notebooks/",
                  f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/", text)
    return re.sub(r"https://mybinder\.org/v2/gh/[^)\s]+", binder_url(), text)


def layout_problems(root: Path = ROOT) -> list[str]:
    """What is wrong with the notebooks on disk against ``COURSE``: a lesson missing or not listed, a
    lesson without its solutions notebook, a solutions notebook of no lesson. Empty when all is well."""
    problems = []
    on_disk = sorted(p.name for p in (root / "notebooks").glob("[0-9]*.ipynb"))
    if on_disk != [name for name, _ in COURSE]:
        problems.append(f"COURSE in {__file__} lists {[n for n, _ in COURSE]} but notebooks/ has {on_disk}")
    want = {solutions_name(name) for name, _ in COURSE}
    have = {p.name for p in (root / "notebooks" / SOLUTIONS).glob("*.ipynb")}
    if want - have:
        problems.append(f"notebooks/{SOLUTIONS}/ has no {', '.join(sorted(want - have))}: every lesson has a solutions notebook")
    if have - want:
        problems.append(f"notebooks/{SOLUTIONS}/ has {', '.join(sorted(have - want))}, which belong to no lesson in COURSE")
    return problems


def targets(root: Path = ROOT, solutions_only: bool = False) -> list[tuple[Path, int | None, bool]]:
    """``(path, lesson index or None for README, is a solutions notebook)`` for every file this script writes."""
    solutions = [(root / "notebooks" / SOLUTIONS / solutions_name(name), i, True) for i, (name, _) in enumerate(COURSE)]
    if solutions_only:
        return solutions
    lessons = [(root / "notebooks" / name, i, False) for i, (name, _) in enumerate(COURSE)]
    return [*lessons, *solutions, (root / "README.md", None, False)]


def rewrite(root: Path = ROOT, check: bool = False, solutions_only: bool = False) -> list[str]:
    """Bring every target under ``root`` up to date (or with ``check`` only look); the stale ones' paths."""
    stale = []
    for path, i, solutions in targets(root, solutions_only):
        before = path.read_text()
        lesson = json.loads((root / "notebooks" / COURSE[i][0]).read_text()) if solutions else None
        after = (update_readme(before) if i is None
                 else json.dumps(update_notebook(json.loads(before), i, solutions, lesson), indent=1, ensure_ascii=False) + "\n")
        if after != before:
            stale.append(str(path.relative_to(root)))
            if not check:
                path.write_text(after)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    parser.add_argument("--solutions-only", action="store_true",
                        help=f"only notebooks/{SOLUTIONS}/ (leaves the lessons and README.md alone)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to work on (default: this one)")
    args = parser.parse_args(argv)
    problems = layout_problems(args.root)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    stale = rewrite(args.root, args.check, args.solutions_only)
    if args.check and stale:
        print("navigation is stale in:", ", ".join(stale), "-> run: python .ci/navigation.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
