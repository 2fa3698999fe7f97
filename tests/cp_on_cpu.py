"""fluxnb.multigpu's torchrun worker on CPU ranks (gloo), for tests/test_faster_multigpu.py.

diffusers' ``enable_parallelism`` picks each rank's device as ``rank % torch.accelerator.device_count()``
(diffusers/models/modeling_utils.py, ``_resolve_parallel_config``), which divides by zero where there is
no accelerator. This test-only entry point reports one "accelerator" so that the rest of the real code
path (device mesh, Ulysses all-to-all over gloo, the FLUX ``_cp_plan`` split and gather) runs on a CPU.
"""

import sys

import torch

import fluxnb
from fluxnb import multigpu

if __name__ == "__main__":
    torch.accelerator.device_count = lambda: 1
    fluxnb.allow_bitsandbytes_on_cpu()  # the worker's NF4 T5, as in the tiny course
    sys.exit(multigpu._record(multigpu.main)(sys.argv[1:]))
