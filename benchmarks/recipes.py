"""The recipes the benchmark measures, each run by :mod:`benchmarks.worker` in a process of its own.

Every recipe is built from the functions the notebooks teach (``fluxnb.stages``), so the benchmark
measures the course's code, not a copy of it. A recipe yields the same stage structure:

    load / encode  ->  for each size: warm-up (1 step), denoise (timed steps)  ->  decode per size

so recipes compare row by row. What differs is how the models are loaded and where they live.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fluxnb
import fluxnb.checkpoints
from fluxnb import quantization as quant
from fluxnb.memory import MemoryTracker, StepTimer

DEFAULT_SIZES = "1024x1024,512x768"  # height x width: the course's size, and a smaller landscape one


@dataclass(frozen=True)
class Recipe:
    """A way to run FLUX.1; ``run`` does the work, recording stages and sizes in the Context."""

    name: str
    description: str
    run: Callable[[Context], None]
    needs_gpu: bool = False
    compute_dtype: str = "auto"  # "auto": fluxnb.pick_dtype(); "fp16": as on a T4
    env: dict[str, str] = field(default_factory=dict)  # set for the recipe's process before torch starts


@dataclass
class Context:
    """What a recipe gets: the checkpoint, sizes, steps, and a tracker to record stages in."""

    checkpoint: str
    sizes: list[tuple[int, int]]
    steps: int
    dtype: torch.dtype
    prompt: str = "A cat holding a sign that says hello world"
    seed: int = 0
    guidance: float = 3.5
    tracker: MemoryTracker = field(default_factory=MemoryTracker)
    sizes_out: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    on_size_done: Callable[[], None] | None = None  # the worker saves what is measured so far

    def stage(self, name: str) -> Any:
        """A tracker stage that also announces itself (the envelope reads which stage broke)."""
        print(f"STAGE {name}", flush=True)
        return self.tracker.stage(name)


def _record_size(ctx: Context, height: int, width: int, warmup_s: float, timer: StepTimer,
                 latents: torch.Tensor) -> None:
    """Keep one size's speed and whether its latents are finite."""
    ctx.sizes_out.append(dict(height=height, width=width, warmup_s=round(warmup_s, 3),
                              s_per_step=round(timer.seconds_per_step, 4),
                              step_s=[round(t, 4) for t in timer.step_seconds],  # every step: shows the spread
                              latents_finite=bool(torch.isfinite(latents).all())))
    if ctx.on_size_done is not None:
        ctx.on_size_done()


