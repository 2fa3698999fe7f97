"""Navigation is generated from one list (.ci/navigation.py): it is current, and its links resolve.

The lessons are ``COURSE``; their solutions notebooks (notebooks/solutions/) are derived from it: each
has the lessons' badges and a link back to its lesson, and each lesson's footer links to its solutions.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("navigation", ROOT / ".ci" / "navigation.py")
navigation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(navigation)
SOLUTIONS = ROOT / "notebooks" / navigation.SOLUTIONS


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _relative_links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)#:]+)\)", text)  # relative links only (no scheme)


def test_committed_navigation_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "navigation.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_relative_link_resolves_and_titles_match_the_headings():
    for i, (name, title) in enumerate(navigation.COURSE):
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        first, last = "".join(nb["cells"][0]["source"]), "".join(nb["cells"][-1]["source"])
        assert first.startswith(navigation.START) and f"\n# {title}" in first, name
        assert last.startswith(navigation.FOOTER), name
        assert f"]({navigation.SOLUTIONS}/{navigation.solutions_name(name)})" in last, f"{name}: no link to its solutions"
        for target in _relative_links(first + last):
            assert (ROOT / "notebooks" / target).resolve().exists(), f"{name}: {target}"
        head = first[:first.index(navigation.END)]
        assert ("←" in head) is (i > 0) and ("→" in head) is (i + 1 < len(navigation.COURSE))
        assert nb["metadata"]["colab"]["gpuType"] == "T4" and nb["metadata"]["accelerator"] == "GPU"
        setup = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert f'git+https://github.com/{navigation.REPO}"' in setup


def test_each_solutions_notebook_has_the_badges_and_the_way_back_to_its_lesson():
    assert sorted(p.name for p in SOLUTIONS.glob("*.ipynb")) == sorted(navigation.solutions_name(n) for n, _ in navigation.COURSE)
    for i, (name, title) in enumerate(navigation.COURSE):
        path = SOLUTIONS / navigation.solutions_name(name)
        nb = json.loads(path.read_text())
        first, last = "".join(nb["cells"][0]["source"]), "".join(nb["cells"][-1]["source"])
        head = first[:first.index(navigation.END)]
        assert first.startswith(navigation.START) and f"\n# {navigation.solutions_title(i)}" in first, path.name
        here = f"{navigation.SOLUTIONS}/{path.name}"
        assert navigation.colab_url(here) in head and navigation.binder_url(here) in head, f"{path.name}: badges"
        assert f"[← back to the lesson: {title}](../{name})" in head, f"{path.name}: no way back to {name}"
        assert last.startswith(navigation.FOOTER) and f"](../{name})" in last, path.name
        if i + 1 < len(navigation.COURSE):  # on to the next lesson's solutions
            assert f"]({navigation.solutions_name(navigation.COURSE[i + 1][0])})" in last, path.name
        else:
            assert "→" not in last, path.name
        for target in _relative_links(first + last):
            assert (SOLUTIONS / target).resolve().exists(), f"{path.name}: {target}"
        assert nb["metadata"]["colab"]["gpuType"] == "T4" and nb["metadata"]["accelerator"] == "GPU"
        setup = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert f'git+https://github.com/{navigation.REPO}"' in setup


def test_a_hand_edited_header_is_replaced_and_the_footer_not_duplicated():
    for solutions in (False, True):
        nb = {"metadata": {}, "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["[![Open In Colab](x)](https://wrong)\n", "\n", "# 01 · T\n"]},
            {"cell_type": "code", "metadata": {}, "source": ['%pip install -q "fluxnb @ git+https://github.com/someone/fork"'],
             "outputs": [], "execution_count": None}]}
        once = navigation.update_notebook(nb, 1, solutions)
        twice = navigation.update_notebook(json.loads(json.dumps(once)), 1, solutions)
        assert once == twice and sum("".join(c["source"]).startswith(navigation.FOOTER) for c in twice["cells"]) == 1
        text = "".join(twice["cells"][0]["source"])
        assert "https://wrong" not in text and text.endswith("# 01 · T\n")
        path = f"{navigation.SOLUTIONS}/{navigation.solutions_name(navigation.COURSE[1][0])}" if solutions else navigation.COURSE[1][0]
        assert navigation.colab_url(path) in text
        assert ("back to the lesson" in text) is solutions
        assert "someone/fork" not in "".join(twice["cells"][1]["source"])


def _copy(tmp_path: Path) -> Path:
    """The notebooks and README in a scratch repository, so the script can rewrite them there."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "outputs"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def test_the_script_rewrites_a_stale_solutions_notebook_and_solutions_only_leaves_the_lessons_alone(tmp_path):
    root = _copy(tmp_path)
    solved = root / "notebooks" / navigation.SOLUTIONS / navigation.solutions_name(navigation.COURSE[3][0])
    lesson = root / "notebooks" / navigation.COURSE[3][0]
    for path in (solved, lesson):
        nb = json.loads(path.read_text())
        nb["cells"] = nb["cells"][:-1]  # the footer, lost
        if path == lesson:  # and the lesson's setup cell changed: its solutions must install the same way
            setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
            setup["source"] = ["# a new first line\n", *setup["source"]]
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    lesson_before = lesson.read_text()
    stale = navigation.rewrite(root, check=True, solutions_only=True)
    assert str(solved.relative_to(root)) in stale and str(lesson.relative_to(root)) not in stale
    assert navigation.main(["--root", str(root), "--solutions-only"]) == 0
    assert navigation.rewrite(root, check=True, solutions_only=True) == [] and lesson.read_text() == lesson_before
    setups = [next("".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")
              for p in (lesson, solved)]
    assert setups[0] == setups[1] and setups[1].startswith("# a new first line\n")
    assert str(lesson.relative_to(root)) in navigation.rewrite(root, check=True)  # the full run still sees it
    navigation.rewrite(root)
    assert navigation.rewrite(root, check=True) == []


def test_a_lesson_without_solutions_or_solutions_without_a_lesson_are_refused(tmp_path):
    root = _copy(tmp_path)
    folder = root / "notebooks" / navigation.SOLUTIONS
    assert navigation.layout_problems(root) == []
    (folder / navigation.solutions_name(navigation.COURSE[5][0])).unlink()
    (folder / "99_extra_solutions.ipynb").write_text("{}")
    problems = " ".join(navigation.layout_problems(root))
    assert navigation.solutions_name(navigation.COURSE[5][0]) in problems and "99_extra_solutions.ipynb" in problems
    assert navigation.main(["--root", str(root), "--check"]) == 1


def test_every_lesson_has_the_one_generated_setup_cell(tmp_path):
    """The setup markdown and cell of every lesson come from navigation.setup_cells, with the backends'
    versions read from requirements.txt; a hand edit is put back, and an unpinned backend is refused."""
    pinned = {line.split("==")[0].lower(): line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line}
    for i, (name, _) in enumerate(navigation.COURSE):
        cells = _cells(ROOT / "notebooks" / name)
        at = next(k for k, c in enumerate(cells) if "".join(c["source"]).startswith(navigation.SETUP))
        text, code = navigation.setup_cells(i)
        assert "".join(cells[at]["source"]) == text and "".join(cells[at + 1]["source"]) == code, name
        if navigation.SETUP_KIND.get(name) == "backends":
            assert all(pinned[b] in code for b in navigation.BACKENDS), name
        solved = _cells(SOLUTIONS / navigation.solutions_name(name))
        at = next(k for k, c in enumerate(solved) if "".join(c["source"]).startswith(navigation.SETUP))
        assert "".join(solved[at]["source"]) == navigation.SOLUTIONS_SETUP, f"{name}'s solutions: their setup markdown"
        assert "".join(solved[at + 1]["source"]) == code, f"{name}'s solutions: the lesson's setup cell"
    (tmp_path / "requirements.txt").write_text("torchao==0.18.0\n")
    try:
        navigation.pins(("torchao", "sdnq"), tmp_path)
    except SystemExit as refused:
        assert "sdnq" in str(refused)
    else:
        raise AssertionError("an unpinned backend was accepted")
