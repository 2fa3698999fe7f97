"""The notebooks' structure: stripped outputs, the course's conventions, and #@save cells == fluxnb."""

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

import fluxnb.stages
from fluxnb import environment

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9]*.ipynb"))
CHECKED = "# NBVAL_CHECK_OUTPUT"


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"])


def test_the_five_core_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS][:5] == ["00", "01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped_except_reference_outputs(path):
    for cell in _cells(path):
        if cell["cell_type"] != "code":
            continue
        if CHECKED in _source(cell):  # nbval compares against these: small, text, machine-independent
            assert cell["outputs"] and all(o["output_type"] == "stream" for o in cell["outputs"]), _source(cell)[:80]
        else:
            assert cell["outputs"] == [], f"{path.name}: outputs committed in cell {_source(cell)[:60]!r}"
            assert cell["execution_count"] is None, f"{path.name}: execution count committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_course_conventions(path):
    cells = _cells(path)
    first = _source(cells[0])
    assert f"colab.research.google.com/github/" in first and f"notebooks/{path.name}" in first
    assert "\n# " in "\n" + first and "In this notebook you will" in first
    text = "\n".join(_source(c) for c in cells)
    assert "## Summary" in text and "## Exercises" in text
    setup = _source(next(c for c in cells if c["cell_type"] == "code"))
    guard = f'if "google.colab" in sys.modules or "{environment.KAGGLE_ENV_VAR}" in os.environ:\n'
    assert guard in setup and setup.split(guard, 1)[1].startswith("    %pip install"), \
        f"{path.name}: its setup cell installs on Colab and on Kaggle, which runtime() tells apart by the same names"
    assert setup.index("USE_GOOGLE_DRIVE = False") < setup.index("fluxnb.environment.set_up_storage(USE_GOOGLE_DRIVE)")
    assert "CHECKPOINT = fluxnb.resolve_checkpoint(MODEL_ID)" in text
    assert "black-forest-labs/FLUX.1-" in text
    for cell in cells:  # no failure may be swallowed: every except names what it expects
        if cell["cell_type"] == "code":
            assert "except:" not in _source(cell) and "except Exception" not in _source(cell)


def _saved_cells():
    for path in NOTEBOOKS:
        for cell in _cells(path):
            if cell["cell_type"] == "code" and _source(cell).startswith("#@save"):
                yield path.name, _source(cell)


@pytest.mark.parametrize("where, source", list(_saved_cells()), ids=lambda v: v if v.endswith("ipynb") else "")
def test_saved_cells_are_exactly_the_package_code(where, source):
    name = ast.parse(source).body[0].name
    package_source = inspect.getsource(getattr(fluxnb.stages, name))
    assert source == "#@save\n" + package_source.rstrip(), f"{where}: {name} differs from fluxnb/stages.py"


def test_every_saved_function_is_taught_in_a_notebook():
    taught = {ast.parse(src).body[0].name for _, src in _saved_cells()}
    in_package = {node.name for node in ast.parse(Path(fluxnb.stages.__file__).read_text()).body
                  if isinstance(node, ast.FunctionDef)}
    saved = {n for n in in_package if "#@save\ndef " + n + "(" in Path(fluxnb.stages.__file__).read_text()}
    assert saved == taught


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_parses_on_this_python(path):
    """Colab runs a newer Python than some readers: a cell must not need 3.12 syntax (PEP 701 f-strings)."""
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            # IPython's %-lines become ``pass`` at the same indentation: a block of only %pip lines stays a block
            source = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith("%") else line
                                for line in _source(cell).splitlines())
            ast.parse(source)


