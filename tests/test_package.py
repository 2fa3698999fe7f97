"""The shape of the fluxnb package: no import cycles, and a light ``import fluxnb``."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fluxnb"
MODULES = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")
"""Every module of fluxnb, by its name under the package: ``capacity``, ``lab`` (its ``__init__``), ``lab.course``."""
LAB = {m for m in MODULES if m == "lab" or m.startswith("lab.")}


def _path(module: str) -> Path:
    folder = PACKAGE / module.replace(".", "/")
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def imports_of(path: Path) -> set[str]:
    """The fluxnb modules a file imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxnb"):
            base = node.module.removeprefix("fluxnb").lstrip(".")
            for alias in node.names:  # `from fluxnb.lab import course` imports fluxnb.lab.course
                name = f"{base}.{alias.name}" if base else alias.name
                found.add(name if name in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("fluxnb.") for alias in node.names if alias.name.startswith("fluxnb.")}
    me = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    return {m for m in found if m in MODULES} - {me}


def test_no_module_of_fluxnb_imports_one_that_imports_it_back():
    """Issue 18: environment and errors imported each other, hidden inside functions. An import inside
    a function is counted as one: a cycle either way means neither module can be read alone."""
    graph = {name: imports_of(_path(name)) for name in MODULES}
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
            "'fluxnb.course', 'fluxnb.lab', 'fluxnb.multigpu', 'fluxnb.studio', 'fluxnb.planner', "
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
            "print(before, 'fluxnb.studio' in sys.modules, 'fluxnb.lab' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False True False"
    import fluxnb

    rehearsal = {"course", "fit", "quiet", *LAB}  # quiet is imported by `import fluxnb` itself
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


SOURCES = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py")]


def _files_matching(pattern: str) -> set[str]:
    return {str(p.relative_to(PACKAGE.parent)) for p in SOURCES if re.search(pattern, p.read_text(), re.M)}


def _float_constants(value: float) -> set[str]:
    return {str(p.relative_to(PACKAGE.parent)) for p in SOURCES for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Constant) and type(node.value) is float and node.value == value}


def test_one_definition_each_of_gib_the_machines_the_vram_cap_and_the_supervisor():
    """Issue 18: GIB four times, the target machines twice with different numbers, VRAM capped three ways,
    four subprocess supervisors. Each now lives in one module, and this test keeps it so."""
    assert _files_matching(r"^GIB\s*[:=]") == {"fluxnb/capacity.py"}
    assert _files_matching(r"\bEnvelope\(") == {"fluxnb/envelopes.py"}
    for number in (14.74, 7.6, 12.7):  # the T4, the 8 GB card, Colab's VM: read from fluxnb.envelopes elsewhere
        assert _float_constants(number) == {"fluxnb/envelopes.py"}, number
    assert _files_matching(r"set_per_process_memory_fraction\(") == {"fluxnb/memory.py"}
    assert _files_matching(r"subprocess\.(Popen|run|call|check_call|check_output)\(") == {"fluxnb/lab/supervisor.py"}
    assert _files_matching(r"\.prctl\(") == {"fluxnb/lab/supervisor.py"}
    assert _files_matching(r"_fluxnb_streamer") <= {"fluxnb/streaming.py"}
    assert _files_matching(r"^class \w*(Sampler|Tracker)\b") == {"fluxnb/memory.py"}


def test_the_lesson_modules_never_import_the_rehearsal_tooling_but_the_launchers():
    """fluxnb.lab is for the runner, the benchmarks and the CLIs. Of the lesson modules only multigpu (its
    torchrun launcher) reaches it; the dry run (fit) and the runner's command (course) are CLIs."""
    users = {m for m in MODULES if m not in LAB and any(i in LAB for i in imports_of(_path(m)))}
    assert users == {"course", "fit", "multigpu"}


# --- the wheel: what a regular install gets (Colab's setup cell: pip install "fluxnb @ git+...") ---

ROOT = PACKAGE.parent
NOT_SHIPPED: dict[str, str] = {}
"""Tracked files under fluxnb/ that the wheel leaves out on purpose, each with its reason. None: every one
is read at run time (the configs by the stand-ins, the results by the planner, the capacity model and the
notebooks, the modules by everyone) or documents a shipped file beside it (``configs/README.md`` says where
the configs come from). Issue 25: ``packages = ["fluxnb"]`` left out fluxnb/lab, and notebook 10, ``python
-m fluxnb.fit`` and ``python -m fluxnb.course`` failed on Colab with ``No module named 'fluxnb.lab'``."""


def _tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    return [p for p in out.stdout.split("\0") if p and (ROOT / p).is_file()]  # not the ones deleted here


def _package_files() -> set[str]:
    """What a wheel must hold: every tracked file under fluxnb/ and every module there, tracked yet or not."""
    return set(_tracked("fluxnb")) | {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from this checkout's files, in a clean copy: a stale build/ folder of an earlier
    build would otherwise lend it files its configuration no longer ships."""
    import shutil

    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in {*_tracked("pyproject.toml", "README.md", "LICENSE"), *_package_files()}:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(source)],  # a path, not a bare name pip would look up
                   check=True, timeout=300, cwd=tmp)
    (built,) = (tmp / "dist").glob("fluxnb-*.whl")
    return built


def test_the_wheel_ships_every_module_and_data_file_of_fluxnb(wheel):
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert NOT_SHIPPED.keys() <= set(_tracked("fluxnb")), "NOT_SHIPPED names a file git does not track"
    missing = sorted(_package_files() - NOT_SHIPPED.keys() - shipped)
    assert not missing, f"the wheel leaves out {len(missing)} file(s) (pyproject's [tool.setuptools]): {missing}"
    assert not NOT_SHIPPED.keys() & shipped, "a file in NOT_SHIPPED is in the wheel: drop it from the list"
    dist_info = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/"
    extra = sorted(name for name in shipped - _package_files() if not name.startswith(dist_info))
    assert not extra, f"the wheel holds files that are not fluxnb's tracked files: {extra}"


def test_the_installed_wheel_imports_every_module_outside_the_checkout(wheel, tmp_path):
    """The wheel unpacked (a pure wheel's install) and imported from a folder outside the checkout: every
    module, the CLIs' entry points included, with no help from the source tree."""
    import zipfile

    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import importlib, sys, fluxnb; from pathlib import Path; "
            f"[importlib.import_module('fluxnb.' + m) for m in {MODULES!r}]; "
            "from fluxnb import checkpoints, planner; "
            "assert checkpoints.CONFIGS.is_dir() and planner.RECIPES_JSON.is_file(); "
            "here = Path(fluxnb.__file__).resolve().parent; "  # and no module from elsewhere: an editable
            "print(sorted(n for n, m in sys.modules.items() if n.startswith('fluxnb') "  # install's finder
            "             and not Path(m.__file__).resolve().is_relative_to(here))); print(here)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    *_, elsewhere, here = out.stdout.strip().splitlines()
    assert (elsewhere, here) == ("[]", str((site / "fluxnb").resolve()))  # would serve what the wheel lacks


def test_the_course_runner_finds_the_checkouts_notebooks_by_default():
    """From a checkout (README's editable install) ``python -m fluxnb.course OUT`` runs notebooks/[0-9]*.ipynb.
    A wheel ships no notebooks, so CI's wheel step (.ci/wheel_course) passes their paths, and CI no longer runs
    the default: this test keeps it pointing at the checkout's lessons."""
    from fluxnb.lab import course

    lessons = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert lessons and sorted(course.NOTEBOOKS.glob("[0-9]*.ipynb")) == lessons
