"""FLUX.1 on a free Colab T4: the staged NF4 recipe in fp16 (notebooks 01-03 as one script).

A T4 has 15 GB of VRAM, no bf16 and about 12.7 GB of host RAM, so one big model is on the GPU at a time:

1. T5-XXL in NF4 (4 bits) and CLIP encode the prompt in float32 (T5 overflows in fp16), then are freed;
2. the transformer in NF4, computing in fp16, denoises to latents, then is freed;
3. the VAE decodes the latents; the PNG keeps its settings in its metadata and never overwrites a file.

    python recipes/t4_staged_nf4_fp16.py --prompt "A cat holding a sign that says hello world" --out images

FLUX.1-dev is gated: accept its licence on huggingface.co and set HF_TOKEN (or use
--checkpoint black-forest-labs/FLUX.1-schnell --steps 4 --guidance 0 --max-sequence-length 256).

Before anything loads, fluxnb's checks (fluxnb/recipe_checks.py) answer bad input -- settings, an --out
that cannot be written, a checkpoint that is missing, gated without a token or too big for the disk --
in one sentence, exit status 2. An image that cannot be saved in --out at the end is kept in the current
folder (else the temp folder) and a line says where: exit status 1, as for NaN/inf latents.
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation (notebook 04)
import torch  # after PYTORCH_CUDA_ALLOC_CONF: the allocator reads it when CUDA starts
from PIL import PngImagePlugin

from fluxnb.recipe_checks import check_before_loading, save_or_keep  # this repository's checks (pip install -e .)

RECIPE = "t4-staged-nf4-fp16"
MODEL_ID = "black-forest-labs/FLUX.1-dev"
DTYPE = torch.float16  # a T4 has no bf16
TEXT_DTYPE = torch.float32  # T5 overflows in fp16: encode in float32 (notebook 01)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="A cat holding a sign that says hello world")
    parser.add_argument("--out", type=Path, default=Path("images"), help="folder for the PNG (never overwritten)")
    parser.add_argument("--checkpoint", default=MODEL_ID, help="Hub id or folder (tiny/random-dev: fluxnb's stand-ins)")
    parser.add_argument("--steps", type=int, default=50, help="dev: about 28-50, schnell: 4")
    parser.add_argument("--guidance", type=float, default=3.5, help="dev: 3.5, schnell: 0")
    parser.add_argument("--height", type=int, default=1024, help="a multiple of 16")
    parser.add_argument("--width", type=int, default=1024, help="a multiple of 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens: dev 512, schnell 256")
    return parser.parse_args()  # what FLUX can use is checked in main(), by check_before_loading


def checkpoint_path(checkpoint: str) -> str:
    """A Hub id or a folder, as given. "tiny"/"random-dev" are fluxnb's offline stand-ins (tests, rehearsals)."""
    if checkpoint not in ("tiny", "random-dev", "random-schnell"):
        return checkpoint
    import fluxnb  # only for the stand-ins: delete this branch when you copy the recipe

    resolved = fluxnb.resolve_checkpoint(MODEL_ID, choice=checkpoint)  # first: before huggingface_hub is imported
    fluxnb.allow_bitsandbytes_on_cpu()  # the tiny test runs on a CPU (this imports diffusers)
    return resolved


def flush() -> None:
    """Free what was deleted: Python's garbage, then PyTorch's cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_png(image, folder: Path, settings: dict) -> Path:
    """Save ``image`` with ``settings`` in its PNG metadata as image-0001.png, -0002, ...: never overwrites,
    and a write that fails (a full disk) leaves no half PNG behind."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    n = len(list(folder.glob("image-*.png"))) + 1
    while True:
        path = folder / f"image-{n:04d}.png"
        try:
            f = open(path, "xb")  # "x": fail rather than overwrite
        except FileExistsError:
            n += 1
            continue
        try:
            with f:
                image.save(f, format="PNG", pnginfo=info)
        except BaseException:
            path.unlink(missing_ok=True)  # ours, cut off (a full disk): no half PNG is left behind
            raise
        return path


def main() -> None:
    args = parse_args()
    checkpoint = check_before_loading(args, MODEL_ID, checkpoint_path)  # bad input: one sentence, exit 2
    # the libraries only now: a bad argument costs a second, not their import (and the stand-ins are resolved)
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from diffusers.image_processor import VaeImageProcessor
    from transformers import BitsAndBytesConfig, CLIPTextModel, T5EncoderModel

    start = time.perf_counter()

    # 1. encode the prompt: T5 in NF4 and CLIP, in float32, then free them
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=TEXT_DTYPE)
    text_encoder_2 = T5EncoderModel.from_pretrained(
        checkpoint, subfolder="text_encoder_2", quantization_config=nf4, dtype=TEXT_DTYPE, use_safetensors=True
    )
    text_encoder = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder", dtype=TEXT_DTYPE, use_safetensors=True)
    pipe = FluxPipeline.from_pretrained(
        checkpoint, text_encoder=text_encoder.to(DEVICE), text_encoder_2=text_encoder_2,
        transformer=None, vae=None, dtype=TEXT_DTYPE, use_safetensors=True,
    )
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=args.prompt, prompt_2=None, max_sequence_length=args.max_sequence_length
        )
    del pipe, text_encoder, text_encoder_2
    flush()

    # 2. denoise: the transformer in NF4, computing in fp16, and nothing else on the GPU
    config = DiffusersBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE)
    transformer = FluxTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", quantization_config=config, dtype=DTYPE, use_safetensors=True
    )
    pipe = FluxPipeline.from_pretrained(
        checkpoint, transformer=transformer, vae=None, text_encoder=None, text_encoder_2=None,
        tokenizer=None, tokenizer_2=None, dtype=DTYPE, use_safetensors=True,
    )
    latents = pipe(
        prompt_embeds=prompt_embeds.to(DEVICE, DTYPE), pooled_prompt_embeds=pooled_prompt_embeds.to(DEVICE, DTYPE),
        height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # the same noise on any device
        output_type="latent",
    ).images
    if not torch.isfinite(latents).all():  # exit status 1, before the VAE decodes noise
        raise SystemExit("The latents contain NaN/inf (fp16 overflowed), so nothing was decoded: encode the prompt "
                         "in float32 (TEXT_DTYPE), or use a GPU with bf16 and DTYPE = torch.bfloat16.")
    del pipe, transformer
    flush()

    # 3. decode with the VAE (fp16), save the PNG with its settings
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", dtype=DTYPE, use_safetensors=True).to(DEVICE)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = FluxPipeline._unpack_latents(latents, args.height, args.width, scale)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        pixels = vae.decode(latents.to(DEVICE, DTYPE), return_dict=False)[0]
    image = VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(pixels, output_type="pil")[0]
    settings = dict(recipe=RECIPE, prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    height=args.height, width=args.width, checkpoint=args.checkpoint, dtype=DTYPE)
    path = save_or_keep(save_png, image, args.out, settings)  # --out failing now: kept in . or the temp folder
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps(dict(settings, dtype=str(DTYPE), image=str(path), seconds=round(time.perf_counter() - start, 1),
                          peak_vram_allocated_gib=peak and round(peak, 2))))
    if path.parent != args.out:
        raise SystemExit(1)  # not where --out asked: save_or_keep said where it is


if __name__ == "__main__":
    main()
