"""FLUX.2 [klein] 4B on a free Colab T4, in fp16, one model at a time (notebook 12 as one script).

A T4 has 15 GB of VRAM, no bf16 and about 12.7 GB of host RAM. klein's Qwen3 text encoder and its
transformer each take about 8 GB in fp16: each fits the T4 alone, not both at once, so they take turns:

1. the Qwen3 text encoder (fp16) encodes the prompt, then is freed;
2. the transformer (fp16, unquantized) and the small VAE denoise 4 steps to latents; the transformer is freed;
3. the VAE decodes the latents; the PNG keeps its settings in its metadata and never overwrites a file.

    python recipes/t4_flux2_klein_fp16.py --prompt "A cat holding a sign that says hello world" --out images

FLUX.2-klein-4B is Apache-2.0 and not gated: no token needed. It is step-distilled: 4 steps, guidance 1.0.
On an 8 GB card the fp16 weights do not fit: load both in NF4 as notebook 12 shows.

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

RECIPE = "klein-fp16"
MODEL_ID = "black-forest-labs/FLUX.2-klein-4B"
DTYPE = torch.float16  # a T4 has no bf16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="A cat holding a sign that says hello world")
    parser.add_argument("--out", type=Path, default=Path("images"), help="folder for the PNG (never overwritten)")
    parser.add_argument("--checkpoint", default=MODEL_ID, help="Hub id or folder (tiny/random-klein: fluxnb's stand-ins)")
    parser.add_argument("--steps", type=int, default=4, help="klein is distilled for 4")
    parser.add_argument("--guidance", type=float, default=1.0, help="klein is distilled: above 1 is ignored")
    parser.add_argument("--height", type=int, default=1024, help="a multiple of 16")
    parser.add_argument("--width", type=int, default=1024, help="a multiple of 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512, help="Qwen3 tokens, at most 512")
    return parser.parse_args()  # what FLUX can use is checked in main(), by check_before_loading


def checkpoint_path(checkpoint: str) -> str:
    """A Hub id or a folder, as given. "tiny"/"random-klein" are fluxnb's offline stand-ins (tests, rehearsals)."""
    if checkpoint not in ("tiny", "random-klein", "random-dev"):
        return checkpoint
    import fluxnb  # only for the stand-ins: delete this branch when you copy the recipe

    return fluxnb.resolve_checkpoint(MODEL_ID, choice=checkpoint)  # before huggingface_hub is imported


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
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    start = time.perf_counter()

    # 1. encode the prompt: the Qwen3 text encoder alone, in fp16, then free it
    pipe = Flux2KleinPipeline.from_pretrained(
        checkpoint, transformer=None, vae=None, dtype=DTYPE, use_safetensors=True
    ).to(DEVICE)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompt=args.prompt, device=DEVICE, max_sequence_length=args.max_sequence_length)
    if not torch.isfinite(prompt_embeds).all():  # exit status 1, before the transformer loads
        raise SystemExit("The prompt embeddings contain NaN/inf (Qwen3 overflowed fp16): load it in NF4 computing "
                         "in float32 (notebook 12, exercise 1), or use a GPU with bf16.")
    prompt_embeds = prompt_embeds.cpu()
    del pipe
    flush()

    # 2. denoise: the transformer in fp16 and the VAE (the pipeline's last lines use its batch-norm statistics)
    transformer = Flux2Transformer2DModel.from_pretrained(checkpoint, subfolder="transformer", dtype=DTYPE, use_safetensors=True)
    vae = AutoencoderKLFlux2.from_pretrained(checkpoint, subfolder="vae", dtype=DTYPE, use_safetensors=True)
    pipe = Flux2KleinPipeline.from_pretrained(
        checkpoint, transformer=transformer.to(DEVICE), vae=vae.to(DEVICE), text_encoder=None, tokenizer=None,
        dtype=DTYPE, use_safetensors=True,
    )
    latents = pipe(  # every argument by name: the first positional one is `image`, for editing
        prompt_embeds=prompt_embeds.to(DEVICE, DTYPE),
        height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # the same noise on any device
        output_type="latent",
    ).images
    if not torch.isfinite(latents).all():  # exit status 1, before the VAE decodes noise
        raise SystemExit("The latents contain NaN/inf, so nothing was decoded: check the prompt embeddings, "
                         "or use a GPU with bf16 and DTYPE = torch.bfloat16.")
    image_processor = pipe.image_processor
    del pipe, transformer
    flush()

    # 3. decode with the VAE (fp16), save the PNG with its settings
    with torch.no_grad():
        pixels = vae.decode(latents.to(DEVICE, DTYPE), return_dict=False)[0]
    image = image_processor.postprocess(pixels, output_type="pil")[0]
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
