"""How the benchmark runs each recipe of :data:`fluxnb.recipes.RECIPES`, each in a process of its own (:mod:`benchmarks.worker`).

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
from fluxnb import faster
import fluxnb.checkpoints
import fluxnb.klein
import fluxnb.recipes
from fluxnb import gguf_export, quant_metrics
from fluxnb import quantization as quant
from fluxnb.capacity import GIB
from fluxnb.envelopes import ENVELOPES
from fluxnb.memory import GpuTracker, MemoryTracker, StepTimer

DEFAULT_SIZES = "1024x1024,512x768"  # height x width: the course's size, and a smaller landscape one
FLUX1_ID = "black-forest-labs/FLUX.1-dev"
KLEIN_ID = fluxnb.klein.MODEL_ID  # FLUX.2 [klein] 4B: the klein-* recipes


@dataclass(frozen=True)
class Recipe:
    """How the benchmark runs one recipe of :data:`fluxnb.recipes.RECIPES` (the table that names and describes
    it); ``run`` does the work, recording stages and sizes in the Context."""

    name: str
    run: Callable[[Context], None]
    needs_gpu: bool = False
    compute_dtype: str = "auto"  # "auto": fluxnb.pick_dtype(); "fp16": as on a T4
    env: dict[str, str] = field(default_factory=dict)  # set for the recipe's process before torch starts
    gpus: int = 1  # GPUs it needs; with fewer the runner records it as skipped
    model_id: str = FLUX1_ID  # the model whose checkpoint it loads: --checkpoint is resolved for it

    @property
    def model(self) -> str:
        """``"flux1"`` or ``"klein"``: the family of :attr:`model_id` (:func:`fluxnb.checkpoints.family_of`)."""
        return fluxnb.checkpoints.family_of(self.model_id)

    @property
    def description(self) -> str:
        """What the recipe does, from the one table of recipes (a ``quant-<scheme>`` one: from its scheme's row;
        ``tests/test_recipes.py`` checks that every benchmark recipe has a row, of the same model family)."""
        if self.name.startswith(fluxnb.recipes.PER_SCHEME):
            return f"quantization: {quant.SCHEMES[self.name.removeprefix(fluxnb.recipes.PER_SCHEME)].description}"
        return fluxnb.recipes.RECIPES[self.name].description


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


def _denoise_all_sizes(ctx: Context, pipe: Any, embeds: dict[str, torch.Tensor],
                       denoise: Callable[..., torch.Tensor] | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """Warm up (one step) then time ``ctx.steps`` steps at each size; return the latents per size.

    ``denoise``: FLUX.1's :func:`fluxnb.denoise` unless given (klein's is :func:`fluxnb.klein.denoise`)."""
    denoise = denoise or fluxnb.denoise
    latents = {}
    for height, width in ctx.sizes:
        start = time.perf_counter()
        with ctx.stage(f"warm-up {height}x{width}"):
            denoise(pipe, embeds, height, width, 1, ctx.guidance, ctx.seed)
        warmup_s = time.perf_counter() - start
        timer = StepTimer()
        with ctx.stage(f"denoise {height}x{width}"):
            out = denoise(pipe, embeds, height, width, ctx.steps, ctx.guidance, ctx.seed, step_timer=timer)
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
        dtype=ctx.dtype, use_safetensors=True,
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
                                        quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=ctx.dtype,
                                        use_safetensors=True)
    clip = CLIPTextModel.from_pretrained(ctx.checkpoint, subfolder="text_encoder", dtype=ctx.dtype, use_safetensors=True)
    return FluxPipeline.from_pretrained(ctx.checkpoint, text_encoder=clip.to(fluxnb.execution_device()),
                                        text_encoder_2=t5, transformer=None, vae=None, dtype=ctx.dtype,
                                        use_safetensors=True)


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
        transformer=fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype), dtype=ctx.dtype, use_safetensors=True,
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


def staged_cached(cache: str | None) -> Callable[[Context], None]:
    """The course flow with one of diffusers' step caches on the transformer (``fluxnb.faster``), or none.

    s/step here is the *mean* over the timed steps, not the median: a cache makes some steps cheap and
    leaves others full, and the mean is what a whole image costs. ``computed_steps`` counts the steps
    whose last attention really ran. Run these rows with as many steps as an image takes (``--steps 28``):
    the schedules start skipping only after the first steps.
    """

    def run(ctx: Context) -> None:
        embeds = _encode(ctx, "nf4")
        start = time.perf_counter()
        with ctx.stage("load transformer (nf4) + VAE"):
            pipe = fluxnb.load_denoising_pipeline(ctx.checkpoint, _load_transformer(ctx, "nf4"), ctx.dtype)
        ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
        ctx.extra.update(exact=cache is None, cache=cache or "none", computed_steps={})
        if cache:
            pipe.transformer.enable_cache(faster.cache_config(cache, pipe, ctx.steps))
        latents = {}
        for height, width in ctx.sizes:
            start = time.perf_counter()
            with ctx.stage(f"warm-up {height}x{width}"):
                fluxnb.denoise(pipe, embeds, height, width, 1, ctx.guidance, ctx.seed)
            warmup_s = time.perf_counter() - start
            timer = StepTimer()
            with ctx.stage(f"denoise {height}x{width}"), faster.count_attention_runs(pipe.transformer) as runs:
                out = fluxnb.denoise(pipe, embeds, height, width, ctx.steps, ctx.guidance, ctx.seed, step_timer=timer)
            ctx.extra["computed_steps"][f"{height}x{width}"] = runs[0]
            ctx.sizes_out.append(dict(height=height, width=width, warmup_s=round(warmup_s, 3),
                                      s_per_step=round(sum(timer.step_seconds) / len(timer.step_seconds), 4),
                                      step_s=[round(t, 4) for t in timer.step_seconds],
                                      latents_finite=bool(torch.isfinite(out).all())))
            latents[(height, width)] = out
            if ctx.on_size_done is not None:
                ctx.on_size_done()
        vae = pipe.vae
        with ctx.stage("free transformer"):
            del pipe
            fluxnb.flush()
        _decode_all_sizes(ctx, vae, latents)

    return run


def split_two_gpus(vram_gib: float, nf4_text: bool) -> Callable[[Context], None]:
    """Notebook 10's split (``fluxnb.multigpu.run_split``) on every GPU capped at ``vram_gib``, first size only."""
    from fluxnb import multigpu

    def run(ctx: Context) -> None:
        height, width = ctx.sizes[0]
        tracker = GpuTracker()
        start = time.perf_counter()
        with ctx.stage(f"split flow {height}x{width}"):
            out = multigpu.run_split(ctx.checkpoint, ctx.dtype, vram_gib, height, width, ctx.steps, ctx.prompt,
                                     ctx.seed, ctx.guidance, nf4_text=nf4_text, tracker=tracker)
        load = next(r for r in out["stages"] if r["stage"].startswith("load"))
        ctx.extra.update(load_s=load["seconds"], gpus=torch.cuda.device_count(), per_gpu_stages=out["stages"],
                         per_gpu_peaks_gib=out["per_gpu_peaks_gib"], blocks_per_gpu=out["blocks_per_gpu"])
        warmup = next(r for r in out["stages"] if r["stage"] == "warm-up")
        ctx.sizes_out.append(dict(height=height, width=width, warmup_s=warmup["seconds"],
                                  s_per_step=round(out["s_per_step"], 4), step_s=[round(t, 4) for t in out["step_s"]],
                                  latents_finite=out["latents_finite"]))
        print(f"split at {vram_gib} GiB per GPU: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in out["per_gpu_peaks_gib"].items()))

    return run


def torchrun(mode: str, nproc: int, quant: str) -> Callable[[Context], None]:
    """``fluxnb.multigpu``'s torchrun worker on ``nproc`` GPUs (context parallel or independent pipelines)."""
    import tempfile

    from fluxnb import multigpu

    def run(ctx: Context) -> None:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[ctx.dtype]
        for height, width in ctx.sizes[:1]:  # each size would be another launch: the first is the comparison
            with tempfile.TemporaryDirectory() as tmp, ctx.stage(f"torchrun {mode} x{nproc} {height}x{width}"):
                out = multigpu.launch(mode, nproc, ctx.checkpoint, f"{tmp}/out.json", dtype, quant, height, width,
                                      ctx.steps, ctx.seed)
            rank0 = out["ranks"][0]
            ctx.extra.update(load_s=round(rank0["load_s"], 3), gpus=nproc, images_at_once=out["images_at_once"],
                             per_gpu_peaks_gib=out["per_gpu_peaks_gib"], ranks=out["ranks"])
            ctx.sizes_out.append(dict(height=height, width=width, warmup_s=round(rank0["warmup_s"], 3),
                                      s_per_step=round(out["s_per_step"], 4),
                                      step_s=[round(t, 4) for t in rank0["step_s"]], latents_finite=out["latents_finite"]))

    return run
QUANT_INPUT = (512, 512)  # height x width of the fixed input the relative error is measured on (+512 text tokens)


def quant_reference_path(checkpoint: str, dtype: torch.dtype) -> Path:
    """Where ``quant-bf16`` saves the reference output that the other quantization recipes compare with."""
    import zlib

    from fluxnb.checkpoints import cache_dir

    tag = f"{zlib.crc32(str(Path(checkpoint).resolve()).encode()):08x}-{str(dtype).replace('torch.', '')}"
    return cache_dir() / "quant-reference" / f"reference-{tag}.safetensors"


def _fixed_embeds(ctx: Context, config: Any) -> dict[str, torch.Tensor]:
    """Seeded stand-ins for the T5 and CLIP embeddings: no text encoder in these rows (saves a load each)."""
    inputs = quant_metrics.fixed_inputs(config, *QUANT_INPUT, seed=ctx.seed, dtype=ctx.dtype)
    return {"prompt_embeds": inputs["encoder_hidden_states"], "pooled_prompt_embeds": inputs["pooled_projections"]}


def quantized(scheme: str) -> Callable[[Context], None]:
    """The recipe ``quant-<scheme>``: one quantization scheme of :mod:`fluxnb.quantization` on the full transformer.

    Loads the transformer with ``scheme`` (a GGUF file is made first, timed apart as ``make_s``), runs one
    forward at fixed inputs and compares it with the reference that ``quant-bf16`` saved earlier in the
    same command (``relative_error``), then times denoising at each size with fixed embeddings. No text
    encoders and no decode: these rows compare the transformer alone.
    """

    def run(ctx: Context) -> None:
        quant.require(scheme)
        backend = quant.BACKENDS[quant.SCHEMES[scheme].backend]
        ctx.extra["backend"] = (f"{backend.package} {quant.package_version(backend.package)}" if backend.package
                                else "diffusers")
        gguf_folder = fluxnb.checkpoints.cache_dir() / "gguf" / Path(ctx.checkpoint).name
        if scheme.startswith("gguf-"):
            start = time.perf_counter()
            with ctx.stage("make GGUF file"):
                gguf_export.make_gguf(ctx.checkpoint, gguf_folder / f"transformer-{scheme[5:].upper()}.gguf",
                                      scheme[5:], workers=os.cpu_count())  # the GPU machine's RAM holds a worker per core
            ctx.extra["make_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        with ctx.stage(f"load transformer ({scheme})"):
            transformer = quant.load_transformer(ctx.checkpoint, scheme, ctx.dtype, gguf_folder=gguf_folder)
        ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
        with ctx.stage("fixed-input forward"):
            inputs = quant_metrics.fixed_inputs(transformer.config, *QUANT_INPUT, seed=ctx.seed, dtype=ctx.dtype)
            out = quant_metrics.transformer_output(transformer, inputs)
        ref_path = quant_reference_path(ctx.checkpoint, ctx.dtype)
        if scheme == "bf16":
            from safetensors.torch import save_file

            ref_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"output": out.contiguous()}, str(ref_path), metadata={"made": time.strftime("%Y-%m-%dT%H:%M:%S")})
            ctx.extra["relative_error"] = 0.0
        elif ref_path.is_file():
            from safetensors import safe_open

            with safe_open(str(ref_path), framework="pt") as f:
                ctx.extra["relative_error"] = round(quant_metrics.relative_error(out, f.get_tensor("output")), 6)
                ctx.extra["reference_made"] = f.metadata()["made"]
        else:
            raise FileNotFoundError(f"no reference output at {ref_path}: put quant-bf16 first in --recipes")
        ctx.extra["weight_gib"] = round(quant_metrics.weight_bytes(transformer) / GIB, 3)
        with ctx.stage("load VAE"):
            pipe = fluxnb.load_denoising_pipeline(ctx.checkpoint, transformer, ctx.dtype)
        _denoise_all_sizes(ctx, pipe, _fixed_embeds(ctx, transformer.config))

    return run


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def klein_staged(text_quant: str | None, transformer_quant: str | None) -> Callable[[Context], None]:
    """FLUX.2 [klein]'s staged flow (:mod:`fluxnb.klein`), measured as FLUX.1's :func:`staged` is.

    Load Qwen3 (``text_quant``: None, the compute dtype, or ``"nf4"``), encode, free; load the transformer
    (``transformer_quant`` likewise) and the VAE; per size a 1-step warm-up and the timed steps; free the
    transformer; decode each size. The guidance is klein's (1.0: the worker sets it from the recipe's model).
    """

    def run(ctx: Context) -> None:
        text = text_quant or _dtype_name(ctx.dtype)
        with ctx.stage(f"encode (Qwen3 {text})"):
            pipe = fluxnb.klein.load_text_encoder(ctx.checkpoint, ctx.dtype, text_quant)
            embeds = fluxnb.klein.encode_prompt(pipe, ctx.prompt)
            del pipe
            fluxnb.flush()
        what = transformer_quant or _dtype_name(ctx.dtype)
        start = time.perf_counter()
        with ctx.stage(f"load transformer ({what}) + VAE"):
            transformer = fluxnb.klein.load_transformer(ctx.checkpoint, ctx.dtype, transformer_quant)
            pipe = fluxnb.klein.load_denoising_pipeline(ctx.checkpoint, transformer, ctx.dtype)
            del transformer
        ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
        latents = _denoise_all_sizes(ctx, pipe, embeds, denoise=fluxnb.klein.denoise)
        vae = pipe.vae
        with ctx.stage("free transformer"):
            del pipe
            fluxnb.flush()
        for (height, width), lat in latents.items():
            with ctx.stage(f"decode {height}x{width}"):
                fluxnb.klein.decode(vae, lat)

    return run


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16-resident", all_resident, needs_gpu=True),
    Recipe("staged-nf4", staged("nf4")),
    Recipe("staged-nf4-expandable", staged("nf4"), needs_gpu=True,
           env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    Recipe("staged-nf4-fp16", staged("nf4"), compute_dtype="fp16"),
    Recipe("nf4-model-offload", model_offload, needs_gpu=True),
    Recipe("staged-int8", staged("int8")),
    Recipe("nf4-save-reload", save_and_reload),
    Recipe("staged-nf4-compile", staged("nf4", compile_how="regional"), needs_gpu=True),
    Recipe("staged-nf4-compile-full", staged("nf4", compile_how="full"), needs_gpu=True),
    # notebook 09: step caching (run with --steps 28 --sizes 1024x1024; s/step is the mean over the steps)
    Recipe("staged-nf4-steps", staged_cached(None), needs_gpu=True),
    *[Recipe(f"staged-nf4-cache-{name}", staged_cached(name), needs_gpu=True) for name in faster.CACHES],
    # notebook 10: two GPUs (nvidia-h200-x2)
    Recipe("split-bf16-2gpu", split_two_gpus(16.0, nf4_text=False), needs_gpu=True, compute_dtype="bf16", gpus=2),
    Recipe("split-fp16-kaggle", split_two_gpus(ENVELOPES["colab-t4"].vram_gib, nf4_text=True), needs_gpu=True, compute_dtype="fp16", gpus=2),
    Recipe("cp-bf16-1gpu", torchrun("cp", 1, "none"), needs_gpu=True, compute_dtype="bf16"),
    Recipe("cp-bf16-2gpu", torchrun("cp", 2, "none"), needs_gpu=True, compute_dtype="bf16", gpus=2),
    Recipe("two-pipelines-nf4", torchrun("replicas", 2, "nf4"), needs_gpu=True, compute_dtype="bf16", gpus=2),
    *[Recipe(fluxnb.recipes.PER_SCHEME + name, quantized(name), needs_gpu=name in ("torchao-fp8",)) for name in quant.SCHEMES],
    # notebook 12: FLUX.2 [klein] 4B, its own model (--checkpoint random-dev gives random-klein for these)
    Recipe("klein-bf16", klein_staged(None, None), compute_dtype="bf16", model_id=KLEIN_ID),
    Recipe("klein-fp16", klein_staged(None, None), compute_dtype="fp16", model_id=KLEIN_ID),
    Recipe("klein-nf4", klein_staged(None, "nf4"), model_id=KLEIN_ID),
    Recipe("klein-nf4-encoder4bit", klein_staged("nf4", "nf4"), model_id=KLEIN_ID),
    Recipe("klein-fp16-encoder4bit", klein_staged("nf4", None), compute_dtype="fp16", model_id=KLEIN_ID),  # the T4 path
]}


