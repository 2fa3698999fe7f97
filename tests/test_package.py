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
    nor the benchmark code: the Studio and the course runner import theirs when used. Nor the Studio,
    the planner or the capacity model themselves: every name is imported when first used (PEP 562)."""
    code = ("import sys, fluxnb; heavy = ('ipywidgets', 'jupyter_client', 'nbclient', 'nbformat', 'benchmarks', "
            "'fluxnb.course', 'fluxnb.kernel', 'fluxnb.multigpu', 'fluxnb.studio', 'fluxnb.planner', "
            "'fluxnb.capacity'); print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_fluxnb_names_and_lesson_modules_import_when_first_used():
    """``fluxnb.Studio`` imports the Studio's module, ``fluxnb.planner.eta`` the planner, as the notebooks
    use them after a plain ``import fluxnb``; ``__all__`` names only what resolves."""
    code = ("import sys, fluxnb; before = 'fluxnb.studio' in sys.modules; fluxnb.Studio; "
            "assert callable(fluxnb.planner.eta) and callable(fluxnb.capacity.step_bytes); "
            "assert all(getattr(fluxnb, name) is not None for name in fluxnb.__all__); "
            "assert set(fluxnb.__all__) <= set(dir(fluxnb)); "
            "print(before, 'fluxnb.studio' in sys.modules, 'fluxnb.course' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False True False"
    import fluxnb

    rehearsal = {"course", "kernel", "fit", "quiet"}  # quiet is imported by `import fluxnb` itself
    assert set(MODULES) - rehearsal == fluxnb._SUBMODULES, "name each new lesson module in fluxnb._SUBMODULES"
    with pytest.raises(AttributeError, match="no attribute 'course_runner'"):
        fluxnb.course_runner  # noqa: B018  (an unknown name is an AttributeError, as on any module)


def test_python_m_planner_runs_without_runpy_warning():
    """``python -m fluxnb.planner`` warned "found in sys.modules after import of package 'fluxnb'" while
    ``fluxnb/__init__`` imported the planner: runpy then runs a second copy of the module."""
    out = subprocess.run([sys.executable, "-W", "default::RuntimeWarning", "-m", "fluxnb.planner", "--vram", "7.6",
                          "--ram", "16", "--bf16"], capture_output=True, text=True, check=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert "RuntimeWarning" not in out.stderr, out.stderr
    assert "fastest measured recipe that fits" in out.stdout


def test_fluxnb_exceptions_share_one_base():
    import fluxnb
    from fluxnb import exceptions, streaming, studio

    for cls in (fluxnb.NotEnoughVRAMError, fluxnb.NonFiniteLatentsError, fluxnb.NeedsGPUError,
                studio.SizeDoesNotFitError, streaming.DoesNotFit):
        assert issubclass(cls, exceptions.FluxnbError), cls
    assert issubclass(fluxnb.NotEnoughVRAMError, __import__("torch").OutOfMemoryError)  # still what callers catch
