"""The shape of the fluxnb package: no import cycles, and a light ``import fluxnb``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fluxnb"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imports_of(path: Path) -> set[str]:
    """The fluxnb modules a file imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxnb"):
            if node.module == "fluxnb":
                found |= {alias.name for alias in node.names if alias.name in MODULES}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("fluxnb.")}
    return found - {path.stem}


def test_no_module_of_fluxnb_imports_one_that_imports_it_back():
    """Issue 18: environment and errors imported each other, hidden inside functions. An import inside
    a function is counted as one: a cycle either way means neither module can be read alone."""
    graph = {name: imports_of(PACKAGE / f"{name}.py") for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    subprocess.run([sys.executable, "-c", f"import fluxnb.{module}"], check=True, timeout=120)


def test_import_fluxnb_stays_light():
    """A lesson's `import fluxnb` loads neither the widgets, the notebook runner's Jupyter machinery,
    nor the benchmark code: the Studio and the course runner import theirs when used."""
    code = ("import sys, fluxnb; heavy = ('ipywidgets', 'jupyter_client', 'nbclient', 'nbformat', 'benchmarks', "
            "'fluxnb.course', 'fluxnb.kernel', 'fluxnb.multigpu'); print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_fluxnb_exceptions_share_one_base():
    import fluxnb
    from fluxnb import exceptions, streaming, studio

    for cls in (fluxnb.NotEnoughVRAMError, fluxnb.NonFiniteLatentsError, fluxnb.NeedsGPUError,
                studio.SizeDoesNotFitError, streaming.DoesNotFit):
        assert issubclass(cls, exceptions.FluxnbError), cls
    assert issubclass(fluxnb.NotEnoughVRAMError, __import__("torch").OutOfMemoryError)  # still what callers catch
