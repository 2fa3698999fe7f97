"""The Studio: a small ipywidgets app around the course's staged recipe (notebooks 03 and 11).

A form (prompt, seed or "random", steps, guidance, width and height, number of images), a progress
bar per denoising step, a gallery, a Stop button, a live VRAM/RAM readout, and a button that shows the
Python code that makes the selected image again. Every image is a PNG that carries its settings
(``fluxnb.save_image``: numbered, never overwritten).

It only calls the functions the notebooks teach (:mod:`fluxnb.stages`), and loads each model once:

* the **denoiser** (the 4-bit transformer and the VAE) loads on the first click and stays; where a
  step, or the VAE's decode that follows it, does not fit next to all of the transformer's blocks (an
  8 GB card at 1024x1024), enough blocks stream from host RAM (:func:`fluxnb.blocks_to_keep`, as in
  notebooks 03 and 08), and where even that is not enough (very large images) the VAE decodes in
  tiles (:func:`plan_room`). A size that cannot be made at all is refused before anything loads;
* the **text encoders** (CLIP and the 4-bit T5) are needed only for a prompt not seen before. Each
  prompt's embeddings are kept (in memory, and on disk where notebook 03's ``encode_and_save`` finds
  them), so a new seed, size or step count never runs T5 again. Whether the encoders stay loaded
  next to the denoiser is decided by memory (``keep_text_encoders``): on a CPU, or on a GPU whose free
  VRAM holds both models' weights plus what a step and a decode need (:mod:`fluxnb.capacity`), they
  stay (a new prompt costs one T5 forward pass); otherwise the Studio runs the course's staged flow
  (T5 is freed before the transformer loads), and a *new* prompt costs freeing the denoiser, encoding,
  and loading it again.

FLUX.2 [klein] 4B (``model_id="black-forest-labs/FLUX.2-klein-4B"``, notebook 12) runs its own staged flow
(:mod:`fluxnb.klein`) with its settings: 4 steps, guidance fixed at 1.0 (the field is greyed out: the model is
step-distilled). Qwen3 loads in 4-bit NF4; the transformer in the compute dtype where its weights and a step
fit the free VRAM (a T4), else in NF4 (:func:`klein_transformer_quant`); on a GPU Qwen3 is freed before the
transformer loads (the staged flow: a new prompt reloads the transformer) unless ``keep_text_encoders=True``.
Block streaming and tiled decodes are FLUX.1's (its capacity model): klein's images use neither.

The logic is testable without a browser: :meth:`Studio.generate` does one generation with the form's
values (or explicit ones) and returns a :class:`Generation`; the Generate button runs the same
method in a thread, so the kernel stays free to receive the Stop button's click.
"""

from __future__ import annotations

import io
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxnb import capacity, klein, planner, stages, streaming
from fluxnb.checkpoints import family_of, generation_settings, is_stand_in, parameter_counts, variant_of
from fluxnb.environment import available_ram_gib, bf16_supported, free_vram_gib
from fluxnb.errors import MAX_SEED, FluxnbError, check_generation_request, check_prompt
from fluxnb.exceptions import BadSettingError
from fluxnb.memory import GIB, StepTimer, anon_ram_bytes, device_used_bytes, flush

MAX_IMAGES = 8  # per click: each image is a full generation
RANDOM_SEEDS = 2**32  # 'random seed' draws below this: torch takes 64 bits, 32 keep a seed short to copy
ENCODER_PARTS = ("text_encoder", "text_encoder_2")
DENOISER_PARTS = ("transformer", "vae")


