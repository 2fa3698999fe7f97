"""Asked by .ci/wheel_course, in its Python and, as a notebook's one cell, in a course kernel: fluxnb (and every
fluxnb module imported) comes from the wheel step's venv, not from the checkout, and not as an editable install."""

import importlib.metadata
import json
import os
import pathlib
import sys
import sysconfig

import fluxnb
import fluxnb.lab.course
import fluxnb.multigpu  # noqa: F401  (notebook 10's import failed without fluxnb/lab in the wheel)

venv, root = (pathlib.Path(os.environ[k]).resolve() for k in ("FLUXNB_WHEEL_VENV", "FLUXNB_CHECKOUT"))
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
assert site.is_relative_to(venv), f"not the venv's Python: {sys.executable}"
for name, module in sorted(sys.modules.items()):
    if name.startswith("fluxnb"):
        where = pathlib.Path(module.__file__).resolve()
        assert where.is_relative_to(site) and not where.is_relative_to(root), f"{name} imported from {where}"
dist = importlib.metadata.distribution("fluxnb")
direct_url = json.loads(dist.read_text("direct_url.json") or "{}")  # PEP 610: how pip installed it
assert not direct_url.get("dir_info", {}).get("editable"), f"fluxnb is an editable install here: {direct_url}"
assert not any("__editable__" in str(f) for f in dist.files), "fluxnb is an editable install here"
import torch  # noqa: E402

print(f"CI: wheel step: fluxnb {importlib.metadata.version('fluxnb')} from {site / 'fluxnb'} (torch "
      f"{torch.__version__}, Python {sys.version.split()[0]}), asked in {pathlib.Path.cwd()}")
