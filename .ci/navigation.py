"""Every notebook's header and footer, its Colab metadata and install line, and README's badges, made
from one list so no link can drift:

    python .ci/navigation.py            # rewrite notebooks/*.ipynb and README.md
    python .ci/navigation.py --check    # exit 1 if anything would change (tests/test_navigation.py)

The header (between ``fluxnb:nav`` markers at the top of the first cell) has the Colab and Binder
badges and links to the previous and next notebook; the footer (the last cell) says what comes next.
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
]
START, END = "<!-- fluxnb:nav:start -->", "<!-- fluxnb:nav:end -->"
FOOTER = "<!-- fluxnb:footer -->"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
BINDER_BADGE = "https://mybinder.org/badge_logo.svg"
INSTALL = re.compile(r'%pip install -q "fluxnb @ git\+https://github\.com/[^"]+"')


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{name}"


def binder_url(name: str | None = None) -> str:
    return f"https://mybinder.org/v2/gh/{REPO}/{BRANCH}?urlpath=lab/tree/notebooks" + (f"/{name}" if name else "")


def header(i: int) -> str:
    name = COURSE[i][0]
    links = [f"[![Open In Colab]({COLAB_BADGE})]({colab_url(name)})", f"[![Binder]({BINDER_BADGE})]({binder_url(name)})"]
    if i > 0:
        links.append(f"[← {COURSE[i - 1][1]}]({COURSE[i - 1][0]})")
    if i + 1 < len(COURSE):
        links.append(f"[{COURSE[i + 1][1]} →]({COURSE[i + 1][0]})")
    return f"{START}\n{' · '.join(links)}\n{END}"


def footer(i: int) -> str:
    nxt = (f"**Next:** [{COURSE[i + 1][1]}]({COURSE[i + 1][0]})" if i + 1 < len(COURSE)
           else "**That was the last notebook of the core course.**")
    return (f"{FOOTER}\n---\n{nxt} · [all notebooks](../README.md) · "
            f"[{COURSE[i][0]} on Colab]({colab_url(COURSE[i][0])})")


def _cell(text: str) -> dict:
    return {"cell_type": "markdown", "id": "nav-footer", "metadata": {}, "source": text.splitlines(keepends=True)}


def update_notebook(nb: dict, i: int) -> dict:
    """The notebook with its header, footer, Colab metadata and install line made from ``COURSE``."""
    first = "".join(nb["cells"][0]["source"])
    first = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n*", "", first, flags=re.S)
    first = re.sub(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n*", "", first)  # the older, hand-made badge
    nb["cells"][0]["source"] = (header(i) + "\n\n" + first).splitlines(keepends=True)
    cells = [c for c in nb["cells"] if not "".join(c["source"]).startswith(FOOTER)]
    for cell in cells:
        if cell["cell_type"] == "code":
            cell["source"] = INSTALL.sub(f'%pip install -q "fluxnb @ git+https://github.com/{REPO}"',
                                         "".join(cell["source"])).splitlines(keepends=True)
    nb["cells"] = [*cells, _cell(footer(i))]
    nb["metadata"]["accelerator"] = "GPU"
    nb["metadata"].setdefault("colab", {})["gpuType"] = "T4"  # Colab opens it asking for a T4
    return nb


def update_readme(text: str) -> str:
    text = re.sub(r"https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/[^/]+/notebooks/",
                  f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/", text)
    return re.sub(r"https://mybinder\.org/v2/gh/[^)\s]+", binder_url(), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything would change")
    args = parser.parse_args()
    on_disk = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    if on_disk != [name for name, _ in COURSE]:
        print(f"COURSE in {__file__} lists {[n for n, _ in COURSE]} but notebooks/ has {on_disk}", file=sys.stderr)
        return 1
    stale = []
    targets = [(ROOT / "notebooks" / name, i) for i, (name, _) in enumerate(COURSE)] + [(ROOT / "README.md", None)]
    for path, i in targets:
        before = path.read_text()
        after = (update_readme(before) if i is None
                 else json.dumps(update_notebook(json.loads(before), i), indent=1, ensure_ascii=False) + "\n")
        if after != before:
            stale.append(path.name)
            if not args.check:
                path.write_text(after)
    if args.check and stale:
        print("navigation is stale in:", ", ".join(stale), "-> run: python .ci/navigation.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