def _denoise_all_sizes(ctx: Context, pipe: Any, embeds: dict[str, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Warm up (one step) then time ``ctx.steps`` steps at each size; return the latents per size."""
    latents = {}
    for height, width in ctx.sizes:
        start = time.perf_counter()
        with ctx.stage(f"warm-up {height}x{width}"):
            fluxnb.denoise(pipe, embeds, height, width, 1, ctx.guidance, ctx.seed)
        warmup_s = time.perf_counter() - start
        timer = StepTimer()
        with ctx.stage(f"denoise {height}x{width}"):
            out = fluxnb.denoise(pipe, embeds, height, width, ctx.steps, ctx.guidance, ctx.seed, step_timer=timer)
        latents[(height, width)] = out
        _record_size(ctx, height, width, warmup_s, timer, out)
    return latents


def _decode_all_sizes(ctx: Context, vae: Any, latents: dict[tuple[int, int], torch.Tensor]) -> None:
    for (height, width), lat in latents.items():
        with ctx.stage(f"decode {height}x{width}"):
            fluxnb.decode(vae, lat, height, width)


def _load_transformer(ctx: Context, quant: str) -> Any:
    """NF4 through the taught function; int8 through diffusers' BitsAndBytesConfig(load_in_8bit)."""
    if quant == "nf4":
        return fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype)
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(
        ctx.checkpoint, subfolder="transformer", quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=ctx.dtype,
    )


def _encode(ctx: Context, quant: str) -> dict[str, torch.Tensor]:
    """The encode stage of the staged flow: load the quantized T5 and CLIP, encode, free."""
    with ctx.stage(f"encode (T5 {quant})"):
        if quant == "nf4":
            pipe = fluxnb.load_text_encoders_4bit(ctx.checkpoint, ctx.dtype)
        else:
            pipe = _load_text_encoders_8bit(ctx)
        embeds = {k: v.detach() for k, v in fluxnb.encode_prompt(pipe, ctx.prompt).items()}
        del pipe
        fluxnb.flush()
    return embeds


def _load_text_encoders_8bit(ctx: Context) -> Any:
    from diffusers import FluxPipeline
    from transformers import BitsAndBytesConfig, CLIPTextModel, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(ctx.checkpoint, subfolder="text_encoder_2",
                                        quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=ctx.dtype)
    clip = CLIPTextModel.from_pretrained(ctx.checkpoint, subfolder="text_encoder", dtype=ctx.dtype)
    return FluxPipeline.from_pretrained(ctx.checkpoint, text_encoder=clip.to(fluxnb.execution_device()),
                                        text_encoder_2=t5, transformer=None, vae=None, dtype=ctx.dtype)


def compile_transformer(transformer: Any, how: str) -> None:
    """Compile FLUX's transformer in place, the two ways diffusers documents.

    ``"regional"``: ``compile_repeated_blocks`` compiles one double-stream and one single-stream block
    and reuses them for all 57 blocks: the speed-up of a whole-model compile at a fraction of the
    compile time. ``"full"``: the whole model as one graph. Both use ``fullgraph=True``, so a graph
    break is an error instead of a silent slow-down.
    """
    torch._dynamo.config.capture_dynamic_output_shape_ops = True  # as diffusers' bitsandbytes guide sets
    if how == "regional":
        transformer.compile_repeated_blocks(fullgraph=True)
    elif how == "full":
        transformer.compile(fullgraph=True)
    else:
        raise ValueError(f"compile must be 'regional' or 'full', not {how!r}")


def staged(quant: str = "nf4", compile_how: str | None = None) -> Callable[[Context], None]:
    """The course's flow: quantized T5 encode, free, quantized transformer denoise, free, VAE decode.

    ``compile_how`` (``"regional"`` or ``"full"``) compiles the transformer; compilation happens in each
    size's warm-up step, whose time is reported as that size's compile time.
    """

    def run(ctx: Context) -> None:
        embeds = _encode(ctx, quant)
        start = time.perf_counter()
        with ctx.stage(f"load transformer ({quant}) + VAE"):
            pipe = fluxnb.load_denoising_pipeline(ctx.checkpoint, _load_transformer(ctx, quant), ctx.dtype)
        ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
        if compile_how:
            compile_transformer(pipe.transformer, compile_how)
        latents = _denoise_all_sizes(ctx, pipe, embeds)
        if compile_how:  # the warm-up steps are where compilation happens
            ctx.extra["compile_s"] = round(sum(s["warmup_s"] for s in ctx.sizes_out), 3)
        vae = pipe.vae
        with ctx.stage("free transformer"):
            del pipe
            fluxnb.flush()
        _decode_all_sizes(ctx, vae, latents)

    return run


def all_resident(ctx: Context) -> None:
    """Every component in the compute dtype, resident on the GPU (the plain recipe)."""
    start = time.perf_counter()
    with ctx.stage("load everything"):
        pipe = fluxnb.load_pipeline_all_at_once(ctx.checkpoint, ctx.dtype)
    ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
    with ctx.stage("encode"):
        embeds = {k: v.detach() for k, v in fluxnb.encode_prompt(pipe, ctx.prompt).items()}
    latents = _denoise_all_sizes(ctx, pipe, embeds)
    _decode_all_sizes(ctx, pipe.vae, latents)


def _load_pipeline_4bit_offload(ctx: Context) -> Any:
    """NF4 T5 and NF4 transformer in one pipeline with model CPU offload: both wait in host RAM.

    The course teaches the form that fits a Colab VM instead (``fluxnb.load_transformer_offload``);
    this one is measured to show why.
    """
    from diffusers import FluxPipeline

    encoders = fluxnb.load_text_encoders_4bit(ctx.checkpoint, ctx.dtype)
    pipe = FluxPipeline.from_pretrained(
        ctx.checkpoint, text_encoder=encoders.text_encoder, text_encoder_2=encoders.text_encoder_2,
        transformer=fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype), dtype=ctx.dtype,
    )
    pipe.enable_model_cpu_offload()
    return pipe


