"""FLUX.1 all in bf16, every model resident on one big GPU: the plain diffusers recipe (notebook 04's baseline).

Nothing is quantized, nothing moves: the fastest way when the GPU holds it all, and the reference the
small-GPU recipes are compared with. Its measured peak on an H100 (benchmarks/results/h100.json,
recipe bf16-resident) is NEED_GIB below; a smaller GPU is refused before anything loads.

    python recipes/all_resident_bf16.py --prompt "A cat holding a sign that says hello world" --out images

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


RECIPE = "all-resident-bf16"
MODEL_ID = "black-forest-labs/FLUX.1-dev"
NEED_GIB = 37  # peak VRAM at 1024x1024, rounded up (benchmarks/results/h100.json, tests/test_recipes.py checks it)
DTYPE = torch.bfloat16
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


def stop_if_not_finite(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
    """After each denoising step (``callback_on_step_end``): stop at once, exit status 1, if the latents hold
    NaN/inf, rather than denoise on and decode them into a black image."""
    if not torch.isfinite(callback_kwargs["latents"]).all():
        raise SystemExit(f"The latents contain NaN/inf after step {step + 1}, so nothing was decoded: bf16 does not "
                         "overflow as fp16 does, so check the checkpoint's weights (download them again if in doubt).")
    return callback_kwargs


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        if not torch.cuda.is_bf16_supported() or (total < NEED_GIB and args.checkpoint != "tiny"):
            raise SystemExit(f"This recipe needs bf16 and about {NEED_GIB} GiB of VRAM; this GPU has {total:.1f} GiB"
                             f"{'' if torch.cuda.is_bf16_supported() else ' and no bf16'}. Use "
                             "recipes/card_8gb_staged_nf4_bf16.py or recipes/t4_staged_nf4_fp16.py.")
    checkpoint = check_before_loading(args, MODEL_ID, checkpoint_path)  # bad input: one sentence, exit 2
    from diffusers import FluxPipeline  # only now: a bad argument costs a second, not diffusers' import

    start = time.perf_counter()

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=DTYPE, use_safetensors=True).to(DEVICE)
    image = pipe(
        prompt=args.prompt, max_sequence_length=args.max_sequence_length,
        height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # the same noise on any device
        callback_on_step_end=stop_if_not_finite,  # NaN/inf: stop, before the VAE decodes them
    ).images[0]
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
