"""fluxnb: the helper package of the course "FLUX.1 on small GPUs".

What a lesson imports: the staged recipe the notebooks teach (:mod:`fluxnb.stages`), the checkpoint
switch (:mod:`fluxnb.switch`) and the offline stand-ins (:mod:`fluxnb.checkpoints`, :mod:`fluxnb.prequantized`),
served under the real repository ids by a local Hub endpoint (:mod:`fluxnb.hub`), measuring
(:mod:`fluxnb.memory`), the machine (:mod:`fluxnb.environment`), checks that say what to do before
anything loads (:mod:`fluxnb.errors`, :mod:`fluxnb.exceptions`), what fits (:mod:`fluxnb.capacity`,
:mod:`fluxnb.planner`), block streaming (:mod:`fluxnb.streaming`), bitsandbytes on a CPU
(:mod:`fluxnb.cpu_bitsandbytes`) and the Studio (:mod:`fluxnb.studio`). Notebooks 05-10 import their
own modules (:mod:`fluxnb.quantization`, :mod:`fluxnb.quant_metrics`, :mod:`fluxnb.gguf_export`,
:mod:`fluxnb.slices`, :mod:`fluxnb.game`, :mod:`fluxnb.faster`, :mod:`fluxnb.multigpu`), and notebook 12
FLUX.2 [klein]'s staged flow (:mod:`fluxnb.klein`); :mod:`fluxnb.recipes`
is the one table of recipes (ways to run FLUX.1) that capacity, the planner and the benchmark read.
The tools that rehearse the course on a GPU machine live apart, in :mod:`fluxnb.lab` (the runner
behind ``python -m fluxnb.course``, RAM and VRAM limits, the one subprocess supervisor); neither they nor
the dry run (:mod:`fluxnb.fit`) are imported by ``import fluxnb``. :mod:`fluxnb.envelopes` describes the
machines they rehearse. CONTRIBUTING.md lists every module.
"""

import importlib
from typing import Any

from fluxnb.quiet import silence_torchvision_fallback

silence_torchvision_fallback()  # before diffusers is imported: a warning a learner cannot act on (fluxnb/quiet.py)

__version__ = "0.1.0"

# Where each public name lives. ``import fluxnb`` imports none of these modules: a name is imported from
# its module the first time it is used (PEP 562's module ``__getattr__``; ``from fluxnb import x`` too).
# So ``import fluxnb`` stays light (the Studio and its widgets load when ``fluxnb.Studio`` is touched),
# and ``python -m fluxnb.planner`` / ``python -m fluxnb.capacity`` find their module not imported yet
# (runpy warns when the package's import has imported it before it runs as ``__main__``).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("build_random", "build_tiny", "generation_settings", "is_stand_in", "parameter_counts"),
    "cpu_bitsandbytes": ("allow_bitsandbytes_on_cpu",),
    "envelopes": ("committed_run",),
    "environment": ("available_ram_gib", "check_free_disk", "find_hub_token", "free_vram_gib", "machine_info",
                    "missing_resources", "output_dir", "pick_dtype"),
    "errors": ("FluxnbError", "NeedsGPUError", "NotEnoughVRAMError", "check_checkpoint_access",
               "check_embeddings", "check_generation_request", "check_latents_size", "check_part",
               "check_size_fits", "estimate_vram_gib", "load_image_with_settings", "oom_advice",
               "prompt_truncation_notice"),
    "memory": ("MemoryTracker", "StepTimer", "bytes_to_giga_bytes", "flush"),
    "prequantized": ("download_gb", "download_plan", "download_text", "export_prequantized",
                     "saved_quantized_dir"),
    "stages": ("NonFiniteLatentsError", "decode", "denoise", "embeddings_path", "encode_and_save", "encode_prompt",
               "execution_device", "load_denoising_pipeline", "load_embeddings", "load_pipeline_all_at_once",
               "load_text_encoders_4bit", "load_transformer_4bit", "load_transformer_offload",
               "load_transformer_streamed", "save_embeddings", "save_image", "set_compute_dtype"),
    "streaming": ("BlockStreamingConfig", "apply_block_streaming", "blocks_to_keep", "get_block_streamer",
                  "remove_block_streaming", "resident_blocks_that_fit"),
    "studio": ("Studio",),
    "switch": ("prequantized_checkpoint", "resolve_checkpoint"),
}
# The lesson modules a notebook may reach as ``fluxnb.<module>`` after ``import fluxnb`` (``fluxnb.planner.eta``,
# ``fluxnb.capacity.step_bytes``, ``fluxnb.streaming.transformer_blocks``): imported on first use too. The
# rehearsal tooling (fluxnb.lab, course, fit) is not among them: ``import fluxnb.lab`` says what it loads.
_SUBMODULES = frozenset({"capacity", "checkpoints", "cpu_bitsandbytes", "envelopes", "environment", "errors",
                         "exceptions", "faster", "game", "gguf_export", "hub", "klein", "memory", "multigpu", "planner",
                         "prequantized", "quant_configs", "quant_metrics", "quantization", "recipe_checks", "recipes",
                         "slices", "stages", "streaming", "studio", "switch"})
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """A public name or a lesson module, imported the first time it is asked for (then kept here)."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"fluxnb.{_HOME[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fluxnb.{name}")
    else:
        raise AttributeError(f"module 'fluxnb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What a notebook's completion offers: the public names and the lesson modules, imported or not."""
    return sorted(set(globals()) | set(_HOME) | _SUBMODULES)
