"""FLUX.1 with model CPU offload: each model waits in host RAM and visits the GPU only while it runs.

Notebook 04's third recipe. The prompt is encoded first by the NF4 T5 and CLIP (as in the staged
recipe), and freed; then one pipeline holds the NF4 transformer and the VAE with
``enable_model_cpu_offload()``: the transformer moves to the GPU for the denoising steps, then back, and the
VAE moves in to decode. Peak VRAM is about the largest model plus its activations; host RAM must
hold the models while they wait. bf16 where the GPU has it, else fp16 (a T4).

    python recipes/model_cpu_offload.py --prompt "A cat holding a sign that says hello world" --out images

On a machine without a GPU there is nothing to offload to: the script says so and runs on the CPU.

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


RECIPE = "nf4-model-cpu-offload"
MODEL_ID = "black-forest-labs/FLUX.1-dev"
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
        raise SystemExit(f"The latents contain NaN/inf after step {step + 1}, so nothing was decoded: in fp16 (a T4) "
                         "the transformer can overflow; use a GPU with bf16, or check that the prompt embeddings "
                         "are finite.")
    return callback_kwargs


def main() -> None:
    args = parse_args()
    checkpoint = check_before_loading(args, MODEL_ID, checkpoint_path)  # bad input: one sentence, exit 2
    # the libraries only now: a bad argument costs a second, not their import (and the stand-ins are resolved)
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig
    from transformers import BitsAndBytesConfig, CLIPTextModel, T5EncoderModel

    start = time.perf_counter()

    # 1. encode the prompt: T5 in NF4 and CLIP, then free them (as in the staged recipe)
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

    # 2. the NF4 transformer and the VAE in one pipeline, offloaded: each on the GPU only while it runs
    config = DiffusersBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE)
    transformer = FluxTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", quantization_config=config, dtype=DTYPE, use_safetensors=True
    )
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", dtype=DTYPE, use_safetensors=True)
    pipe = FluxPipeline.from_pretrained(
        checkpoint, transformer=transformer, vae=vae, text_encoder=None, text_encoder_2=None,
        tokenizer=None, tokenizer_2=None, dtype=DTYPE, use_safetensors=True,
    )
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    else:
        print("No GPU: model CPU offload does not apply (everything already runs from host RAM).")
    image = pipe(
        prompt_embeds=prompt_embeds.to(DEVICE, DTYPE), pooled_prompt_embeds=pooled_prompt_embeds.to(DEVICE, DTYPE),
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