# --- issue 9: offloading, and the streamed NF4 transformer (notebook 08) --------------------------

EMBEDDINGS_ENV = "FLUXNB_BENCH_EMBEDDINGS"  # saved embeddings: offload rows measure the transformer, not T5
REFERENCE_ENV = "FLUXNB_BENCH_REFERENCE"  # folder for resident NF4's latents, which the streamed rows match
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # the notebooks' setting


def _embeddings(ctx: Context) -> dict[str, torch.Tensor]:
    """The prompt's embeddings: from ``$FLUXNB_BENCH_EMBEDDINGS`` if set (made once by the NF4 T5), else encoded."""
    import os

    path = os.environ.get(EMBEDDINGS_ENV)
    if not path:
        return _encode(ctx, "nf4")
    with ctx.stage("load saved embeddings"):
        embeds, _ = fluxnb.load_embeddings(path)
    return embeds


def _prequantized(ctx: Context) -> str:
    """The NF4 package of the checkpoint (for a stand-in: fluxnb's export, made once, before the timed rows)."""
    from fluxnb.checkpoints import is_stand_in

    kind = is_stand_in(ctx.checkpoint)  # "tiny", "random" or None
    choice = {"tiny": "tiny", "random": "random-dev"}.get(kind or "", ctx.checkpoint)
    return fluxnb.prequantized_checkpoint("black-forest-labs/FLUX.1-dev", ctx.dtype, choice=choice)