def model_offload(ctx: Context) -> None:
    """NF4 T5 + NF4 transformer in one pipeline with ``enable_model_cpu_offload``; whole pipeline calls."""
    start = time.perf_counter()
    with ctx.stage("load (NF4, model offload)"):
        pipe = _load_pipeline_4bit_offload(ctx)
    ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
    for height, width in ctx.sizes:
        fluxnb.check_generation_request(height, width, ctx.steps)
        call = dict(prompt=ctx.prompt, height=height, width=width, guidance_scale=ctx.guidance, output_type="latent")
        start = time.perf_counter()
        with ctx.stage(f"warm-up {height}x{width}"):
            pipe(num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(ctx.seed), **call)
        warmup_s = time.perf_counter() - start
        timer = StepTimer()
        with ctx.stage(f"generate {height}x{width}"):  # encode + denoise, models moving in and out
            latents = pipe(num_inference_steps=ctx.steps, generator=torch.Generator("cpu").manual_seed(ctx.seed),
                           callback_on_step_end=timer, **call).images
        _record_size(ctx, height, width, warmup_s, timer, latents)
        with ctx.stage(f"decode {height}x{width}"):
            pipe.vae.to(fluxnb.execution_device())  # decode() calls vae.decode, which the offload hook does not move
            fluxnb.decode(pipe.vae, latents, height, width)
            pipe.vae.to("cpu")


def save_and_reload(ctx: Context) -> None:
    """Time the two ways to get an NF4 transformer: quantize the bf16 shards, or load a saved NF4 copy.

    A warm-up stage first pays what only the first load in a process pays (importing diffusers'
    model code, starting CUDA, loading bitsandbytes' kernels), so the two loads compare like for like.
    """
    import tempfile

    with ctx.stage("warm-up: imports, CUDA, bitsandbytes"):  # one-off costs the first load would carry
        import bitsandbytes.functional as bnbf
        from diffusers import FluxTransformer2DModel  # noqa: F401

        bnbf.quantize_4bit(torch.randn(64, 64, device=fluxnb.execution_device(), dtype=ctx.dtype), quant_type="nf4")
    with tempfile.TemporaryDirectory(prefix="fluxnb-nf4-") as folder:
        start = time.perf_counter()
        with ctx.stage("quantize on the fly"):
            transformer = fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype)
        ctx.extra["on_the_fly_s"] = round(time.perf_counter() - start, 3)
        with ctx.stage("save NF4"):
            transformer.save_pretrained(folder)
            del transformer
            fluxnb.flush()
        start = time.perf_counter()
        with ctx.stage("load saved NF4"):
            transformer = fluxnb.load_transformer_4bit(folder, ctx.dtype)
        ctx.extra["prequantized_s"] = round(time.perf_counter() - start, 3)


QUANT_INPUT = (512, 512)  # height x width of the fixed input the relative error is measured on (+512 text tokens)


def quant_reference_path(checkpoint: str, dtype: torch.dtype) -> Path:
    """Where ``quant-bf16`` saves the reference output that the other quantization recipes compare with."""
    import zlib

    from fluxnb.checkpoints import cache_dir

    tag = f"{zlib.crc32(str(Path(checkpoint).resolve()).encode()):08x}-{str(dtype).replace('torch.', '')}"
    return cache_dir() / "quant-reference" / f"reference-{tag}.safetensors"


def _fixed_embeds(ctx: Context, config: Any) -> dict[str, torch.Tensor]:
    """Seeded stand-ins for the T5 and CLIP embeddings: no text encoder in these rows (saves a load each)."""
    inputs = quant.fixed_inputs(config, *QUANT_INPUT, seed=ctx.seed, dtype=ctx.dtype)
    return {"prompt_embeds": inputs["encoder_hidden_states"], "pooled_prompt_embeds": inputs["pooled_projections"]}


