"""The notebooks' structure: stripped outputs, the course's conventions, and #@save cells == fluxnb."""

import ast
import inspect
import json
from pathlib import Path

import pytest

import fluxnb.stages

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
    setup = next(c for c in cells if c["cell_type"] == "code")
    assert 'if "google.colab" in sys.modules:' in _source(setup) and "%pip install" in _source(setup)
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
            source = "\n".join(line for line in _source(cell).splitlines() if not line.lstrip().startswith("%"))
            ast.parse(source)
