"""The staged FLUX.1 recipe, exactly as notebooks 01-03 teach it (the d2l ``#@save`` idea).

Each notebook shows these functions' code in its cells; later notebooks call them from here instead
of repeating it. ``tests/test_notebooks.py::test_saved_cells_are_exactly_the_package_code`` checks that the cells marked
``#@save`` and this file say the same thing.

The flow keeps one big model on the GPU at a time:

1. encode the prompt with a 4-bit (NF4) T5-XXL and CLIP, save the embeddings, free the encoders;
2. load the 4-bit transformer, denoise from the saved embeddings to latents, free it;
3. decode the latents with the VAE and save a PNG that records how it was made.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, safe_open, save_file

from fluxnb.errors import (check_embeddings, check_generation_request, check_embeddings_settings, check_latents_size, check_max_sequence_length,
                           check_part, check_prompt, check_safetensors_file, prompt_truncation_notice)
from fluxnb.exceptions import FluxnbError
from fluxnb.memory import StepTimer, flush


def execution_device() -> torch.device:
    """The GPU if there is one, else the CPU (the tiny course)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- 01: encode the prompt with a 4-bit T5 ----------------------------------------------------


def set_compute_dtype(model: Any, dtype: torch.dtype) -> Any:
    """Make every 4-bit layer of ``model`` compute in ``dtype``; returns ``model``.

    A model saved in 4 bits loads with the compute dtype it was saved with (the Hub's NF4 FLUX.1-dev:
    fp16), whatever ``dtype`` ``from_pretrained`` gets: bitsandbytes would cast a bf16 GPU's
    activations to fp16 (where they can overflow), or compute in bf16 on a T4, which has none.
    """
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.compute_dtype = dtype
    return model


#@save
def load_text_encoders_4bit(checkpoint: str, dtype: torch.dtype, prequantized: str | None = None) -> Any:
    """A FluxPipeline holding only CLIP (half precision) and T5-XXL in NF4: enough to encode prompts.

    ``prequantized``: a folder or Hub repo whose ``text_encoder_2`` was saved in NF4 already (the
    Hub's: 6.3 GB to download instead of 9.5); without it, T5 is quantized while loading from ``checkpoint``.
    CLIP and the tokenizers always come from ``checkpoint``.
    """
    from diffusers import FluxPipeline
    from transformers import BitsAndBytesConfig, CLIPTextModel, T5EncoderModel

    check_part(prequantized or checkpoint, "text_encoder_2")  # a damaged folder stops here, named
    if prequantized:  # 4-bit on disk: loads as saved, no quantization config
        text_encoder_2 = T5EncoderModel.from_pretrained(
            prequantized, subfolder="text_encoder_2", dtype=dtype, use_safetensors=True
        )
        set_compute_dtype(text_encoder_2, dtype)  # else it computes in the dtype it was saved with
    else:
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        text_encoder_2 = T5EncoderModel.from_pretrained(
            checkpoint, subfolder="text_encoder_2", quantization_config=nf4, dtype=dtype, use_safetensors=True
        )  # bitsandbytes places it on the GPU while loading, 4 bits per weight
    text_encoder = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
    return FluxPipeline.from_pretrained(
        checkpoint, text_encoder=text_encoder.to(execution_device()), text_encoder_2=text_encoder_2,
        transformer=None, vae=None, dtype=dtype, use_safetensors=True,
    )


#@save
def encode_prompt(pipe: Any, prompt: str, max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
    """T5 per-token embeddings and the pooled CLIP embedding of ``prompt``."""
    with torch.no_grad(), prompt_truncation_notice(pipe, prompt, max_sequence_length):  # one line if cut
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length
        )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def embeddings_path(folder: str | Path, **settings: Any) -> Path:
    """Where :func:`save_embeddings` puts embeddings made with ``settings`` (a hash names the file)."""
    metadata = {key: str(value) for key, value in sorted(settings.items())}
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", metadata.get("prompt", "prompt").lower()).strip("-")[:40]
    return Path(folder) / f"{slug}-{digest}.safetensors"


#@save
def save_embeddings(embeds: dict[str, torch.Tensor], folder: str | Path, **settings: Any) -> Path:
    """Save embeddings as safetensors, with the prompt and settings as metadata.

    The file name is a hash of the settings: the same prompt and settings reuse one file, and
    different ones never overwrite each other.
    """
    path = embeddings_path(folder, **settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {key: str(value) for key, value in settings.items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in embeds.items()}, str(path), metadata=metadata)
    return path


