"""pytest settings shared by the unit tests (tests/) and the notebook tests (nbval over notebooks/).

Set here, at import, so that notebook kernels started by nbval inherit them:
* HF_HUB_OFFLINE=1: any hidden download fails loudly instead of hanging or passing by luck;
* FLUXNB_CHECKPOINT=tiny: the notebooks run on the offline tiny stand-in, which each kernel serves under
  the real repository ids on localhost (fluxnb.hub; it turns HF_HUB_OFFLINE off for that local Hub alone).
  This process serves none: the unit tests load stand-in folders (fluxnb.checkpoints.stand_in_folder) and
  test the local Hub in subprocesses or through explicit endpoints, so the offline checks stay offline;
* FLUXNB_CACHE / FLUXNB_OUTPUT: a throwaway folder, so tests never touch the user's cache or outputs.
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FLUXNB_CHECKPOINT", "tiny")
_scratch = tempfile.mkdtemp(prefix="fluxnb-tests-")
os.environ.setdefault("FLUXNB_CACHE", os.path.join(_scratch, "cache"))
os.environ.setdefault("FLUXNB_OUTPUT", os.path.join(_scratch, "outputs"))
os.environ.setdefault("MPLBACKEND", "Agg")
