"""CONTRIBUTING.md's layout names every module of fluxnb, and only modules that exist; the front page stays short."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_names_every_module_and_only_those():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Rehearsing")]
    named = set(re.findall(r"\b((?:lab/)?[a-z_0-9]+)\.py\b", layout.split("benchmarks/")[0]))
    modules = {str(p.relative_to(ROOT / "fluxnb").with_suffix("")) for p in (ROOT / "fluxnb").rglob("*.py")}
    assert named == modules, (sorted(modules - named), sorted(named - modules))
    for folder in ("configs/", "results/"):
        assert folder in layout and (ROOT / "fluxnb" / folder).is_dir()


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 11_000  # about 10 KB: the tables and notes live in docs/ and CONTRIBUTING.md
    for link in ("CONTRIBUTING.md", "docs/results.md", "LICENSE", "benchmarks/README.md"):
        assert link in text and (ROOT / link).exists(), link
    assert "Apache License" in (ROOT / "LICENSE").read_text()
