"""Quiet output: the messages a learner cannot act on are gone, and only those (fluxnb/quiet.py)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
TORCHVISION = "requires torchvision (not installed); falling back to"


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), FLUXNB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed: no fallback warning")
def test_the_torchvision_fallback_warning_is_gone_with_fluxnb_only(tmp_path):
    plain = python("from diffusers import FluxPipeline", tmp_path)
    assert TORCHVISION in plain.stderr  # what a learner without torchvision saw
    quiet = python("import fluxnb\nfrom diffusers import FluxPipeline", tmp_path)
    assert quiet.returncode == 0 and TORCHVISION not in quiet.stderr


def test_building_the_stand_ins_writes_no_shard_bars_and_leaves_bars_on(tmp_path):
    done = python(
        "import torch, fluxnb\n"
        "from transformers.utils import logging\n"
        "fluxnb.allow_bitsandbytes_on_cpu()\n"
        "fluxnb.build_tiny('dev')\n"
        "fluxnb.prequantized.stand_in_package('tiny', torch.float32)\n"
        "print('bars on after:', logging.is_progress_bar_enabled())\n", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Writing model shards" not in done.stderr and "bars on after: True" in done.stdout
    assert "Loading weights" in done.stderr  # loading bars (a learner's real download) are untouched


def test_other_transformers_warnings_still_reach_the_learner(caplog):
    import logging

    import fluxnb  # noqa: F401 (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    logger.warning("`X` requires torchvision (not installed); falling back to `XPil` for backward compatibility.")
    logger.warning("something a learner must see")
    assert [r.getMessage() for r in caplog.records] == ["something a learner must see"]
