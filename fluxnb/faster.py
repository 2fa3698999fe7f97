"""Faster steps without a bigger GPU: torch.compile and diffusers' step caching (notebook 09).

Two different promises. ``torch.compile`` computes *the same* steps faster (fused kernels, fewer
launches) after paying a compile once per process and image size. A step cache computes *fewer*
things: it reuses a block's or an attention's output from an earlier step when it expects little
change, so the image changes too. Which steps a cache skips is decided one of two ways:

* **from the model's own outputs** at run time (First Block Cache compares the first block's residual
  with the last step's): on random weights the residuals are nothing like the real model's, so the
  stand-ins cannot show how often it skips, how fast it is, or how the image suffers;
* **by a schedule fixed in advance** (Pyramid Attention Broadcast and FasterCache: every Nth step in a
  timestep window; TaylorSeer: a full step every Nth; MagCache: from magnitude ratios calibrated once
  on the real FLUX.1-dev, shipped with diffusers): the same steps are skipped on any weights of these
  shapes, so their speed is measurable here. Their effect on the image is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# name: (what it skips, how it decides). The configs are made by cache_config() below.
CACHES: dict[str, tuple[str, str]] = {
    "first-block": ("every block after the first, when the first block's output changed little since the last "
                    "full step", "threshold on the model's outputs"),
    "magcache": ("every block, for up to 3 steps in a row, while the accumulated error predicted by FLUX.1-dev's "
                 "calibrated magnitude ratios stays under a threshold", "fixed by the shipped FLUX ratios"),
    "taylorseer": ("the attention of every block on 2 of each 3 steps after step 2, predicting it with a first-order "
                   "Taylor series from the last full steps", "fixed schedule"),
    "pab": ("the attention of every block on every other step inside a timestep window (100-950)",
            "fixed schedule"),
    "fastercache": ("the attention of every block on every other step after timestep 900, blending cached "
                    "and fresh attention", "fixed schedule"),
}
FIXED_SCHEDULE = tuple(name for name, (_, how) in CACHES.items() if not how.startswith("threshold"))


def cache_config(name: str, pipe: Any, steps: int) -> Any:
    """The diffusers config for cache ``name`` (one of :data:`CACHES`), set up for FLUX and ``steps`` steps.

    ``pipe`` is the FluxPipeline: the schedule-based caches read its current timestep.
    """
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    def timestep() -> Any:
        return pipe.current_timestep

    if name == "first-block":
        return FirstBlockCacheConfig(threshold=0.08)
    if name == "magcache":
        return MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=pipe.transformer.dtype)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, 950),
                                               current_timestep_callback=timestep)
    if name == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
                                 current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5,
                                 is_guidance_distilled=True, tensor_format="BCHW")
    raise ValueError(f"unknown cache {name!r}: use one of {', '.join(CACHES)}")


@contextmanager
def count_attention_runs(transformer: Any) -> Iterator[list[int]]:
    """Count how often the last block's attention really runs (its query projection is called).

    Every cache here skips at least that attention when it skips a step, so with one transformer
    call per step the count is the number of steps computed in full; the others reused a cache.
    """
    calls = [0]
    handle = transformer.single_transformer_blocks[-1].attn.to_q.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def compile_blocker(transformer: Any) -> str | None:
    """Why torch.compile cannot run this transformer here, or None if it can.

    Without a GPU, inductor cannot compile bitsandbytes' 4-bit layers (their CPU path calls ops it
    has no lowering for), so the tiny course explains and skips the compile cells; nor can it trace a
    transformer whose blocks stream (:func:`fluxnb.apply_block_streaming`'s hooks repoint weights).
    """
    from fluxnb.streaming import get_block_streamer

    if get_block_streamer(transformer) is not None:
        return ("its blocks stream from host RAM on this GPU (a step does not fit next to all of them), and "
                "torch.compile cannot trace the streaming hooks: on a GPU that holds the step (a T4 does), it compiles")
    quantized = getattr(transformer, "is_quantized", False) or getattr(transformer, "hf_quantizer", None) is not None
    if not torch.cuda.is_available() and quantized:
        return ("no GPU: torch.compile's inductor fails on bitsandbytes' 4-bit layers on a CPU, so this cell "
                "only explains; on a GPU (a Colab T4 too) it compiles and measures")
    return None


def payback_images(compile_s: float, eager_s_per_step: float, compiled_s_per_step: float, steps: int) -> float | None:
    """After how many images of ``steps`` steps a compile of ``compile_s`` seconds has paid for itself.

    None if the compiled step is not faster (then it never pays off).
    """
    saved_per_image = (eager_s_per_step - compiled_s_per_step) * steps
    if saved_per_image <= 0:
        return None
    return compile_s / saved_per_image