def _compare_with_reference(ctx: Context, latents: dict[tuple[int, int], torch.Tensor], save: bool = False) -> None:
    """Save (resident NF4) or compare (every other row) the latents per size, same seed and embeddings."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = os.environ.get(REFERENCE_ENV)
    if not folder:
        return
    path = Path(folder) / f"nf4-resident-latents-{ctx.steps}-steps-{str(ctx.dtype).split('.')[-1]}.safetensors"
    tensors = {f"{h}x{w}": lat.float().cpu().contiguous() for (h, w), lat in latents.items()}
    if save:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return
    if not path.is_file():
        return
    reference = load_file(str(path))
    info = ctx.extra.setdefault("info", {})
    for key, lat in tensors.items():
        if key in reference:
            ref = reference[key]
            info[f"latents_vs_resident_nf4_{key}"] = dict(
                max_abs_diff=float((lat - ref).abs().max()), rel_l2=float((lat - ref).norm() / ref.norm()))


def _denoise_transformer(ctx: Context, load: Callable[[], Any], what: str, save_reference: bool = False,
                         tiled_decode: bool = False) -> Any:
    """Embeddings, then ``load()`` a transformer, the denoising pipeline, every size, decode: one row."""
    embeds = _embeddings(ctx)
    start = time.perf_counter()
    with ctx.stage(f"load {what} + VAE"):
        transformer = load()
        pipe = fluxnb.load_denoising_pipeline(ctx.checkpoint, transformer, ctx.dtype)
    ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
    latents = _denoise_all_sizes(ctx, pipe, embeds)
    _compare_with_reference(ctx, latents, save=save_reference)
    if tiled_decode:  # 512-pixel tiles: FLUX's VAE tiles only images larger than its 1024-pixel sample size
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 512, 64
    _decode_all_sizes(ctx, pipe.vae, latents)
    return pipe


def nf4_resident(ctx: Context) -> None:
    """The NF4 transformer loaded from its saved 4-bit package, resident on the GPU: the reference."""
    _denoise_transformer(ctx, lambda: fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype,
                                                                   prequantized=_prequantized(ctx)),
                         "NF4 transformer (resident)", save_reference=True)


def streamed(resident_blocks: int | str) -> Callable[[Context], None]:
    """The NF4 transformer streamed block by block (``fluxnb.streaming``) from pinned host RAM.

    ``resident_blocks``: how many of the 57 blocks stay on the GPU, or ``"8gb"``: as many as fit a
    7.6 GiB card next to the VAE and a 1024x1024 step (what notebook 03 does on such a card).
    """

    def run(ctx: Context) -> None:
        from fluxnb.stages import load_transformer_streamed
        from fluxnb.streaming import BlockStreamingConfig, get_block_streamer

        def load() -> Any:
            keep = resident_blocks
            if keep == "8gb":  # as notebooks 03-04 do on a 7.6 GiB card: load resident, stream what must go
                from fluxnb.memory import device_used_bytes
                from fluxnb.streaming import blocks_to_keep

                transformer = fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype, prequantized=_prequantized(ctx))
                free = int(ENVELOPES["8gb-card"].vram_gib * GIB) - device_used_bytes() - int(0.16 * GIB)  # the VAE loads next (bf16)
                height, width = max(ctx.sizes, key=lambda hw: hw[0] * hw[1])
                keep = blocks_to_keep(transformer, height, width, free_bytes=free)
                keep = 57 if keep is None else keep
                fluxnb.apply_block_streaming(transformer, BlockStreamingConfig(resident_blocks=keep, device="cuda"))
            else:
                transformer = load_transformer_streamed(ctx.checkpoint, ctx.dtype, _prequantized(ctx), int(keep))
            streamer = get_block_streamer(transformer)
            streamer.profile = True
            ctx.extra.setdefault("info", {}).update(resident_blocks=int(keep), host_gib=round(streamer.host_bytes / GIB, 3),
                                                    slots_gib=round(streamer.device_bytes / GIB, 3))
            return transformer

        pipe = _denoise_transformer(ctx, load, f"NF4 transformer (streamed, {resident_blocks} resident)",
                                    tiled_decode=resident_blocks == 0)
        ctx.extra["info"]["per_block"] = get_block_streamer(pipe.transformer).timings().summary()

    return run


def group_offload(quant: str, offload_type: str, use_stream: bool, from_cpu: bool = False) -> Callable[[Context], None]:
    """diffusers' group offload (``enable_group_offload``) on the transformer, in bf16 or NF4.

    NF4 ``from_cpu``: the 4-bit package loaded into host RAM first (``device_map="cpu"``), so the
    quant states are on the CPU when offloading starts; otherwise the model is quantized on the GPU
    and its quant states are there.
    """

    def run(ctx: Context) -> None:
        from diffusers import FluxTransformer2DModel

        def load() -> Any:
            if quant == "bf16":
                transformer = FluxTransformer2DModel.from_pretrained(ctx.checkpoint, subfolder="transformer",
                                                                     dtype=ctx.dtype, use_safetensors=True)
            elif from_cpu:
                transformer = FluxTransformer2DModel.from_pretrained(_prequantized(ctx), subfolder="transformer",
                                                                     dtype=ctx.dtype, device_map="cpu",
                                                                     use_safetensors=True)
                fluxnb.set_compute_dtype(transformer, ctx.dtype)
            else:
                transformer = fluxnb.load_transformer_4bit(ctx.checkpoint, ctx.dtype)
            kwargs = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
            transformer.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                             offload_type=offload_type, use_stream=use_stream, **kwargs)
            return transformer

        _denoise_transformer(ctx, load, f"{quant} transformer (group offload, {offload_type}, stream={use_stream})")

    return run


def transformer_model_offload(ctx: Context) -> None:
    """The course's model offload (``fluxnb.load_transformer_offload``): the NF4 transformer and VAE."""
    embeds = _embeddings(ctx)
    start = time.perf_counter()
    with ctx.stage("load NF4 transformer + VAE (model offload)"):
        pipe = fluxnb.load_transformer_offload(ctx.checkpoint, ctx.dtype, prequantized=_prequantized(ctx))
    ctx.extra["load_s"] = round(time.perf_counter() - start, 3)
    latents = _denoise_all_sizes(ctx, pipe, embeds)
    _compare_with_reference(ctx, latents)