def quantized(recipe: str) -> Callable[[Context], None]:
    """One quantization recipe of :mod:`fluxnb.quantization` on the full transformer.

    Loads the transformer with ``recipe`` (a GGUF file is made first, timed apart as ``make_s``), runs one
    forward at fixed inputs and compares it with the reference that ``quant-bf16`` saved earlier in the
    same command (``relative_error``), then times denoising at each size with fixed embeddings. No text
    encoders and no decode: these rows compare the transformer alone.
    """

    def run(ctx: Context) -> None:
        quant.require(recipe)
        backend = quant.BACKENDS[quant.RECIPES[recipe].backend]
        ctx.extra["backend"] = (f"{backend.package} {quant.package_version(backend.package)}" if backend.package
                                else "diffusers")
        gguf_folder = fluxnb.checkpoints.cache_dir() / "gguf" / Path(ctx.checkpoint).name
        if recipe.startswith("gguf-"):
            start = time.perf_counter()
            with ctx.stage("make GGUF file"):
                quant.make_gguf(ctx.checkpoint, gguf_folder / f"transformer-{recipe[5:].upper()}.gguf", recipe[5:],
                                workers=os.cpu_count())  # the GPU machine's RAM holds a worker per core
            ctx.extra["make_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        with ctx.stage(f"load transformer ({recipe})"):
            transformer = quant.load_transformer(ctx.checkpoint, recipe, ctx.dtype, gguf_folder=gguf_folder)
        ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
        with ctx.stage("fixed-input forward"):
            out = quant.transformer_output(transformer, quant.fixed_inputs(transformer.config, *QUANT_INPUT,
                                                                           seed=ctx.seed, dtype=ctx.dtype))
        ref_path = quant_reference_path(ctx.checkpoint, ctx.dtype)
        if recipe == "bf16":
            from safetensors.torch import save_file

            ref_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"output": out.contiguous()}, str(ref_path), metadata={"made": time.strftime("%Y-%m-%dT%H:%M:%S")})
            ctx.extra["relative_error"] = 0.0
        elif ref_path.is_file():
            from safetensors import safe_open

            with safe_open(str(ref_path), framework="pt") as f:
                ctx.extra["relative_error"] = round(quant.relative_error(out, f.get_tensor("output")), 6)
                ctx.extra["reference_made"] = f.metadata()["made"]
        else:
            raise FileNotFoundError(f"no reference output at {ref_path}: put quant-bf16 first in --recipes")
        ctx.extra["weight_gib"] = round(quant.weight_bytes(transformer) / 2**30, 3)
        with ctx.stage("load VAE"):
            pipe = fluxnb.load_denoising_pipeline(ctx.checkpoint, transformer, ctx.dtype)
        _denoise_all_sizes(ctx, pipe, _fixed_embeds(ctx, transformer.config))

    return run


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16-resident", "all components in bf16, resident on the GPU", all_resident, needs_gpu=True),
    Recipe("staged-nf4", "course flow: NF4 T5 encode, free, NF4 transformer denoise, free, VAE decode", staged("nf4")),
    Recipe("staged-nf4-expandable", "the course flow with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
           staged("nf4"), needs_gpu=True, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    Recipe("staged-nf4-fp16", "the same flow computing in fp16, as on a T4 (no bf16)", staged("nf4"),
           compute_dtype="fp16"),
    Recipe("nf4-model-offload", "NF4 T5 + NF4 transformer in one pipeline, enable_model_cpu_offload",
           model_offload, needs_gpu=True),
    Recipe("staged-int8", "the course flow with bitsandbytes LLM.int8 (8-bit) T5 and transformer", staged("int8")),
    Recipe("nf4-save-reload", "load time: NF4 quantized on the fly vs from a saved NF4 checkpoint",
           save_and_reload),
    Recipe("staged-nf4-compile", "the course flow, transformer blocks compiled (compile_repeated_blocks, fullgraph)",
           staged("nf4", compile_how="regional"), needs_gpu=True),
    Recipe("staged-nf4-compile-full", "the course flow, whole transformer compiled (Module.compile, fullgraph)",
           staged("nf4", compile_how="full"), needs_gpu=True),
    *[Recipe(f"quant-{name}", f"quantization: {r.description}", quantized(name),
             needs_gpu=name in ("torchao-fp8",)) for name, r in quant.RECIPES.items()],
]}