@dataclass
class Request:
    """One click's settings, validated: what :meth:`Studio.generate` makes."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    count: int = 1


@dataclass
class Generation:
    """What one call of :meth:`Studio.generate` made."""

    request: Request
    paths: list[Path] = field(default_factory=list)  # one PNG per finished image
    seeds: list[int] = field(default_factory=list)
    stopped: bool = False  # Stop was pressed: the image being denoised was dropped, nothing after it ran
    seconds: float = 0.0


def validate_request(prompt: Any, seed: Any, steps: Any, guidance: Any, height: Any, width: Any,
                     count: Any = 1) -> Request:
    """Check a form's values and return them as a :class:`Request`; :class:`BadSettingError` (a
    ``ValueError``) says what to change.

    The prompt, seed, sizes, steps and guidance go through :func:`fluxnb.check_generation_request`, the
    check every notebook helper runs, so a mistake gets the same message here and there; only the
    number of images is the Studio's own setting.
    """
    check_prompt(prompt)  # a form always has a prompt: None is an empty field, not "not given"
    check_generation_request(height, width, steps, guidance, seed=seed)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES:
        raise BadSettingError(f"number of images={count!r} must be a whole number from 1 to {MAX_IMAGES}: each image "
                              "is a full generation; click Generate again for more.")
    if seed + count - 1 > MAX_SEED:  # image k uses seed + k
        raise BadSettingError(f"seed={seed} with {count} images would go past the largest seed, {MAX_SEED}: "
                              f"use a seed of at most {MAX_SEED - count + 1}.")
    return Request(prompt.strip(), seed, steps, float(guidance), height, width, count)


def memory_readout() -> str:
    """One line: the GPU's memory in use (CUDA context included) and this process's host RAM."""
    ram = f"RAM {anon_ram_bytes() / GIB:.2f} GiB used by this kernel, {available_ram_gib():.1f} GiB available"
    used = device_used_bytes()
    if used is None:
        gpu = "no GPU in use" if not torch.cuda.is_available() else "GPU not used yet"
        return f"{gpu} · {ram}"
    return f"VRAM {used / GIB:.2f} GiB in use, {free_vram_gib():.2f} GiB free · {ram}"


def weights_gib(checkpoint: str, prequantized: str | None) -> dict[str, float]:
    """GiB of safetensors weights per model part that the Studio loads (from the files, before loading)."""
    from fluxnb.prequantized import download_plan

    sizes = dict.fromkeys(ENCODER_PARTS + DENOISER_PARTS, 0.0)
    for item in download_plan(checkpoint, prequantized):
        part = item.path.split("/")[0]
        if part in sizes and item.path.endswith(".safetensors"):
            sizes[part] += item.size / GIB
    return sizes


def activations_gib(height: int, width: int) -> float:
    """What a ``height`` x ``width`` image needs beyond the weights: its step or its decode, whichever is
    more (:mod:`fluxnb.capacity`, from the committed measurements)."""
    return max(capacity.step_bytes(height, width), capacity.decode_bytes(height, width)) / GIB


def both_models_fit(checkpoint: str, prequantized: str | None, height: int = 1024,
                    width: int = 1024) -> tuple[bool, str]:
    """Whether the text encoders can stay loaded next to the denoiser, and a sentence saying why.

    On a CPU they stay (host RAM holds both). On a GPU they stay if its free VRAM now holds every
    part's weights (their file sizes) plus what a ``height`` x ``width`` step and decode need
    (:func:`activations_gib`); else the staged flow.
    """
    if not torch.cuda.is_available():
        return True, "No GPU: the text encoders stay loaded in host RAM next to the denoiser."
    weights = sum(weights_gib(checkpoint, prequantized).values())
    free = free_vram_gib() or 0.0
    extra = activations_gib(height, width)
    if free >= weights + extra:
        return True, (f"Both models' weights ({weights:.1f} GiB) plus {extra:.1f} GiB for a {width}x{height} step and "
                      f"decode fit in the {free:.1f} GiB of free VRAM: the text encoders stay loaded.")
    return False, (f"Both models' weights ({weights:.1f} GiB) plus {extra:.1f} GiB for a {width}x{height} step and "
                   f"decode do not fit in the {free:.1f} GiB of free VRAM: T5 is freed before the transformer loads "
                   "(the staged flow), and a new prompt reloads the transformer.")


class SizeDoesNotFitError(FluxnbError, ValueError):
    """The Studio cannot make an image of this size on this GPU, even streaming every block and
    decoding in tiles; the message says which size it can make."""


@dataclass(frozen=True)
class Room:
    """How the Studio makes room for one size: blocks kept on the GPU (None: all), and a tiled decode."""

    resident_blocks: int | None
    tiled_decode: bool

    def sentence(self, total_blocks: int, width: int, height: int) -> str:
        if self.resident_blocks is None and not self.tiled_decode:
            return ""
        parts = []
        if self.resident_blocks is not None:
            parts.append(f"streaming {total_blocks - self.resident_blocks} of its {total_blocks} blocks from host RAM "
                         "(notebook 08 shows how; same image, slower steps)")
        if self.tiled_decode:
            parts.append("decoding in 512-pixel tiles (vae.enable_tiling(): the seams blend, so the image differs a "
                         "little from a whole decode)")
        return (f"A {width}x{height} step and its decode do not fit next to the whole transformer on this GPU: "
                + " and ".join(parts) + ".")


def plan_room(block_sizes: list[int], n_double: int, height: int, width: int, free_bytes: int) -> Room:
    """How to make a ``height`` x ``width`` image with the denoiser loaded and ``free_bytes`` of VRAM free.

    The step and then the VAE's decode run next to the transformer (the Studio keeps it loaded), so
    what must fit beside its resident blocks is the larger of the two (:mod:`fluxnb.capacity`). First
    by streaming blocks (:func:`fluxnb.streaming.resident_blocks`: the image is the same); if even
    every block streamed leaves too little, the decode goes to tiles too. If that is not enough
    either, :class:`SizeDoesNotFitError`.
    """
    step = capacity.step_bytes(height, width)
    for tiled in (False, True):
        need = max(step, capacity.decode_bytes(height, width, tiled=tiled))
        try:
            return Room(streaming.resident_blocks(block_sizes, n_double, need, free_bytes), tiled)
        except streaming.DoesNotFit:
            continue
    raise SizeDoesNotFitError(
        f"{width}x{height} does not fit this GPU even with every transformer block streamed from host RAM and the "
        f"decode in tiles: its step needs about {step / GIB:.1f} GiB next to what stays on the GPU, and "
        f"{free_bytes / GIB:.1f} GiB are free. Choose a smaller size (the step grows with width x height).")


def check_room_before_loading(height: int, width: int, free_gib: float) -> None:
    """Before a click loads anything: can this GPU make a ``height`` x ``width`` image at all, with every
    transformer block streamed from host RAM and the decode in tiles (the least VRAM the Studio can
    use)? Else :class:`SizeDoesNotFitError` saying what it needs."""
    least = (capacity.all_streamed_resident_bytes()
             + max(capacity.step_bytes(height, width), capacity.decode_bytes(height, width, tiled=True))) / GIB
    if least > free_gib:
        raise SizeDoesNotFitError(
            f"{width}x{height} needs at least {least:.1f} GiB of VRAM in the Studio (every block streamed, the decode in "
            f"tiles) and this GPU has {free_gib:.1f} GiB free: choose a smaller size (the step grows with width x height).")


def klein_transformer_quant(dtype: torch.dtype, height: int, width: int) -> tuple[str | None, str]:
    """How the Studio loads FLUX.2 [klein]'s transformer, and a sentence saying why: in ``dtype`` (None) where
    its weights plus a ``height`` x ``width`` step and decode fit the free VRAM (a T4: 7.2 GiB of fp16 weights),
    else NF4 (``"nf4"``). The step is FLUX.1's (:func:`activations_gib`), which klein's smaller transformer does
    not exceed. On a CPU: ``dtype``."""
    free = free_vram_gib()
    if free is None:
        return None, "No GPU: the transformer loads in the compute dtype."
    weights = parameter_counts("klein")["transformer"] * torch.finfo(dtype).bits / 8 / GIB
    need = weights + activations_gib(height, width)
    if free >= need:
        return None, (f"The transformer in {str(dtype).removeprefix('torch.')} ({weights:.1f} GiB) and a {width}x{height} "
                      f"step fit the {free:.1f} GiB of free VRAM.")
    return "nf4", (f"The transformer in {str(dtype).removeprefix('torch.')} ({weights:.1f} GiB) and a {width}x{height} "
                   f"step need {need:.1f} GiB, more than the {free:.1f} GiB free: it loads in NF4.")


def png_settings(path: str | Path) -> dict[str, str]:
    """The settings a Studio (or notebook 03) PNG carries in its text chunks."""
    with Image.open(path) as image:
        return dict(image.text)


def _stand_in_lines(checkpoint: str, model_id: str) -> list[str]:
    """The one visible switch to a fluxnb stand-in, if ``checkpoint`` is one (else nothing): two lines that
    serve the stand-in under ``model_id`` (:mod:`fluxnb.hub`), before anything imports diffusers. The rest of
    the script is then the real model's, word for word."""
    kind = is_stand_in(checkpoint)  # a stand-in's folder, or the real id served by this kernel's stand-in Hub
    if kind is None:
        return []
    choice = "tiny" if kind == "tiny" else f"random-{variant_of(model_id)}"  # random-dev, -schnell or -klein
    return [
        f"# This image came from fluxnb's {choice!r} stand-in (random weights, not the real model), served under the",
        "# real model's id by a Hub on this machine. For the real model delete the next two lines.",
        "import fluxnb",
        f"fluxnb.resolve_checkpoint({model_id!r}, choice={choice!r})  # before diffusers is imported",
    ]