# Figures in prose: a size or parameter count in a notebook's markdown is either inside a generated
# region (<!-- fluxnb:NAME:start --> ... :end -->, a table made from committed results) or a fact span
# (<!-- fact:NAME -->, computed by benchmarks.report.model_facts); only these kinds of figure are typed:
FIGURE = re.compile(r"\d+(?:\.\d+)?\s?(?:GiB|GB|MiB|MB)\b|\d+(?:\.\d+)?\s?[BM]\b|\d+(?:\.\d+)?-billion")
TYPED_ON_PURPOSE = re.compile(
    r"\b(?:4|8|16)\s+GB\s+cards?\b"  # a class of card, named as people name it ("an 8 GB card")
    r"|\b8\s+GiB\s+card\b|\b8\s+GB\s+(?:card's|walkthrough)"
    r"|\b[12]\s+GiB\s+(?:come\s+and\s+go|tensor)"  # notebook 00's demo tensor: the code makes 1 GiB
    r"|about\s+12\s+GB/s"  # PCIe 3.0 x16, a datasheet figure given in an exercise
    r"|(?:Qwen3-|klein-|\[klein\]\s)4B\b"  # a model's name (FLUX.2 [klein] 4B, Qwen3-4B), not a figure
)
REGION = re.compile(r"<!-- fluxnb:([a-z-]+):start -->.*?<!-- fluxnb:\1:end -->", re.S)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_hand_typed_figures_in_prose(path):
    from benchmarks.report import FACT

    for cell in _cells(path):
        if cell["cell_type"] != "markdown":
            continue
        prose = TYPED_ON_PURPOSE.sub("", FACT.sub("", REGION.sub("", _source(cell))))
        typed = [prose[max(0, m.start() - 40):m.end() + 10] for m in FIGURE.finditer(prose)]
        assert not typed, f"{path.name}: typed figures {typed}; make them fact spans or generated tables"


def test_fact_spans_are_current_and_the_scan_can_fail():
    from benchmarks import report

    facts = report.model_facts()
    assert facts["transformer_params"] == "11.9B" and facts["t4_vram_gib"] == "14.74 GiB"
    for path in [*NOTEBOOKS, report.ROOT / "README.md", report.ROOT / "CONTRIBUTING.md"]:
        texts = [_source(c) for c in _cells(path) if c["cell_type"] == "markdown"] if path.suffix == ".ipynb" \
            else [path.read_text()]
        for text in texts:
            assert report.fill_facts(text, facts) == text, f"{path.name}: run python -m benchmarks report"
    stale = "in bf16 it is <!-- fact:transformer_bf16_gb -->99 GB<!-- /fact -->."
    assert report.fill_facts(stale, facts) == "in bf16 it is <!-- fact:transformer_bf16_gb -->23.8 GB<!-- /fact -->."
    with pytest.raises(ValueError, match="no fact named t4_vram"):
        report.fill_facts("<!-- fact:t4_vram -->15 GiB<!-- /fact -->", facts)
    assert FIGURE.search("a T4 has 15 GiB") and not FIGURE.search(TYPED_ON_PURPOSE.sub("", "an 8 GB card"))


SOLUTIONS = sorted((Path(__file__).parent.parent / "notebooks" / "solutions").glob("[0-9]*.ipynb"))
_STAND_IN_SWITCHES = re.compile(r"is_stand_in|stand_in\s*=|STAND_INS|FLUXNB_CHECKPOINT|stand_in_folder|build_tiny|"
                                r"build_random")


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_no_lesson_cell_switches_on_the_stand_in(path):
    """The stand-ins arrive as the real model does (fluxnb.hub: the real id, through the Hub's client), so after
    the parameters cell no code cell asks whether it runs on one: what a learner reads is what runs on the Hub."""
    cells = [c for c in _cells(path) if c["cell_type"] == "code"]
    parameters = next(i for i, c in enumerate(cells) if "fluxnb.resolve_checkpoint(MODEL_ID)" in _source(c))
    for cell in cells[parameters + 1:]:
        found = _STAND_IN_SWITCHES.search(_source(cell))
        assert found is None, f"{path.name}: {found[0]!r} after the parameters cell, in {_source(cell)[:80]!r}"