def load_embeddings(path: str | Path, device: torch.device | str | None = None,
                    checkpoint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read back what :func:`save_embeddings` wrote: the tensors and the settings they were made with.

    A file cut off while it was saved stops here with its name (it is not deleted). ``checkpoint``:
    the one you will denoise with; embeddings made by another one are refused.
    """
    check_safetensors_file(path, "The embeddings file", "delete it and encode the prompt again (notebook 01, "
                           "or fluxnb.encode_and_save).")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if checkpoint is not None:
        check_embeddings_settings(metadata, checkpoint)
    tensors = load_file(str(path), device=str(device or execution_device()))
    return tensors, metadata


def saved_embeddings(folder: str | Path, **settings: Any) -> Path | None:
    """A file in ``folder`` that :func:`save_embeddings` wrote with ``settings``, if there is one.

    Where T5 came from (``prequantized``: the NF4 package, or None: the original, quantized while
    loading) does not count: both are the same 4-bit T5, made by the same ``BitsAndBytesConfig`` from
    the same weights, so notebook 01's file serves 03 whichever way 01 loaded it. Everything else
    (prompt, checkpoint, tokens, dtype) must match.
    """
    exact = embeddings_path(folder, **settings)
    if exact.is_file():
        return exact
    wanted = {key: str(value) for key, value in settings.items() if key != "prequantized"}
    for path in sorted(Path(folder).glob(exact.name.rsplit("-", 1)[0] + "-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception:  # noqa: BLE001 (a damaged file is not a match; load_embeddings names it if used)
            continue
        if {key: metadata.get(key) for key in wanted} == wanted:
            return path
    return None


def encode_and_save(checkpoint: str, prompt: str, dtype: torch.dtype, folder: str | Path,
                    max_sequence_length: int = 512, prequantized: str | None = None) -> Path:
    """All of notebook 01 in one call: load the 4-bit encoders, encode, save, free. Returns the file.

    If embeddings of this prompt with these settings were saved before (by notebook 01, with T5 from
    either source: :func:`saved_embeddings`), nothing is loaded.
    """
    check_prompt(prompt)
    check_max_sequence_length(max_sequence_length)
    settings = dict(prompt=prompt, checkpoint=checkpoint, max_sequence_length=max_sequence_length,
                    dtype=str(dtype), prequantized=prequantized)
    path = saved_embeddings(folder, **settings)
    if path is not None:
        return path
    pipe = load_text_encoders_4bit(checkpoint, dtype, prequantized)
    embeds = encode_prompt(pipe, prompt, max_sequence_length)
    path = save_embeddings(embeds, folder, **settings)
    del pipe, embeds
    flush()
    return path


# --- 02: the 4-bit transformer and the VAE -----------------------------------------------------


#@save
def load_transformer_4bit(checkpoint: str, dtype: torch.dtype, quant_type: str = "nf4",
                          prequantized: str | None = None) -> Any:
    """FLUX's transformer with its Linear layers in 4 bits (NF4 by default), computing in ``dtype``.

    Without ``prequantized``, the original bf16 weights of ``checkpoint`` are quantized while loading.
    ``prequantized``: a folder or Hub repo whose ``transformer`` was saved in 4 bits already by
    ``save_pretrained`` (about 6.7 GB to download instead of 23.8, no quantization pass); it loads as
    saved, so ``checkpoint`` and ``quant_type`` are not used.
    """
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    check_part(prequantized or checkpoint, "transformer")  # a damaged folder stops here, named
    if prequantized:  # 4-bit on disk: loads as saved, no quantization config
        transformer = FluxTransformer2DModel.from_pretrained(
            prequantized, subfolder="transformer", dtype=dtype, use_safetensors=True
        )
        return set_compute_dtype(transformer, dtype)  # else it computes in the dtype it was saved with
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=dtype)
    return FluxTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", quantization_config=config, dtype=dtype, use_safetensors=True
    )


#@save
def load_denoising_pipeline(checkpoint: str, transformer: Any, dtype: torch.dtype) -> Any:
    """A FluxPipeline with the given transformer and the VAE, and no text encoders at all."""
    from diffusers import AutoencoderKL, FluxPipeline

    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", dtype=dtype, use_safetensors=True)
    return FluxPipeline.from_pretrained(
        checkpoint, transformer=transformer, vae=vae.to(execution_device()), text_encoder=None,
        text_encoder_2=None, tokenizer=None, tokenizer_2=None, dtype=dtype, use_safetensors=True,
    )


# --- 03: denoise, decode, save ------------------------------------------------------------------


class NonFiniteLatentsError(FluxnbError, FloatingPointError):
    """The denoiser produced NaN or inf (typically fp16 overflow on GPUs without bf16)."""


#@save
def denoise(pipe: Any, embeds: dict[str, torch.Tensor], height: int, width: int, steps: int,
            guidance: float, seed: int, step_timer: StepTimer | None = None) -> torch.Tensor:
    """Run the transformer from saved embeddings; return the packed latents (not yet an image).

    ``step_timer`` (a :class:`fluxnb.memory.StepTimer`) records when each step ends.
    """
    check_generation_request(height, width, steps, guidance, seed=seed)
    check_embeddings(embeds, pipe.transformer)  # made by this checkpoint's text encoders?
    device = pipe._execution_device
    latents = pipe(
        prompt_embeds=embeds["prompt_embeds"].to(device, pipe.transformer.dtype),
        pooled_prompt_embeds=embeds["pooled_prompt_embeds"].to(device, pipe.transformer.dtype),
        height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),  # same noise on any device
        output_type="latent", callback_on_step_end=step_timer,
    ).images
    if not torch.isfinite(latents).all():
        raise NonFiniteLatentsError(
            f"The latents contain NaN/inf after {steps} steps in {pipe.transformer.dtype}. First check the "
            "embeddings: made in fp16, T5 overflows, so on GPUs without bf16 (T4, V100) encode in float32 "
            "(TEXT_DTYPE in the notebooks' parameters cell; notebook 03, 'fp16 on a T4', and diffusers' FLUX "
            "docs, 'Running FP16 inference'). On a bf16 GPU compute in dtype=torch.bfloat16."
        )
    return latents


#@save
def decode(vae: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    """Unpack FLUX's 2x2-patched latents, undo the VAE scaling, decode to a PIL image."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor

    check_latents_size(latents, height, width)  # the size they were denoised at?
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = FluxPipeline._unpack_latents(latents, height, width, scale)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    if not torch.isfinite(pixels).all():
        raise NonFiniteLatentsError("The VAE produced NaN/inf: decode in float32 (vae.to(torch.float32)).")
    return VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(pixels, output_type="pil")[0]


def tile_vae(vae: Any, tile_pixels: int = 512) -> Any:
    """Make ``vae`` decode in overlapping ``tile_pixels`` tiles (diffusers' ``enable_tiling``), which bounds
    its memory whatever the image size. FLUX's VAE tiles only images larger than its 1024-pixel sample
    size by default, so the tile size is set too (notebook 08, section 7). Returns ``vae``."""
    vae.enable_tiling()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_pixels, tile_pixels // scale
    return vae


#@save
def save_image(image: Image.Image, folder: str | Path, **settings: Any) -> Path:
    """Save a PNG with the settings in its metadata; never overwrites (image-0001.png, -0002, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    n = len(list(folder.glob("image-*.png"))) + 1
    while True:
        path = folder / f"image-{n:04d}.png"
        try:
            with open(path, "xb") as f:  # "x": fail rather than overwrite an earlier image
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            n += 1


# --- 04: the two recipes the staged flow is compared with ---------------------------------------


#@save
def load_pipeline_all_at_once(checkpoint: str, dtype: torch.dtype) -> Any:
    """The plain recipe: every component in ``dtype`` (bf16 on a big GPU), all resident on the device."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(checkpoint, dtype=dtype, use_safetensors=True).to(execution_device())


#@save
def load_transformer_offload(checkpoint: str, dtype: torch.dtype, prequantized: str | None = None) -> Any:
    """The NF4 transformer and the VAE in one pipeline with model CPU offload, and no text encoders.

    Each model waits in host RAM and visits the GPU only while it runs. The prompt is encoded before,
    by the staged 4-bit T5 (notebook 01): T5 offloaded in the same pipeline would wait in host RAM too.
    """
    transformer = load_transformer_4bit(checkpoint, dtype, prequantized=prequantized)
    pipe = load_denoising_pipeline(checkpoint, transformer, dtype)
    pipe.enable_model_cpu_offload()
    return pipe


# --- 08: the smallest GPU: stream the NF4 transformer's blocks ------------------------------------


#@save
def load_transformer_streamed(checkpoint: str, dtype: torch.dtype, prequantized: str | None = None,
                              resident_blocks: int = 0) -> Any:
    """The NF4 transformer with its blocks in pinned host RAM, each copied to the GPU just before it runs.

    ``resident_blocks`` of the 57 blocks stay on the GPU (0: stream them all; 57: no streaming).
    From a ``prequantized`` folder or repo the weights load straight into host RAM, so the GPU never
    holds the whole model; quantizing while loading runs on the GPU (that is where bitsandbytes
    quantizes), so that load peaks at the whole NF4 model before the blocks leave.
    """
    from diffusers import FluxTransformer2DModel

    from fluxnb.streaming import BlockStreamingConfig, apply_block_streaming

    if prequantized:
        transformer = FluxTransformer2DModel.from_pretrained(
            prequantized, subfolder="transformer", dtype=dtype, device_map="cpu", use_safetensors=True)
        set_compute_dtype(transformer, dtype)
    else:
        transformer = load_transformer_4bit(checkpoint, dtype)
    apply_block_streaming(transformer, BlockStreamingConfig(resident_blocks=resident_blocks, device=execution_device()))
    return transformer
