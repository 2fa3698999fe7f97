"""fluxnb: the helper package of the course "FLUX.1 on small GPUs".

What a lesson imports: the staged recipe the notebooks teach (:mod:`fluxnb.stages`), the checkpoint
switch and the offline stand-ins (:mod:`fluxnb.checkpoints`, :mod:`fluxnb.prequantized`), measuring
(:mod:`fluxnb.memory`), the machine (:mod:`fluxnb.environment`), checks that say what to do before
anything loads (:mod:`fluxnb.errors`, :mod:`fluxnb.exceptions`), what fits (:mod:`fluxnb.capacity`,
:mod:`fluxnb.planner`), block streaming (:mod:`fluxnb.streaming`), bitsandbytes on a CPU
(:mod:`fluxnb.cpu_bitsandbytes`) and the Studio (:mod:`fluxnb.studio`). Notebooks 05-10 import their
own modules (:mod:`fluxnb.quantization`, :mod:`fluxnb.quant_metrics`, :mod:`fluxnb.gguf_export`,
:mod:`fluxnb.slices`, :mod:`fluxnb.game`, :mod:`fluxnb.faster`, :mod:`fluxnb.multigpu`); :mod:`fluxnb.recipes`
is the one table of recipes (ways to run FLUX.1) that capacity, the planner and the benchmark read.
The tools that rehearse the course on a GPU machine, the runner (:mod:`fluxnb.course`,
:mod:`fluxnb.kernel`) and the dry run (:mod:`fluxnb.fit`), are not imported by ``import fluxnb``;
:mod:`fluxnb.envelopes` describes the machines they rehearse. CONTRIBUTING.md lists every module.
"""

from fluxnb.quiet import silence_torchvision_fallback

silence_torchvision_fallback()  # before diffusers is imported: a warning a learner cannot act on (fluxnb/quiet.py)

from fluxnb import capacity, planner  # noqa: E402  (fluxnb.capacity.step_bytes, fluxnb.planner.eta in the notebooks)
from fluxnb.checkpoints import (  # noqa: E402
    build_random,
    build_tiny,
    generation_settings,
    is_stand_in,
    parameter_counts,
    resolve_checkpoint,
)
from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu
from fluxnb.envelopes import committed_run
from fluxnb.environment import (
    available_ram_gib,
    check_free_disk,
    find_hub_token,
    free_vram_gib,
    machine_info,
    missing_resources,
    output_dir,
    pick_dtype,
)
from fluxnb.streaming import (
    BlockStreamingConfig,
    apply_block_streaming,
    blocks_to_keep,
    get_block_streamer,
    remove_block_streaming,
    resident_blocks_that_fit,
)
from fluxnb.errors import (
    FluxnbError,
    NeedsGPUError,
    NotEnoughVRAMError,
    check_checkpoint_access,
    check_generation_request,
    check_embeddings,
    check_latents_size,
    check_part,
    check_size_fits,
    estimate_vram_gib,
    load_image_with_settings,
    oom_advice,
    prompt_truncation_notice,
)
from fluxnb.memory import MemoryTracker, StepTimer, bytes_to_giga_bytes, flush
from fluxnb.stages import (
    NonFiniteLatentsError,
    decode,
    denoise,
    encode_and_save,
    embeddings_path,
    encode_prompt,
    execution_device,
    load_denoising_pipeline,
    load_embeddings,
    load_pipeline_all_at_once,
    load_text_encoders_4bit,
    load_transformer_4bit,
    load_transformer_offload,
    load_transformer_streamed,
    save_embeddings,
    save_image,
    set_compute_dtype,
)
from fluxnb.studio import Studio
from fluxnb.prequantized import (
    download_gb,
    download_plan,
    export_prequantized,
    prequantized_checkpoint,
    saved_quantized_dir,
)

__version__ = "0.1.0"
__all__ = [
    "MemoryTracker", "NonFiniteLatentsError", "StepTimer", "allow_bitsandbytes_on_cpu", "available_ram_gib",
    "build_random", "build_tiny", "bytes_to_giga_bytes", "check_checkpoint_access", "check_free_disk",
    "BlockStreamingConfig", "apply_block_streaming", "blocks_to_keep", "get_block_streamer", "remove_block_streaming",
    "check_generation_request", "committed_run", "decode", "denoise", "download_gb", "download_plan",
    "embeddings_path", "encode_and_save", "encode_prompt", "execution_device", "export_prequantized",
    "find_hub_token", "flush", "free_vram_gib", "generation_settings", "is_stand_in", "load_denoising_pipeline",
    "load_embeddings", "load_pipeline_all_at_once", "load_text_encoders_4bit", "load_transformer_4bit",
    "load_transformer_offload", "load_transformer_streamed", "machine_info", "missing_resources", "output_dir",
    "parameter_counts", "pick_dtype",
    "prequantized_checkpoint", "resident_blocks_that_fit", "resolve_checkpoint", "save_embeddings", "save_image", "saved_quantized_dir",
    "set_compute_dtype",
    "FluxnbError", "NeedsGPUError", "NotEnoughVRAMError", "check_embeddings", "check_latents_size", "check_part", "check_size_fits", "estimate_vram_gib",
    "load_image_with_settings", "oom_advice", "prompt_truncation_notice",
    "Studio",
]
