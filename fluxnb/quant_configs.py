"""Each quantization scheme's config, built with the library's own class: a table from scheme to builder.

:data:`CONFIGS` maps a scheme of :data:`fluxnb.quantization.SCHEMES` to a small named function that
returns the config object ``FluxTransformer2DModel.from_pretrained(..., quantization_config=...)`` (or,
for GGUF, ``from_single_file``) takes; ``None`` where a scheme loads without one (the reference, and
layerwise casting, which is a method called after loading). :func:`fluxnb.quantization.load_transformer`
and the benchmarks use the table; notebooks 05 and 06 write the same calls out in their cells, and
``tests/test_quantization.py`` checks that both build the same configs.

Every builder takes the compute dtype and keyword options that go to the config (they override the
scheme's own settings), and imports its library only when called, so ``import fluxnb`` stays light and
a missing backend fails only for its own schemes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ConfigBuilder = Callable[..., Any]  # (dtype, **options) -> the library's quantization config


def bnb_int8(dtype: torch.dtype, **options: Any) -> Any:
    """bitsandbytes LLM.int8 (``load_in_8bit``); ``llm_int8_threshold`` (6.0) and ``llm_int8_skip_modules``
    are its options. ``dtype`` is unused: int8 layers compute in the model's own dtype."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, **options)


def _bnb_4bit(dtype: torch.dtype, quant_type: str, double_quant: bool, options: dict[str, Any]) -> Any:
    """bitsandbytes 4-bit with ``quant_type`` (``"nf4"``/``"fp4"``), weights dequantized to ``dtype``."""
    from diffusers import BitsAndBytesConfig

    settings = dict(bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype,
                    bnb_4bit_use_double_quant=double_quant)
    return BitsAndBytesConfig(load_in_4bit=True, **{**settings, **options})


def bnb_nf4(dtype: torch.dtype, **options: Any) -> Any:
    """bitsandbytes NF4: 4-bit NormalFloat in blocks of 64, an fp32 scale each (the course's default)."""
    return _bnb_4bit(dtype, "nf4", False, options)


def bnb_fp4(dtype: torch.dtype, **options: Any) -> Any:
    """bitsandbytes FP4: a 4-bit float (e2m1), the same blocks as NF4."""
    return _bnb_4bit(dtype, "fp4", False, options)


def bnb_nf4_double_quant(dtype: torch.dtype, **options: Any) -> Any:
    """bitsandbytes NF4 with ``bnb_4bit_use_double_quant``: the scales themselves stored in 8 bits."""
    return _bnb_4bit(dtype, "nf4", True, options)


def torchao_int8_weight_only(dtype: torch.dtype, **options: Any) -> Any:
    """torchao ``Int8WeightOnlyConfig``: int8 weights, one scale per output channel; runs wherever PyTorch does."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), **options)


def torchao_fp8(dtype: torch.dtype, **options: Any) -> Any:
    """torchao fp8 (e4m3) weights and activations with per-row scales: fp8 matmuls, compute capability 8.9+."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), **options)


def quanto_int8(dtype: torch.dtype, **options: Any) -> Any:
    """optimum-quanto int8 weights (diffusers' ``QuantoConfig``, deprecated there, removed in 1.0)."""
    from diffusers import QuantoConfig

    return QuantoConfig(weights_dtype="int8", **options)


def quanto_fp8(dtype: torch.dtype, **options: Any) -> Any:
    """optimum-quanto float8 (e4m3) weights."""
    from diffusers import QuantoConfig

    return QuantoConfig(weights_dtype="float8", **options)


def sdnq_int8(dtype: torch.dtype, **options: Any) -> Any:
    """SDNQ int8 weights: the ``sdnq`` package's own ``SDNQConfig`` (``diffusers.SDNQConfig`` returns the same)."""
    from sdnq import SDNQConfig

    return SDNQConfig(weights_dtype="int8", **options)


def gguf(dtype: torch.dtype, **options: Any) -> Any:
    """``GGUFQuantizationConfig`` for ``from_single_file``: the file says how it is quantized; each layer's
    weights are dequantized to ``dtype`` when it runs."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype, **options)


CONFIGS: dict[str, ConfigBuilder | None] = {
    "bf16": None,  # the reference: no quantization
    "bnb-int8": bnb_int8,
    "bnb-nf4": bnb_nf4,
    "bnb-fp4": bnb_fp4,
    "bnb-nf4-dq": bnb_nf4_double_quant,
    "torchao-int8wo": torchao_int8_weight_only,
    "torchao-fp8": torchao_fp8,
    "quanto-int8": quanto_int8,
    "quanto-fp8": quanto_fp8,
    "gguf-q8_0": gguf,
    "gguf-q4_0": gguf,
    "fp8-layerwise": None,  # model.enable_layerwise_casting(...) after loading, no config
    "sdnq-int8": sdnq_int8,
}


def build(scheme: str, dtype: torch.dtype, **options: Any) -> Any:
    """The config :data:`CONFIGS` builds for ``scheme`` (None where it loads without one)."""
    if scheme not in CONFIGS:
        raise KeyError(f"unknown quantization scheme {scheme!r}; known: {', '.join(CONFIGS)}")
    builder = CONFIGS[scheme]
    return None if builder is None else builder(dtype, **options)