def reproduction_code(path: str | Path) -> str:
    """A standalone diffusers script that makes the image at ``path`` again, from its PNG metadata alone.

    It is the staged flow of notebooks 01-03 written with diffusers, transformers and bitsandbytes only
    (``recipes/prequantized_from_hub.py`` as one block), so it can be copied out of the course. fluxnb
    appears only where the image needed it: the switch to a stand-in, and the course's block streamer
    on a GPU too small to hold the whole transformer next to its step (notebook 08)."""
    s = png_settings(path)
    missing = [k for k in ("prompt", "seed", "steps", "guidance", "height", "width", "checkpoint", "dtype",
                           "text_dtype", "max_sequence_length", "prequantized") if k not in s]
    if missing:
        raise BadSettingError(f"{path} has no {', '.join(missing)} in its metadata: it was not saved by the Studio, "
                         "so its settings cannot be read back.")
    from fluxnb.prequantized import PREQUANTIZED_REPOS

    real_model = s.get("model_id", "black-forest-labs/FLUX.1-dev")
    if family_of(real_model) == "klein":
        return klein_reproduction_code(path, s)
    stand_in = _stand_in_lines(s["checkpoint"], real_model)
    prequantized = None if s["prequantized"] == "None" else s["prequantized"]
    source = s.get("transformer_source", s["prequantized"])
    source = None if source == "None" else source
    model_id = s["checkpoint"]
    if stand_in:  # the script names the real model and its package; the stand-in lines serve both
        model_id = real_model
        prequantized = PREQUANTIZED_REPOS.get(variant_of(model_id)) if prequantized else None
        source = prequantized if source else None
    resident = s.get("resident_blocks", "None")
    if prequantized is None:  # no package: quantize both while loading, from the original weights
        t5_load = ("T5EncoderModel.from_pretrained(MODEL_ID, subfolder=\"text_encoder_2\", dtype=TEXT_DTYPE,\n"
                   "    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",\n"
                   "                                           bnb_4bit_compute_dtype=TEXT_DTYPE), use_safetensors=True)")
    else:  # saved in NF4 already: loads as saved, computing in the dtype it was saved with unless told
        t5_load = ("compute_in(T5EncoderModel.from_pretrained(PREQUANTIZED, subfolder=\"text_encoder_2\", "
                   "dtype=TEXT_DTYPE,\n    use_safetensors=True), TEXT_DTYPE)")
    if source is None:
        tr_load = ("FluxTransformer2DModel.from_pretrained(MODEL_ID, subfolder=\"transformer\", dtype=DTYPE,\n"
                   "    quantization_config=DiffusersBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",\n"
                   "                                                    bnb_4bit_compute_dtype=DTYPE), use_safetensors=True)")
    else:
        tr_load = ("compute_in(FluxTransformer2DModel.from_pretrained(TRANSFORMER, subfolder=\"transformer\", "
                   "dtype=DTYPE,\n    use_safetensors=True), DTYPE)")
    where = ("the Hub package of NF4 weights" if prequantized and not Path(prequantized).is_dir()
             else "a folder of NF4 weights")
    lines = [
        f"# Makes {Path(path).name} again: settings read from its PNG metadata (made by fluxnb "
        f"{s.get('fluxnb', '?')}'s Studio).",
        "# The staged flow of notebooks 01-03 in diffusers, transformers and bitsandbytes: encode the prompt, free",
        "# the text encoders, denoise with the 4-bit transformer, decode with the VAE (recipes/prequantized_from_hub.py).",
        *stand_in,
        "import gc",
        "",
        "import bitsandbytes as bnb",
        "import torch",
        "from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel",
        "from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig",
        "from transformers import BitsAndBytesConfig, CLIPTextModel, T5EncoderModel",
        "",
        f"MODEL_ID = {model_id!r}",
        f"PREQUANTIZED = {prequantized!r}  # T5 and the transformer in NF4: {where}"
        if prequantized else "PREQUANTIZED = None  # no NF4 package: both are quantized while loading",
        (f"TRANSFORMER = PREQUANTIZED" if source == prequantized else f"TRANSFORMER = {source!r}  # the NF4 transformer notebook 02 saved")
        if source else None,
        f"DTYPE, TEXT_DTYPE = {s['dtype']}, {s['text_dtype']}  # text encoders in fp32 on a GPU without bf16 (notebook 01)",
        f"PROMPT = {s['prompt']!r}",
        f"SEED, STEPS, GUIDANCE = {int(s['seed'])}, {int(s['steps'])}, {float(s['guidance'])}",
        f"HEIGHT, WIDTH, MAX_SEQUENCE_LENGTH = {int(s['height'])}, {int(s['width'])}, {int(s['max_sequence_length'])}",
        "DEVICE = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        "",
        "",
        "def compute_in(model, dtype):",
        "    \"\"\"A model saved in 4 bits computes in the dtype it was saved with: make every 4-bit layer use ``dtype``.\"\"\"",
        "    for layer in model.modules():",
        "        if isinstance(layer, bnb.nn.Linear4bit):",
        "            layer.compute_dtype = dtype",
        "    return model",
        "",
        "",
        "# 1. encode the prompt with CLIP and the 4-bit T5, then free both (notebook 01)",
        f"t5 = {t5_load}",
        "clip = CLIPTextModel.from_pretrained(MODEL_ID, subfolder=\"text_encoder\", dtype=TEXT_DTYPE, use_safetensors=True)",
        "pipe = FluxPipeline.from_pretrained(MODEL_ID, text_encoder=clip.to(DEVICE), text_encoder_2=t5, transformer=None,",
        "                                    vae=None, dtype=TEXT_DTYPE, use_safetensors=True)",
        "with torch.no_grad():",
        "    prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None,",
        "                                                                max_sequence_length=MAX_SEQUENCE_LENGTH)",
        "del pipe, clip, t5",
        "gc.collect()",
        "torch.cuda.empty_cache()",
        "",
        "# 2. the 4-bit transformer and the VAE in one pipeline without text encoders (notebook 02)",
        f"transformer = {tr_load}",
        "vae = AutoencoderKL.from_pretrained(MODEL_ID, subfolder=\"vae\", dtype=DTYPE, use_safetensors=True).to(DEVICE)",
        "pipe = FluxPipeline.from_pretrained(MODEL_ID, transformer=transformer, vae=vae, text_encoder=None,",
        "                                    text_encoder_2=None, tokenizer=None, tokenizer_2=None, dtype=DTYPE,",
        "                                    use_safetensors=True)",
    ]
    if resident not in ("None", ""):
        lines += [
            f"# This GPU had room for {resident} of the transformer's blocks next to the step: the others waited in host",
            "# RAM and streamed in as they ran, with the course's own streamer (notebook 08; not part of diffusers).",
            "import fluxnb",
            f"fluxnb.apply_block_streaming(transformer, fluxnb.BlockStreamingConfig(resident_blocks={int(resident)}))",
        ]
    if s.get("vae_tiling") == "True":
        lines += [
            "# The Studio decoded this size in 512-pixel tiles, to fit the decode next to the transformer (notebook 08)",
            "vae.enable_tiling()",
            "vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 512 // 2 ** (len(vae.config.block_out_channels) - 1)",
        ]
    lines += [
        "",
        "# 3. denoise from the embeddings and decode (notebook 03); the same seed gives the same image",
        "image = pipe(prompt_embeds=prompt_embeds.to(DEVICE, DTYPE), pooled_prompt_embeds=pooled_prompt_embeds.to(DEVICE, DTYPE),",
        "             height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,",
        "             generator=torch.Generator(\"cpu\").manual_seed(SEED)).images[0]  # CPU noise: the same on any device",
        "image.save(\"remade.png\")",
    ]
    return "\n".join(line for line in lines if line is not None)


