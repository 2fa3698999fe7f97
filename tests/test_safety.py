"""Safety, checked on every commit: no token in the repository, no committed outputs, no unsafe loading.

* a Hugging Face token (``hf_`` and 30+ letters/digits) in any committed file -- a notebook's output,
  a script, the README -- fails CI: notebooks get shared, and a leaked token reads the user's gated models;
* notebooks are committed stripped (``.ci/strip_notebooks.py --check``);
* weights load only from safetensors, no ``trust_remote_code``, no pickle, no ``torch.load``.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", "course-output", "outputs", "build", ".whl"}


def committed_files() -> list[Path]:
    """The files git tracks, plus the untracked ones it would commit (not ignored); without git, every file."""
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]
    return [p for p in REPO.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)]


def token_like(text: str) -> list[str]:
    """Token-like strings in ``text``, shown masked (the first 6 characters) so a report leaks nothing."""
    return [match[:6] + "..." for match in TOKEN.findall(text)]


def test_the_scanner_finds_a_token_and_masks_it():
    fake = "hf_" + "Ab3" * 12  # built here so that this file holds no token-like string itself
    assert token_like(f'os.environ["HF_TOKEN"] = "{fake}"') == ["hf_Ab3..."]
    assert token_like('"text": "token found: True"') == [] and token_like("hf_short123") == []


def test_no_committed_file_holds_a_token():
    files = committed_files()
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "README.md" for p in files)
    leaks = {}
    for path in files:
        found = token_like(path.read_bytes().decode("utf-8", errors="replace"))
        if found:
            leaks[str(path.relative_to(REPO))] = found
    assert not leaks, f"token-like strings (revoke them on huggingface.co/settings/tokens, then remove): {leaks}"


def test_notebooks_are_committed_without_outputs():
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "strip_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


UNSAFE = [
    (re.compile(r"^\s*(import pickle|from pickle|import dill|import joblib)", re.M), "pickle"),
    (re.compile(r"\btorch\.load\("), "torch.load (pickle)"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"use_safetensors\s*=\s*False"), "use_safetensors=False"),
    (re.compile(r"\.(bin|pt|pth|ckpt|pkl)[\"']"), "a pickle-format weights file"),
]


@pytest.mark.parametrize("pattern, what", UNSAFE, ids=[w for _, w in UNSAFE])
def test_no_unsafe_loading_in_code_or_notebooks(pattern, what):
    code = [p for p in committed_files() if p.suffix in (".py", ".ipynb", ".sh") and p.name != "test_safety.py"]
    if what == "a pickle-format weights file":  # tests name such files to check that nothing downloads them
        code = [p for p in code if p.relative_to(REPO).parts[0] != "tests"]
    hits = [str(p.relative_to(REPO)) for p in code if pattern.search(p.read_text(errors="replace"))]
    assert not hits, f"{what} in {hits}"


def test_the_token_is_read_from_colab_or_the_environment_and_never_printed():
    setup = (REPO / "notebooks" / "00_setup.ipynb").read_text()
    assert "fluxnb.find_hub_token()" in setup and 'print(\\"Hugging Face token found:\\", token is not None)' in setup
    for path in committed_files():
        if path.suffix in (".py", ".ipynb") and path.name != "test_safety.py":
            text = path.read_text(errors="replace")
            assert not re.search(r"print\([^)\n]*\btoken\s*[,)]", text), f"{path.name} may print a token"
