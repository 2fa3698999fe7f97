"""Let diffusers' bitsandbytes quantizers run on a machine without a GPU (the tiny course).

bitsandbytes 0.50 quantizes and runs NF4, FP4 and LLM.int8 on the CPU, and transformers already
accepts that. diffusers 0.42 still refuses in exactly two methods of its quantizers:

* ``validate_environment`` raises "No GPU found. A GPU is needed for quantization.";
* ``update_device_map`` puts the model on ``cuda:<n>`` when no device map is given.

:func:`allow_bitsandbytes_on_cpu` replaces those two methods, and only when no GPU is present: on a
GPU it changes nothing, so the notebooks' quantization cells run the same code everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

_PATCHED: dict[str, Any] = {}


def _validate_environment_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
    """diffusers' checks minus the GPU requirement: libraries present, nothing sent to disk."""
    from diffusers.utils import is_accelerate_available, is_bitsandbytes_available

    if not is_accelerate_available() or not is_bitsandbytes_available():
        raise ImportError("bitsandbytes quantization needs `pip install accelerate bitsandbytes`.")
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict) and "disk" in device_map.values():
        raise ValueError("bitsandbytes cannot quantize modules offloaded to disk.")


def _update_device_map_cpu(self: Any, device_map: Any) -> Any:
    """No device map given: keep the model on the CPU instead of asking for ``cuda:0``."""
    return {"": "cpu"} if device_map is None else device_map


def allow_bitsandbytes_on_cpu() -> bool:
    """Open diffusers' bitsandbytes quantizers for the CPU when no GPU is present.

    Returns True if it patched (no GPU), False if it left diffusers alone (a GPU is present).
    Calling it again is harmless; :func:`restore_bitsandbytes_gpu_checks` undoes it.
    """
    if torch.cuda.is_available():
        return False
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    for cls in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer):
        if cls.__name__ not in _PATCHED:
            _PATCHED[cls.__name__] = (cls, cls.validate_environment, cls.update_device_map)
        cls.validate_environment = _validate_environment_cpu
        cls.update_device_map = _update_device_map_cpu
    return True


def restore_bitsandbytes_gpu_checks() -> None:
    """Put diffusers' original methods back (used by the tests)."""
    for cls, validate, update in _PATCHED.values():
        cls.validate_environment = validate
        cls.update_device_map = update
    _PATCHED.clear()