def klein_reproduction_code(path: str | Path, s: dict[str, str]) -> str:
    """:func:`reproduction_code` for a FLUX.2 [klein] image (``s``: its PNG settings): klein's staged flow in
    diffusers, transformers and bitsandbytes (:mod:`fluxnb.klein` written out), fluxnb only in the switch to a
    stand-in."""
    model_id = klein.MODEL_ID if is_stand_in(s["checkpoint"]) else s["checkpoint"]
    stand_in = _stand_in_lines(s["checkpoint"], model_id)
    transformer_quant = s.get("transformer_quant", "None")
    if transformer_quant == "nf4":
        tr_load = ("Flux2Transformer2DModel.from_pretrained(MODEL_ID, subfolder=\"transformer\", dtype=DTYPE,\n"
                   "    quantization_config=DiffusersBitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",\n"
                   "                                                    bnb_4bit_compute_dtype=DTYPE), use_safetensors=True)")
    else:
        tr_load = ("Flux2Transformer2DModel.from_pretrained(MODEL_ID, subfolder=\"transformer\", dtype=DTYPE,\n"
                   "    use_safetensors=True).to(DEVICE)")
    lines = [
        f"# Makes {Path(path).name} again: settings read from its PNG metadata (made by fluxnb "
        f"{s.get('fluxnb', '?')}'s Studio).",
        "# FLUX.2 [klein]'s staged flow in diffusers, transformers and bitsandbytes: encode the prompt with a 4-bit",
        "# Qwen3, free it, denoise with the transformer, decode with the VAE (notebook 12).",
        *stand_in,
        "import gc",
        "",
        "import torch",
        "from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel",
        "from diffusers import BitsAndBytesConfig as DiffusersBitsAndBytesConfig",
        "from transformers import BitsAndBytesConfig, Qwen3ForCausalLM",
        "",
        f"MODEL_ID = {model_id!r}",
        f"DTYPE, TEXT_DTYPE = {s['dtype']}, {s['text_dtype']}",
        f"PROMPT = {s['prompt']!r}",
        f"SEED, STEPS, GUIDANCE = {int(s['seed'])}, {int(s['steps'])}, {float(s['guidance'])}",
        f"HEIGHT, WIDTH, MAX_SEQUENCE_LENGTH = {int(s['height'])}, {int(s['width'])}, {int(s['max_sequence_length'])}",
        "DEVICE = \"cuda\" if torch.cuda.is_available() else \"cpu\"",
        "",
        "# 1. encode the prompt with a 4-bit Qwen3, then free it",
        "qwen3 = Qwen3ForCausalLM.from_pretrained(MODEL_ID, subfolder=\"text_encoder\", dtype=TEXT_DTYPE,",
        "    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",",
        "                                           bnb_4bit_compute_dtype=TEXT_DTYPE), use_safetensors=True)",
        "pipe = Flux2KleinPipeline.from_pretrained(MODEL_ID, text_encoder=qwen3, transformer=None, vae=None,",
        "                                          dtype=TEXT_DTYPE, use_safetensors=True)",
        "with torch.no_grad():",
        "    prompt_embeds, _ = pipe.encode_prompt(prompt=PROMPT, device=pipe._execution_device,",
        "                                          max_sequence_length=MAX_SEQUENCE_LENGTH)",
        "del pipe, qwen3",
        "gc.collect()",
        "torch.cuda.empty_cache()",
        "",
        "# 2. the transformer and the VAE in one pipeline without a text encoder",
        f"transformer = {tr_load}",
        "vae = AutoencoderKLFlux2.from_pretrained(MODEL_ID, subfolder=\"vae\", dtype=DTYPE, use_safetensors=True).to(DEVICE)",
        "pipe = Flux2KleinPipeline.from_pretrained(MODEL_ID, transformer=transformer, vae=vae, text_encoder=None,",
        "                                          tokenizer=None, dtype=DTYPE, use_safetensors=True)",
        "",
        "# 3. denoise from the embeddings and decode; the same seed gives the same image (prompt_embeds= by name:",
        "# the pipeline's first argument is an input image)",
        "image = pipe(prompt_embeds=prompt_embeds.to(DEVICE, DTYPE), height=HEIGHT, width=WIDTH,",
        "             num_inference_steps=STEPS, guidance_scale=GUIDANCE,",
        "             generator=torch.Generator(\"cpu\").manual_seed(SEED)).images[0]  # CPU noise: the same on any device",
        "image.save(\"remade.png\")",
    ]
    return "\n".join(lines)


