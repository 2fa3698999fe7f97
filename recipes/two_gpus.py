"""FLUX.1 in bf16/fp16 split over two GPUs (Kaggle's 2x T4, two consumer cards): no quantization.

Two GPUs of 15 GB hold what one cannot, if each model is split across them (diffusers' "model
sharding" guide):

1. the text encoders with ``device_map="balanced"`` (T5 on one GPU, CLIP on the other), encode, free;
2. the transformer with ``device_map="auto"`` and ``max_memory`` per GPU: diffusers balances it (about
   half of its blocks per GPU, within ``max_memory``; accelerate's ``get_balanced_memory``), then fills
   GPU 0 and GPU 1 in order; the activations pass from one to the other;
3. the VAE on GPU 0 decodes.

bf16 where the GPUs have it, else fp16 with the text encoders in float32 (a T4; T5 overflows in fp16).

    python recipes/two_gpus.py --prompt "A cat holding a sign that says hello world" --out images

With fewer than two GPUs it stops at once and says so (exit code 1): nothing is loaded.

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


RECIPE = "two-gpus"
MODEL_ID = "black-forest-labs/FLUX.1-dev"
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
DTYPE = torch.bfloat16 if BF16 else torch.float16  # a T4 has no bf16: fp16
TEXT_DTYPE = torch.float32 if DTYPE == torch.float16 else DTYPE  # T5 overflows in fp16 (notebook 01)


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
    parser.add_argument("--headroom-gib", type=float, default=3.0,
                        help="VRAM kept free on each GPU for activations (max_memory = total - this)")
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
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"This recipe splits FLUX.1 over two GPUs and this machine has {torch.cuda.device_count()}: "
                         "skipped, nothing was loaded. One GPU: recipes/t4_staged_nf4_fp16.py (15 GB) or "
                         "recipes/card_8gb_staged_nf4_bf16.py (8 GB).")
    checkpoint = check_before_loading(args, MODEL_ID, checkpoint_path)  # bad input: one sentence, exit 2
    # the libraries only now: a bad argument costs a second, not their import (and the stand-ins are resolved)
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers.image_processor import VaeImageProcessor

    max_memory = {i: f"{torch.cuda.get_device_properties(i).total_memory / 2**30 - args.headroom_gib:.1f}GiB"
                  for i in range(2)}
    start = time.perf_counter()

    # 1. the text encoders spread over both GPUs, encode, free
    pipe = FluxPipeline.from_pretrained(
        checkpoint, transformer=None, vae=None, device_map="balanced", max_memory=max_memory,
        dtype=TEXT_DTYPE, use_safetensors=True,
    )
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=args.prompt, prompt_2=None, max_sequence_length=args.max_sequence_length
        )
    del pipe
    flush()

    # 2. the transformer split over both GPUs, denoise, free
    transformer = FluxTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", device_map="auto", max_memory=max_memory, dtype=DTYPE,
        use_safetensors=True,
    )
    print("transformer.hf_device_map entries (blocks or whole block lists) per GPU:",
          {d: list(transformer.hf_device_map.values()).count(d) for d in sorted(set(transformer.hf_device_map.values()), key=str)})
    pipe = FluxPipeline.from_pretrained(
        checkpoint, transformer=transformer, vae=None, text_encoder=None, text_encoder_2=None,
        tokenizer=None, tokenizer_2=None, dtype=DTYPE, use_safetensors=True,
    )
    latents = pipe(
        prompt_embeds=prompt_embeds.to("cuda:0", DTYPE), pooled_prompt_embeds=pooled_prompt_embeds.to("cuda:0", DTYPE),
        height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # the same noise on any device
        output_type="latent",
    ).images
    if not torch.isfinite(latents).all():  # exit status 1, before the VAE decodes noise
        raise SystemExit("The latents contain NaN/inf (fp16 overflowed), so nothing was decoded: encode the prompt "
                         "in float32 (TEXT_DTYPE), or use GPUs with bf16.")
    del pipe, transformer
    flush()

    # 3. decode on GPU 0, save the PNG with its settings
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", dtype=DTYPE, use_safetensors=True).to("cuda:0")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = FluxPipeline._unpack_latents(latents, args.height, args.width, scale)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        pixels = vae.decode(latents.to("cuda:0", DTYPE), return_dict=False)[0]
    image = VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(pixels, output_type="pil")[0]
    settings = dict(recipe=RECIPE, prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    height=args.height, width=args.width, checkpoint=args.checkpoint, dtype=DTYPE)
    path = save_or_keep(save_png, image, args.out, settings)  # --out failing now: kept in . or the temp folder
    peaks = [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(2)]
    print(json.dumps(dict(settings, dtype=str(DTYPE), image=str(path), seconds=round(time.perf_counter() - start, 1),
                          peak_vram_allocated_gib=max(peaks), peak_vram_allocated_gib_per_gpu=peaks)))
    if path.parent != args.out:
        raise SystemExit(1)  # not where --out asked: save_or_keep said where it is


if __name__ == "__main__":
    main()
