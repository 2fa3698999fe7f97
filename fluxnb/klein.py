"""FLUX.2 [klein] 4B's staged flow: the same three stages as FLUX.1's (:mod:`fluxnb.stages`), other models.

``black-forest-labs/FLUX.2-klein-4B`` (Apache-2.0) is ``Flux2KleinPipeline`` in diffusers: a
``Flux2Transformer2DModel`` (3.88B parameters, 7.75 GB in bf16), a Qwen3-4B text encoder
(``Qwen3ForCausalLM``, 4.02B parameters, 8 GB in bf16) and the FLUX.2 VAE. It is step-distilled:
4 steps, guidance 1.0 (:func:`fluxnb.checkpoints.generation_settings`). One big model at a time:

1. load the text encoder (in the compute dtype, or in 4 bits), encode the prompt, free it;
2. load the transformer (in the compute dtype, or NF4) and the VAE, denoise to latents, free the transformer;
3. decode the latents with the VAE.

On a free Colab T4 (fp16, 14.74 GiB) the transformer fits whole in fp16; the 4-bit text encoder keeps
the encode stage small. The benchmark's ``klein-*`` rows (``benchmarks/recipes.py``), the dry run
(``python -m fluxnb.fit --model klein``) and the Studio run these functions, so they measure one flow.

``Flux2KleinPipeline.__call__``'s first positional argument is ``image`` (image editing): every call
here passes ``prompt_embeds=`` by name.
"""

from __future__ import annotations

from typing import Any

import torch

from fluxnb.errors import check_generation_request, check_part, check_prompt
from fluxnb.exceptions import FluxnbError
from fluxnb.memory import StepTimer
from fluxnb.stages import NonFiniteLatentsError, execution_device

MODEL_ID = "black-forest-labs/FLUX.2-klein-4B"
QUANTS = (None, "nf4")  # None: the compute dtype; "nf4": bitsandbytes 4-bit NF4


def _check_quant(quant: str | None) -> None:
    if quant not in QUANTS:
        raise ValueError(f"quant must be None (the compute dtype) or 'nf4', not {quant!r}")


def load_text_encoder(checkpoint: str, dtype: torch.dtype, quant: str | None = None) -> Any:
    """A ``Flux2KleinPipeline`` holding only Qwen3 and its tokenizer: enough to encode prompts.

    ``quant``: None loads Qwen3 in ``dtype`` (8 GB in half precision) and moves it to the GPU; ``"nf4"``
    quantizes it to 4 bits while loading (transformers' ``BitsAndBytesConfig``, about 2.5 GB), computing
    in ``dtype``; bitsandbytes places it on the GPU as it loads.
    """
    from diffusers import Flux2KleinPipeline
    from transformers import BitsAndBytesConfig, Qwen3ForCausalLM

    _check_quant(quant)
    check_part(checkpoint, "text_encoder")  # a damaged folder stops here, named
    if quant == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        text_encoder = Qwen3ForCausalLM.from_pretrained(checkpoint, subfolder="text_encoder", quantization_config=config,
                                                        dtype=dtype, use_safetensors=True)
    else:
        text_encoder = Qwen3ForCausalLM.from_pretrained(checkpoint, subfolder="text_encoder", dtype=dtype,
                                                        use_safetensors=True).to(execution_device())
    return Flux2KleinPipeline.from_pretrained(checkpoint, text_encoder=text_encoder, transformer=None, vae=None,
                                              dtype=dtype, use_safetensors=True)


def encode_prompt(pipe: Any, prompt: str, max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
    """Qwen3's embeddings of ``prompt`` (three hidden layers side by side), as ``{"prompt_embeds": ...}``.

    The pipeline makes the text positions (``text_ids``) again from the embeddings when it denoises,
    so only the embeddings are kept.
    """
    check_prompt(prompt)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device,
                                              max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds.detach()}


