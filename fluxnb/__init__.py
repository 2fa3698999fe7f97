"""fluxnb: the helper package of the course "FLUX.1 on small GPUs".

Small on purpose: memory measurement (:mod:`fluxnb.memory`), machine checks (:mod:`fluxnb.environment`),
the checkpoint switch and offline stand-ins (:mod:`fluxnb.checkpoints`), bitsandbytes on CPU for the
tiny course (:mod:`fluxnb.cpu_bitsandbytes`), and the staged recipe the notebooks teach
(:mod:`fluxnb.stages`).
"""

from fluxnb.checkpoints import build_random, build_tiny, is_stand_in, resolve_checkpoint
from fluxnb.cpu_bitsandbytes import allow_bitsandbytes_on_cpu
from fluxnb.environment import (
    check_checkpoint_access,
    check_free_disk,
    check_generation_request,
    find_hub_token,
    machine_info,
    output_dir,
    pick_dtype,
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
    load_pipeline_4bit_offload,
    load_pipeline_all_at_once,
    load_text_encoders_4bit,
    load_transformer_4bit,
    save_embeddings,
    save_image,
)

__version__ = "0.1.0"
__all__ = [
    "MemoryTracker", "NonFiniteLatentsError", "StepTimer", "embeddings_path", "find_hub_token", "output_dir", "allow_bitsandbytes_on_cpu", "build_random", "build_tiny",
    "bytes_to_giga_bytes", "check_checkpoint_access", "check_free_disk", "check_generation_request",
    "decode", "denoise", "encode_and_save", "encode_prompt", "execution_device", "flush", "is_stand_in",
    "load_denoising_pipeline", "load_embeddings", "load_pipeline_4bit_offload", "load_pipeline_all_at_once",
    "load_text_encoders_4bit", "load_transformer_4bit",
    "machine_info", "pick_dtype", "resolve_checkpoint", "save_embeddings", "save_image",
]
