"""FLUX.1-dev from a pre-quantized NF4 package: download about 13 GB instead of 34, quantize nothing.

``hf-internal-testing/flux.1-dev-nf4-pkg`` (the package diffusers' docs use) holds FLUX.1-dev's T5
and transformer already saved in NF4 by ``save_pretrained``: they load as saved, with no
quantization config. CLIP, the VAE, the tokenizers and the scheduler still come from FLUX.1-dev.
A 4-bit layer computes in the dtype it was saved with (fp16 here) unless told otherwise, so each
``Linear4bit`` gets this GPU's dtype (``set_compute_dtype``). Then the staged flow: encode, free,
denoise, free, decode.

    python recipes/prequantized_from_hub.py --prompt "A cat holding a sign that says hello world" --out images

--prequantized FOLDER_OR_ID loads another NF4 package (text_encoder_2/ and transformer/); it is checked
before loading as the checkpoint is.

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


RECIPE = "prequantized-nf4"
PREQUANTIZED = "hf-internal-testing/flux.1-dev-nf4-pkg"  # text_encoder_2/ and transformer/ in NF4
MODEL_ID = "black-forest-labs/FLUX.1-dev"
STAND_INS = ("tiny", "random-dev", "random-schnell")  # fluxnb's, for tests and rehearsals
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
DTYPE = torch.bfloat16 if BF16 else torch.float16  # a T4 has no bf16: fp16
TEXT_DTYPE = torch.float32 if DTYPE == torch.float16 else DTYPE  # T5 overflows in fp16 (notebook 01)
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
    parser.add_argument("--prequantized", default=None, help=f"NF4 package (default: {PREQUANTIZED})")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens: dev 512, schnell 256")
    return parser.parse_args()  # what FLUX can use is checked in main(), by check_before_loading


def checkpoint_path(checkpoint: str) -> str:
    """A Hub id or a folder, as given. "tiny"/"random-dev" are fluxnb's offline stand-ins (tests, rehearsals)."""
    if checkpoint not in STAND_INS:
        return checkpoint
    import fluxnb  # only for the stand-ins: delete this branch when you copy the recipe

    resolved = fluxnb.resolve_checkpoint(MODEL_ID, choice=checkpoint)  # first: before huggingface_hub is imported
    fluxnb.allow_bitsandbytes_on_cpu()  # the tiny test runs on a CPU (this imports diffusers)
    return resolved


def prequantized_path(checkpoint: str) -> str:
    """The NF4 package: the Hub's for FLUX.1-dev; fluxnb exports one for its stand-ins (tests, rehearsals)."""
    if checkpoint not in STAND_INS:
        return PREQUANTIZED
    import fluxnb  # only for the stand-ins: delete this branch when you copy the recipe

    return fluxnb.prequantized_checkpoint(MODEL_ID, DTYPE, choice=checkpoint)


def set_compute_dtype(model, dtype: torch.dtype):
    """Make every 4-bit layer compute in ``dtype`` (a saved one computes in the dtype it was saved with)."""
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.compute_dtype = dtype
    return model


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
    package = args.prequantized or (None if args.checkpoint in STAND_INS else PREQUANTIZED)  # checked too
    checkpoint = check_before_loading(args, MODEL_ID, checkpoint_path, nf4_package=package)  # bad input: exit 2
    # the libraries only now: a bad argument costs a second, not their import (and the stand-ins are resolved)
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPTextModel, T5EncoderModel

    prequantized = package or prequantized_path(args.checkpoint)  # a stand-in's: exported once by fluxnb
    start = time.perf_counter()

    # 1. encode: T5 as saved in NF4 (no quantization config), CLIP from the original; then free them
    text_encoder_2 = set_compute_dtype(T5EncoderModel.from_pretrained(
        prequantized, subfolder="text_encoder_2", dtype=TEXT_DTYPE, use_safetensors=True
    ), TEXT_DTYPE)
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

    # 2. denoise: the transformer as saved in NF4, computing in this GPU's dtype
    transformer = set_compute_dtype(FluxTransformer2DModel.from_pretrained(
        prequantized, subfolder="transformer", dtype=DTYPE, use_safetensors=True
    ), DTYPE)
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
        raise SystemExit("The latents contain NaN/inf, so nothing was decoded: on a GPU without bf16, encode the "
                         "prompt in float32 (TEXT_DTYPE).")
    del pipe, transformer
    flush()

    # 3. decode with the VAE, save the PNG with its settings
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