def load_transformer(checkpoint: str, dtype: torch.dtype, quant: str | None = None) -> Any:
    """klein's ``Flux2Transformer2DModel``: in ``dtype`` on the GPU (None), or NF4 (``"nf4"``, diffusers'
    ``BitsAndBytesConfig``, quantized while loading and placed on the GPU by bitsandbytes)."""
    from diffusers import BitsAndBytesConfig, Flux2Transformer2DModel

    _check_quant(quant)
    check_part(checkpoint, "transformer")
    if quant == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return Flux2Transformer2DModel.from_pretrained(checkpoint, subfolder="transformer", quantization_config=config,
                                                       dtype=dtype, use_safetensors=True)
    return Flux2Transformer2DModel.from_pretrained(checkpoint, subfolder="transformer", dtype=dtype,
                                                   use_safetensors=True).to(execution_device())


def load_denoising_pipeline(checkpoint: str, transformer: Any, dtype: torch.dtype) -> Any:
    """A ``Flux2KleinPipeline`` with the given transformer and the VAE, and no text encoder."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    vae = AutoencoderKLFlux2.from_pretrained(checkpoint, subfolder="vae", dtype=dtype, use_safetensors=True)
    return Flux2KleinPipeline.from_pretrained(checkpoint, transformer=transformer, vae=vae.to(execution_device()),
                                              text_encoder=None, tokenizer=None, dtype=dtype, use_safetensors=True)


class KleinEmbeddingsError(FluxnbError, ValueError):
    """Embeddings that this klein transformer cannot read (made by another checkpoint's text encoder)."""


def check_embeddings(embeds: dict[str, torch.Tensor], transformer: Any) -> None:
    """Raise :class:`KleinEmbeddingsError` unless ``embeds`` has klein's ``prompt_embeds`` of the width this
    transformer reads (``joint_attention_dim``: 3 x Qwen3's hidden size)."""
    if "prompt_embeds" not in embeds:
        raise KleinEmbeddingsError(f"klein needs {{'prompt_embeds': ...}}; these embeddings have {sorted(embeds)}")
    width, expected = embeds["prompt_embeds"].shape[-1], transformer.config.joint_attention_dim
    if width != expected:
        raise KleinEmbeddingsError(f"The embeddings are {width} wide; this transformer reads {expected}: they were "
                                   "made by another checkpoint's text encoder. Encode the prompt again with this one.")


def denoise(pipe: Any, embeds: dict[str, torch.Tensor], height: int, width: int, steps: int,
            guidance: float, seed: int, step_timer: StepTimer | None = None) -> torch.Tensor:
    """Run the transformer from saved embeddings; return the VAE's latents (``output_type="latent"``:
    unpacked and de-normalized by the pipeline, ready for :func:`decode`).

    ``step_timer`` (a :class:`fluxnb.memory.StepTimer`) records when each step ends. The noise is made
    on the CPU from ``seed``: the same on any device.
    """
    check_generation_request(height, width, steps, guidance, seed=seed)
    check_embeddings(embeds, pipe.transformer)
    device = pipe._execution_device
    latents = pipe(
        prompt_embeds=embeds["prompt_embeds"].to(device, pipe.transformer.dtype),
        height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
        callback_on_step_end=step_timer,
    ).images
    if not torch.isfinite(latents).all():
        raise NonFiniteLatentsError(f"The latents contain NaN/inf after {steps} steps in {pipe.transformer.dtype}. "
                                    "Check the embeddings are finite first (on a T4: encode with the 4-bit Qwen3 "
                                    "computing in torch.float32); on a GPU with bf16, compute in torch.bfloat16.")
    return latents


def decode(vae: Any, latents: torch.Tensor) -> Any:
    """Decode :func:`denoise`'s latents with the FLUX.2 VAE to a PIL image."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    if not torch.isfinite(pixels).all():
        raise NonFiniteLatentsError("The VAE produced NaN/inf: decode in float32 (vae.to(torch.float32)).")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return Flux2ImageProcessor(vae_scale_factor=scale * 2).postprocess(pixels, output_type="pil")[0]
