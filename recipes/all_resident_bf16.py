"""FLUX.1 all in bf16, every model resident on one big GPU: the plain diffusers recipe (notebook 04's baseline).

Nothing is quantized, nothing moves: the fastest way when the GPU holds it all, and the reference the
small-GPU recipes are compared with. Its measured peak on an H100 (benchmarks/results/h100.json,
recipe bf16-resident) is NEED_GIB below; a smaller GPU is refused before anything loads.

    python recipes/all_resident_bf16.py --prompt "A cat holding a sign that says hello world" --out images
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation (notebook 04)
import torch  # after PYTORCH_CUDA_ALLOC_CONF: the allocator reads it when CUDA starts
from diffusers import FluxPipeline
from PIL import PngImagePlugin


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
    args = parser.parse_args()
    if args.height % 16 or args.width % 16 or min(args.height, args.width) <= 0:
        parser.error(f"--height {args.height} --width {args.width}: both must be positive multiples of 16")
    return args


def checkpoint_path(checkpoint: str) -> str:
    """A Hub id or a folder, as given. "tiny"/"random-dev" are fluxnb's offline stand-ins (tests, rehearsals)."""
    if checkpoint not in ("tiny", "random-dev", "random-schnell"):
        return checkpoint
    import fluxnb  # only for the stand-ins: delete this branch when you copy the recipe

    fluxnb.allow_bitsandbytes_on_cpu()  # the tiny test runs on a CPU
    return fluxnb.resolve_checkpoint(MODEL_ID, choice=checkpoint)


def flush() -> None:
    """Free what was deleted: Python's garbage, then PyTorch's cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_png(image, folder: Path, settings: dict) -> Path:
    """Save ``image`` with ``settings`` in its PNG metadata as image-0001.png, -0002, ...: never overwrites."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    n = len(list(folder.glob("image-*.png"))) + 1
    while True:
        path = folder / f"image-{n:04d}.png"
        try:
            with open(path, "xb") as f:  # "x": fail rather than overwrite
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            n += 1


def main() -> None:
    args = parse_args()
    checkpoint = checkpoint_path(args.checkpoint)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        if not torch.cuda.is_bf16_supported() or (total < NEED_GIB and args.checkpoint != "tiny"):
            raise SystemExit(f"This recipe needs bf16 and about {NEED_GIB} GiB of VRAM; this GPU has {total:.1f} GiB"
                             f"{'' if torch.cuda.is_bf16_supported() else ' and no bf16'}. Use "
                             "recipes/card_8gb_staged_nf4_bf16.py or recipes/t4_staged_nf4_fp16.py.")
    start = time.perf_counter()

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=DTYPE, use_safetensors=True).to(DEVICE)
    image = pipe(
        prompt=args.prompt, max_sequence_length=args.max_sequence_length,
        height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),  # the same noise on any device
    ).images[0]
    settings = dict(recipe=RECIPE, prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    height=args.height, width=args.width, checkpoint=args.checkpoint, dtype=DTYPE)
    path = save_png(image, args.out, settings)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps(dict(settings, dtype=str(DTYPE), image=str(path), seconds=round(time.perf_counter() - start, 1),
                          peak_vram_allocated_gib=peak and round(peak, 2))))


if __name__ == "__main__":
    main()