class _StepCallback(StepTimer):
    """A ``callback_on_step_end``: times each step (StepTimer), moves the progress bar, honours Stop.

    Stop uses diffusers' documented way to interrupt a pipeline from a callback (``pipe._interrupt =
    True``, diffusers' "Pipeline callbacks" guide): the pipeline skips its remaining steps and returns.
    """

    def __init__(self, studio: "Studio") -> None:
        super().__init__()
        self.studio = studio
        self.interrupted = False

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        callback_kwargs = super().__call__(pipe, step, timestep, callback_kwargs)
        self.studio._on_step(step + 1)
        if self.studio._stop.is_set():
            pipe._interrupt = True
            self.interrupted = True
        return callback_kwargs


class Studio:
    """The course's staged FLUX.1 recipe behind a form. See the module docstring for the memory policy.

    ``checkpoint``, ``dtype``, ``text_dtype``, ``prequantized``, ``max_sequence_length`` are the
    notebooks' parameters (``CHECKPOINT``, ``DTYPE``, ...). ``transformer_source``: where the NF4
    transformer loads from (notebook 03: the folder 02 saved, else ``prequantized``).
    ``keep_text_encoders``: None decides from memory; True/False force it.
    """

    def __init__(self, checkpoint: str, dtype: torch.dtype, text_dtype: torch.dtype, output_dir: str | Path,
                 model_id: str | None = None, prequantized: str | None = None,
                 transformer_source: str | None = None, max_sequence_length: int = 512,
                 defaults: dict[str, Any] | None = None, keep_text_encoders: bool | None = None) -> None:
        import ipywidgets as w

        self.checkpoint, self.model_id = str(checkpoint), model_id or str(checkpoint)
        self.model = family_of(self.model_id)  # "flux1" or "klein": whose staged flow the Studio runs
        self.transformer_quant: str | None = None  # klein: None (the compute dtype) or "nf4", decided on loading
        self.dtype, self.text_dtype = dtype, text_dtype
        self.prequantized = prequantized
        self.transformer_source = transformer_source or prequantized
        self.max_sequence_length = max_sequence_length
        self.output_dir = Path(output_dir)
        self.keep_text_encoders = keep_text_encoders
        self.loads: Counter[str] = Counter()  # how often each model was loaded: the test checks "once"
        self.generations: list[Generation] = []
        self._encoders: Any = None
        self._denoiser: Any = None
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self._room_for: tuple[int, int] | None = None  # the step size the transformer's blocks were placed for
        self._tiled = False  # the VAE decodes in tiles (a size too large to decode whole next to the transformer)
        self._resident: int | None = None  # blocks kept on the GPU while the others stream (None: all of them)
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self.thread: threading.Thread | None = None
        self.last_error: BaseException | None = None

        model_defaults = {} if self.model == "flux1" else {  # klein: 4 steps, guidance 1.0 (step-distilled)
            key: generation_settings(self.model_id)[key] for key in ("steps", "guidance")}
        d = {**dict(prompt="A cat holding a sign that says hello world", seed=0, steps=28, guidance=3.5,
                    height=768, width=768, count=1), **model_defaults, **(defaults or {})}
        full = dict(layout=w.Layout(width="100%"))
        self.prompt = w.Textarea(value=d["prompt"], description="Prompt", rows=2, **full)
        self.seed = w.IntText(value=d["seed"], description="Seed")
        self.random_seed = w.Checkbox(value=False, description="random seed", indent=False)
        self.steps = w.IntText(value=d["steps"], description="Steps")
        self.guidance = w.FloatText(value=d["guidance"], description="Guidance", disabled=self.model == "klein",
                                    tooltip="fixed at 1.0: FLUX.2 [klein] is step-distilled" if self.model == "klein" else "")
        self.width = w.IntText(value=d["width"], step=16, description="Width", tooltip="a multiple of 16")
        self.height = w.IntText(value=d["height"], step=16, description="Height", tooltip="a multiple of 16")
        self.count = w.IntText(value=d["count"], description="Images")
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="Step 0/0", **full)
        self.status = w.HTML("Ready. Models load on the first click.")
        self.memory = w.HTML(memory_readout())
        self.gallery = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.gallery.add_class("fluxnb-gallery")
        self.selected = w.Dropdown(options=[], description="Image")
        self.code_button = w.Button(description="Show code", icon="code")
        self.code = w.Textarea(value="", rows=12, layout=w.Layout(width="100%", display="none"))
        self.full_button = w.Button(description="Full size", icon="expand")
        self.full_view = w.Image(format="png", layout=w.Layout(max_width="100%", display="none"))  # 1 pixel = 1 pixel
        self.log = w.Output()
        self.generate_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.code_button.on_click(lambda _: self.show_code())
        self.full_button.on_click(lambda _: self.show_full_size())
        self.selected.observe(self._selection_changed, "value")
        self.widget = w.VBox([
            self.prompt,
            w.HBox([self.seed, self.random_seed]),
            w.HBox([self.steps, self.guidance]),
            w.HBox([self.width, self.height, self.count]),
            w.HBox([self.generate_button, self.stop_button]),
            self.progress, self.status, self.memory, self.gallery,
            w.HBox([self.selected, self.full_button, self.code_button]), self.full_view, self.code, self.log,
        ])
        self.widget.add_class("fluxnb-studio")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # --- the form -----------------------------------------------------------------------------

    def request_from_form(self, **overrides: Any) -> Request:
        """The form's values, with ``overrides``, as a validated :class:`Request`.

        With "random seed" ticked (and no ``seed`` override) a new seed is drawn and shown in the form.
        """
        if self.random_seed.value and "seed" not in overrides:
            self.seed.value = random.SystemRandom().randrange(RANDOM_SEEDS)
        form = dict(prompt=self.prompt.value, seed=self.seed.value, steps=self.steps.value,
                    guidance=self.guidance.value, height=self.height.value, width=self.width.value,
                    count=self.count.value)
        return validate_request(**{**form, **overrides})

    def start(self) -> None:
        """The Generate button: validate, then generate in a thread (the kernel stays free for Stop)."""
        if self._busy.locked():
            self._say("Already generating: wait, or press Stop.", error=True)
            return
        try:
            request = self.request_from_form()
        except ValueError as error:  # bad input: the message says what to change
            self._say(str(error), error=True)
            return
        self.thread = threading.Thread(target=self._run_from_button, args=(request,), daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the generation the button started has finished (tests, non-interactive runs)."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise TimeoutError(f"the generation did not finish within {timeout} s")

    def _run_from_button(self, request: Request) -> None:
        try:
            self.generate(request)
        except Exception as error:  # a thread has no caller: show the message, keep the full traceback
            self.last_error = error
            self._say(f"{type(error).__name__}: {error}", error=True)
            self.log.append_stderr(traceback.format_exc())  # safe from a thread, unlike `with self.log:`

    def stop(self) -> None:
        """The Stop button: the current denoising ends after its current step; nothing half-made is saved."""
        if self._busy.locked():
            self._stop.set()
            self._say("Stopping after this step...")

    # --- generation ---------------------------------------------------------------------------

    def generate(self, request: Request | None = None, **settings: Any) -> Generation:
        """Make ``request.count`` images (default: the form's values; keywords override single fields).

        Image ``k`` uses seed ``seed + k``; each is saved as a PNG with its settings in the metadata.
        Raises ``ValueError`` for bad settings, ``RuntimeError`` if a generation is running already.
        """
        request = request or self.request_from_form(**settings)
        self._check_model_settings(request)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("The Studio is generating already: wait for it, or press Stop.")
        self._stop.clear()
        result = Generation(request)
        started = time.perf_counter()
        self.generate_button.disabled, self.stop_button.disabled = True, False
        try:
            free = free_vram_gib()  # None: no GPU
            if self._denoiser is None and free is not None and self.model == "flux1":  # can this size be made here?
                check_room_before_loading(request.height, request.width, free)
            embeds = self._embeddings_for(request.prompt, request.height, request.width)
            pipe = self._load_denoiser(request.height, request.width)
            if self.model == "flux1":  # streaming and tiling follow FLUX.1's capacity model
                self._make_room(pipe, request.height, request.width)
            for k in range(request.count):
                seed = request.seed + k
                self.progress.value, self.progress.max = 0, request.steps
                self._say(f"Image {k + 1}/{request.count}: denoising, seed {seed}{self._eta(request)}...")
                callback = _StepCallback(self)
                denoise = klein.denoise if self.model == "klein" else stages.denoise
                latents = denoise(pipe, embeds, request.height, request.width, request.steps,
                                  request.guidance, seed, step_timer=callback)
                if callback.interrupted:
                    result.stopped = True
                    self._say(f"Stopped at step {len(callback.ends)} of {request.steps}: image {k + 1} was "
                              f"dropped; {len(result.paths)} image(s) saved.")
                    break
                image = (klein.decode(pipe.vae, latents) if self.model == "klein"
                         else stages.decode(pipe.vae, latents, request.height, request.width))
                del latents
                path = stages.save_image(image, self.output_dir / "images", **self._metadata(request, seed))
                result.paths.append(path)
                result.seeds.append(seed)
                self._add_to_gallery(image, path)
                self._say(f"Saved {path.name} ({callback.seconds_per_step:.2f} s/step).")
        finally:
            result.seconds = time.perf_counter() - started
            self.generations.append(result)
            self.generate_button.disabled, self.stop_button.disabled = False, True
            self.memory.value = memory_readout()
            self._busy.release()
        if not result.stopped:
            self._say(f"Done: {len(result.paths)} image(s) in {result.seconds:.1f} s, saved in "
                      f"{self.output_dir / 'images'}.")
        return result

    def _check_model_settings(self, request: Request) -> None:
        """FLUX.2 [klein] is step-distilled: its guidance is fixed (1.0), before anything loads."""
        fixed = generation_settings(self.model_id)["guidance"]
        if self.model == "klein" and request.guidance != fixed:
            raise BadSettingError(f"guidance={request.guidance:g}: FLUX.2 [klein] is step-distilled and takes no "
                                  f"guidance; it is fixed at {fixed:g} (the diffusers pipeline ignores any other value).")

    def _eta(self, request: Request) -> str:
        """", about N s" on a GPU fluxnb has measured or can scale to (:func:`fluxnb.planner.step_seconds`)."""
        if not torch.cuda.is_available():
            return ""
        per_step = planner.step_seconds(request.height, request.width, torch.cuda.get_device_name(0), bf16_supported(),
                                        model=self.model)
        return "" if per_step is None else f", about {request.steps * per_step:.0f} s (an estimate)"

    def _metadata(self, request: Request, seed: int) -> dict[str, Any]:
        from fluxnb import __version__

        return dict(prompt=request.prompt, seed=seed, steps=request.steps, guidance=request.guidance,
                    height=request.height, width=request.width, checkpoint=self.checkpoint,
                    model_id=self.model_id, dtype=self.dtype, text_dtype=self.text_dtype,
                    prequantized=self.prequantized, transformer_source=self.transformer_source,
                    max_sequence_length=self.max_sequence_length, vae_tiling=self._tiled,
                    resident_blocks=self._resident,
                    **({"transformer_quant": self.transformer_quant} if self.model == "klein" else {}),
                    fluxnb=__version__, made_by="fluxnb.Studio")

    def _decide_keep_encoders(self, height: int, width: int) -> bool:
        """Keep the text encoders loaded next to the denoiser? Yes on a CPU; on a GPU only if both fit."""
        if self.keep_text_encoders is None and self.model == "klein":
            keep = not torch.cuda.is_available()
            reason = ("No GPU: Qwen3 stays loaded in host RAM next to the denoiser." if keep else
                      "FLUX.2 [klein]'s staged flow: Qwen3 is freed before the transformer loads, and a new prompt "
                      "reloads the transformer.")
            self.keep_text_encoders = keep
            self._say(reason)
        if self.keep_text_encoders is None:
            keep, reason = both_models_fit(self.checkpoint, self.prequantized, height, width)
            self.keep_text_encoders = keep
            self._say(reason)
        return self.keep_text_encoders

    def _embeddings_for(self, prompt: str, height: int = 1024, width: int = 1024) -> dict[str, torch.Tensor]:
        """The prompt's embeddings: kept from an earlier click, read from disk, or encoded now."""
        if prompt in self._embeddings:
            return self._embeddings[prompt]
        settings = dict(prompt=prompt, checkpoint=self.checkpoint, max_sequence_length=self.max_sequence_length,
                        dtype=str(self.text_dtype), prequantized=self.prequantized)  # as encode_and_save
        path = stages.embeddings_path(self.output_dir / "embeddings", **settings)
        if not path.exists():
            keep = self._decide_keep_encoders(height, width)
            if self._denoiser is not None and not keep:
                self._say("New prompt: freeing the transformer to load T5 (both do not fit on this GPU)...")
                self._denoiser, self._room_for, self._tiled, self._resident = None, None, False, None
                flush()
            if self._encoders is None and self.model == "klein":
                self._say("Loading the text encoder (4-bit Qwen3)...")
                self._encoders = klein.load_text_encoder(self.checkpoint, self.text_dtype, "nf4")
                self.loads["text encoders"] += 1
            elif self._encoders is None:
                self._say("Loading the text encoders (CLIP, 4-bit T5)...")
                self._encoders = stages.load_text_encoders_4bit(self.checkpoint, self.text_dtype, self.prequantized)
                self.loads["text encoders"] += 1
            self._say("Encoding the prompt...")
            encode = klein.encode_prompt if self.model == "klein" else stages.encode_prompt
            embeds = encode(self._encoders, prompt, self.max_sequence_length)
            path = stages.save_embeddings(embeds, self.output_dir / "embeddings", **settings)
            del embeds
            if not keep:
                self._encoders = None
                flush()
        embeds, _ = stages.load_embeddings(path)
        self._embeddings[prompt] = embeds
        self.memory.value = memory_readout()
        return embeds

    def _load_denoiser(self, height: int = 1024, width: int = 1024) -> Any:
        if self._denoiser is not None:
            return self._denoiser
        if self.model == "klein":
            self.transformer_quant, reason = klein_transformer_quant(self.dtype, height, width)
            self._say(f"{reason} Loading the transformer and the VAE...")
            transformer = klein.load_transformer(self.checkpoint, self.dtype, self.transformer_quant)
            self._denoiser = klein.load_denoising_pipeline(self.checkpoint, transformer, self.dtype)
        else:
            self._say("Loading the 4-bit transformer and the VAE...")
            transformer = stages.load_transformer_4bit(self.checkpoint, self.dtype, prequantized=self.transformer_source)
            self._denoiser = stages.load_denoising_pipeline(self.checkpoint, transformer, self.dtype)
        self._denoiser.set_progress_bar_config(disable=True)  # the Studio has its own bar
        self.loads["denoiser"] += 1
        self.memory.value = memory_readout()
        return self._denoiser

    def _make_room(self, pipe: Any, height: int, width: int) -> None:
        """Make room for a ``height`` x ``width`` step and decode next to the loaded transformer (an 8 GB
        card at 1024x1024): stream enough blocks from host RAM, and decode in tiles where even that is
        not enough (:func:`plan_room`). Notebooks 03 and 08 show the same calls.

        :func:`plan_room` counts for a transformer whose blocks are all on the GPU, so a new size first
        puts back the blocks an earlier size streamed. On a CPU nothing changes."""
        if self._room_for == (height, width):
            return
        transformer = pipe.transformer
        if streaming.get_block_streamer(transformer) is not None:
            streaming.remove_block_streaming(transformer)  # every block back on the GPU, as it was loaded
            flush()
        free = free_vram_gib()
        room = Room(None, False)
        blocks = streaming.transformer_blocks(transformer)
        if free is not None:
            room = plan_room([streaming.block_bytes(b) for b in blocks], len(transformer.transformer_blocks),
                             height, width, int(free * GIB))
        self._room_for = (height, width)
        self._resident = room.resident_blocks
        if room.resident_blocks is not None:
            streaming.apply_block_streaming(transformer, streaming.BlockStreamingConfig(resident_blocks=room.resident_blocks))
        self._tiled = room.tiled_decode
        if room.tiled_decode:
            stages.tile_vae(pipe.vae)
        else:
            pipe.vae.disable_tiling()
        sentence = room.sentence(len(blocks), width, height)
        if sentence:
            self._say(sentence)

    def close(self) -> None:
        """Free every model the Studio holds (to run something else in the same kernel)."""
        self._encoders = self._denoiser = self._room_for = self._resident = None
        self._tiled = False
        self._embeddings.clear()
        flush()

    # --- the display --------------------------------------------------------------------------

    def _on_step(self, step: int) -> None:
        self.progress.value = step
        self.progress.description = f"Step {step}/{self.progress.max}"
        self.memory.value = memory_readout()

    def _say(self, text: str, error: bool = False) -> None:
        import html

        colour = "#b00020" if error else "inherit"
        self.status.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    def _add_to_gallery(self, image: Image.Image, path: Path) -> None:
        import ipywidgets as w

        thumb = image.copy()
        thumb.thumbnail((256, 256))
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        picture = w.Image(value=buffer.getvalue(), format="png", width=min(256, thumb.width))
        picture.add_class("fluxnb-gallery-image")
        self.gallery.children = (*self.gallery.children, w.VBox([picture, w.Label(path.name)]))
        self.selected.options = [*self.selected.options, (path.name, str(path))]
        self.selected.value = str(path)

    def _selection_changed(self, change: dict[str, Any]) -> None:
        if self.code.layout.display is None and change["new"]:  # the code is shown: keep it in step
            self.show_code()
        if self.full_view.layout.display is None and change["new"]:  # so is the full-size view
            self.show_full_size()

    def show_full_size(self) -> bytes:
        """The Full size button: the selected PNG as saved, pixel for pixel (the gallery shows thumbnails)."""
        if not self.selected.value:
            self._say("No image yet: generate one first, then select it.", error=True)
            return b""
        self.full_view.value = Path(self.selected.value).read_bytes()
        self.full_view.layout.display = None
        return self.full_view.value

    def show_code(self) -> str:
        """The Show code button: the Python that makes the selected image again (also returned)."""
        if not self.selected.value:
            self._say("No image yet: generate one first, then select it.", error=True)
            return ""
        self.code.value = reproduction_code(self.selected.value)
        self.code.layout.display = None
        return self.code.value
