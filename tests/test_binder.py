"""Binder: the badge in every notebook's header must not silently rot.

repo2docker's rules (https://repo2docker.readthedocs.io, "Configuration files"): with a ``binder/``
folder, only the files in it count; ``runtime.txt`` picks the Python, ``requirements.txt`` is
installed with pip (a ``-r`` include is resolved relative to it), ``postBuild`` runs once from the
repository root after that, ``start`` wraps every command (it must end in ``exec "$@"``).

The static checks always run. The install check builds a fresh virtual environment from the binder
files alone, runs ``postBuild``, then notebook 00 under ``start`` with nbval, as Binder would. It
needs PyPI (several hundred MB, a few minutes with a warm pip cache), so it runs only with
``FLUXNB_BINDER_TEST=1`` (``.ci/run`` sets it for its last step).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
BINDER = REPO / "binder"


def _requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_binder_folder_follows_repo2dockers_rules():
    assert sorted(p.name for p in BINDER.iterdir()) == ["postBuild", "requirements.txt", "runtime.txt", "start"]
    for script in ("postBuild", "start"):
        path = BINDER / script
        assert os.access(path, os.X_OK), f"binder/{script} must be executable (git update-index --chmod=+x)"
        assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in (BINDER / "postBuild").read_text()  # a failed step fails the build
    assert (BINDER / "start").read_text().rstrip().endswith('exec "$@"')


def test_binder_runs_the_python_ci_runs():
    (runtime,) = _requirements(BINDER / "runtime.txt")
    assert re.fullmatch(r"python-3\.\d+", runtime)
    assert runtime == "python-3.11"  # README: CI runs Python 3.11


def test_binder_requirements_pin_torch_and_include_the_course_pins():
    lines = _requirements(BINDER / "requirements.txt")
    assert "torch==2.13.0" in lines  # the version requirements.txt's comment names
    includes = [line.split(None, 1)[1] for line in lines if line.startswith("-r ")]
    assert includes == ["../requirements.txt"] and (BINDER / includes[0]).resolve() == REPO / "requirements.txt"
    pinned = {re.split(r"==", line)[0].lower() for line in _requirements(REPO / "requirements.txt")}
    assert {"diffusers", "transformers", "bitsandbytes", "jupyterlab", "ipywidgets", "nbval"} <= pinned
    assert all("==" in line for line in _requirements(REPO / "requirements.txt"))


def test_binder_start_runs_offline_on_the_tiny_stand_in():
    start = (BINDER / "start").read_text()
    assert "export FLUXNB_CHECKPOINT=tiny" in start and "export HF_HUB_OFFLINE=1" in start
    post = (BINDER / "postBuild").read_text()
    assert "pip install --no-deps -e ." in post and "build_tiny" in post


@pytest.mark.skipif(os.environ.get("FLUXNB_BINDER_TEST") != "1", reason="installs from PyPI: FLUXNB_BINDER_TEST=1 runs it")
def test_a_fresh_environment_from_the_binder_files_runs_notebook_00(tmp_path):
    copy = tmp_path / "repo"  # what repo2docker copies: the repository, without this checkout's .venv or outputs
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "course-output", "outputs", "*.egg-info",
                                                               "__pycache__", ".whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv),
               FLUXNB_CACHE=str(tmp_path / "cache"), HOME=os.environ.get("HOME", str(tmp_path)))
    env.pop("PYTHONPATH", None)
    env.update(PIP_RETRIES="1", PIP_DEFAULT_TIMEOUT="30")  # an index that cannot be reached costs seconds, not hours
    run = dict(cwd=copy, env=env, capture_output=True, text=True, timeout=1500)
    done = subprocess.run(["pip", "install", "-q", "-r", "binder/requirements.txt"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(["bash", "binder/postBuild"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(["binder/start", "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "notebooks/00_setup.ipynb", "--nbval-lax", "--nbval-current-env"], **run)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