def vae_tiling(ctx: Context) -> None:
    """Decode a large image (each size) from random latents with the VAE plain, sliced+tiled."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ctx.checkpoint, subfolder="vae", dtype=ctx.dtype, use_safetensors=True).to("cuda")
    for height, width in ctx.sizes:
        latents = torch.randn(1, (height // 16) * (width // 16), 64, generator=torch.Generator().manual_seed(0))
        latents = latents.to("cuda", ctx.dtype)
        vae.disable_tiling()
        for mode in ("plain", "512-pixel tiles"):
            if mode != "plain":  # FLUX's VAE tiles only above its 1024-pixel sample size unless told smaller tiles
                vae.enable_tiling()
                vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
            fluxnb.flush()
            with ctx.stage(f"decode {height}x{width} ({mode})"):
                fluxnb.decode(vae, latents, height, width)


RECIPES.update({r.name: r for r in [
    Recipe("nf4-resident", nf4_resident, needs_gpu=True, env=EXPANDABLE),
    Recipe("nf4-streamed", streamed(0), needs_gpu=True, env=EXPANDABLE),
    Recipe("nf4-streamed-8gb", streamed("8gb"), needs_gpu=True, env=EXPANDABLE),
    Recipe("nf4-model-offload-transformer", transformer_model_offload, needs_gpu=True, env=EXPANDABLE),
    Recipe("bf16-group-offload-block", group_offload("bf16", "block_level", True), needs_gpu=True, env=EXPANDABLE),
    Recipe("nf4-group-offload-block", group_offload("nf4", "block_level", True), needs_gpu=True, env=EXPANDABLE),
    Recipe("nf4-group-offload-block-cpu", group_offload("nf4", "block_level", True, from_cpu=True), needs_gpu=True,
           env=EXPANDABLE),
    Recipe("nf4-group-offload-leaf", group_offload("nf4", "leaf_level", True), needs_gpu=True, env=EXPANDABLE),
    Recipe("vae-tiling", vae_tiling, needs_gpu=True, env=EXPANDABLE),
]})
