"""Navigation is generated from one list (.ci/navigation.py): it is current, and its links resolve."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("navigation", ROOT / ".ci" / "navigation.py")
navigation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(navigation)


def test_committed_navigation_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "navigation.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_relative_link_resolves_and_titles_match_the_headings():
    for i, (name, title) in enumerate(navigation.COURSE):
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        first, last = "".join(nb["cells"][0]["source"]), "".join(nb["cells"][-1]["source"])
        assert first.startswith(navigation.START) and f"\n# {title}" in first, name
        assert last.startswith(navigation.FOOTER), name
        for target in re.findall(r"\]\(([^)#:]+)\)", first + last):  # relative links only (no scheme)
            assert (ROOT / "notebooks" / target).resolve().exists(), f"{name}: {target}"
        head = first[:first.index(navigation.END)]
        assert ("←" in head) is (i > 0) and ("→" in head) is (i + 1 < len(navigation.COURSE))
        assert nb["metadata"]["colab"]["gpuType"] == "T4" and nb["metadata"]["accelerator"] == "GPU"
        setup = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert f'git+https://github.com/{navigation.REPO}"' in setup


def test_a_hand_edited_header_is_replaced_and_the_footer_not_duplicated():
    nb = {"metadata": {}, "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["[![Open In Colab](x)](https://wrong)\n", "\n", "# 01 · T\n"]},
        {"cell_type": "code", "metadata": {}, "source": ['%pip install -q "fluxnb @ git+https://github.com/someone/fork"'],
         "outputs": [], "execution_count": None}]}
    once = navigation.update_notebook(nb, 1)
    twice = navigation.update_notebook(json.loads(json.dumps(once)), 1)
    assert once == twice and sum("".join(c["source"]).startswith(navigation.FOOTER) for c in twice["cells"]) == 1
    text = "".join(twice["cells"][0]["source"])
    assert "https://wrong" not in text and text.endswith("# 01 · T\n") and navigation.colab_url(navigation.COURSE[1][0]) in text
    assert "someone/fork" not in "".join(twice["cells"][1]["source"])
