"""The recipes: every way to run FLUX that the course teaches or its benchmark measures, in one table.

A *recipe* is a whole way to run FLUX: which models are quantized, where each one lives (resident,
staged one at a time, offloaded, streamed, split over GPUs) and the dtype it computes in; ``family`` says
whether it runs FLUX.1 or FLUX.2 [klein] 4B (notebook 12). Each has the
name of its benchmark row (``bf16-resident``, ``staged-nf4-fp16``, ...; ``benchmarks/recipes.py`` says
how the benchmark runs it), a description, and, where one exists, the copy-paste script in
``recipes/`` that runs the same flow alone. A quantization *scheme* (``bnb-nf4``, ``gguf-q8_0``:
:data:`fluxnb.quantization.SCHEMES`) is something else, how the transformer's weights are stored; the
benchmark's ``quant-<scheme>`` recipes (:data:`PER_SCHEME`) measure the transformer alone with each one,
one recipe per row of :data:`fluxnb.quantization.SCHEMES`, which describes them.

:data:`RECIPES` is read by :mod:`fluxnb.capacity` (what to try next names the recipe's script), by
:mod:`fluxnb.planner` (the script of the recipe it picks) and by the benchmark (each row's
description); ``tests/test_recipes.py`` checks that every script in ``recipes/`` is named here and
that every script named here exists.
"""

from __future__ import annotations

from dataclasses import dataclass

# Notebooks 05-07's recipes, one per quantization scheme: "quant-<scheme>" runs the transformer alone, loaded
# with that scheme of fluxnb.quantization.SCHEMES, which describes it (that registry is their table).
PER_SCHEME = "quant-"



@dataclass(frozen=True)
class Recipe:
    """One way to run FLUX (FLUX.1, or klein where ``family`` says so): its name, what it does, and its
    copy-paste script if it has one."""

    name: str
    description: str
    script: str | None = None  # "recipes/<file>.py", relative to the repository
    in_short: str = ""  # the script in a few words, as an out-of-memory message names it
    measured: bool = True  # False: a script the benchmark does not run (it has no row in the results)
    family: str = "flux1"  # the model it runs, as fluxnb.checkpoints.family_of names it: "flux1" or "klein"


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("bf16-resident", "all components in bf16, resident on the GPU",
           "recipes/all_resident_bf16.py", "everything in bf16 on the GPU"),
    Recipe("staged-nf4", "course flow: NF4 T5 encode, free, NF4 transformer denoise, free, VAE decode"),
    Recipe("staged-nf4-expandable", "the course flow with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
           "recipes/card_8gb_staged_nf4_bf16.py", "staged NF4, bf16: notebooks 01-03"),
    Recipe("staged-nf4-fp16", "the same flow computing in fp16, as on a T4 (no bf16)",
           "recipes/t4_staged_nf4_fp16.py", "staged NF4, fp16: a T4"),
    Recipe("nf4-model-offload", "NF4 T5 + NF4 transformer in one pipeline, enable_model_cpu_offload",
           "recipes/model_cpu_offload.py", "NF4 transformer, model CPU offload: notebook 04"),
    Recipe("prequantized-nf4", "the course flow from a pre-quantized NF4 package on the Hub "
           "(hf-internal-testing/flux.1-dev-nf4-pkg): about 13 GB to download, nothing quantized while loading",
           "recipes/prequantized_from_hub.py", "staged NF4 from a pre-quantized package", measured=False),
    Recipe("staged-int8", "the course flow with bitsandbytes LLM.int8 (8-bit) T5 and transformer"),
    Recipe("nf4-save-reload", "load time: NF4 quantized on the fly vs from a saved NF4 checkpoint"),
    Recipe("staged-nf4-compile", "the course flow, transformer blocks compiled (compile_repeated_blocks, fullgraph)"),
    Recipe("staged-nf4-compile-full", "the course flow, whole transformer compiled (Module.compile, fullgraph)"),
    # notebook 09: step caching
    Recipe("staged-nf4-steps", "the course flow, s/step as the mean over all timed steps (the caches' baseline)"),
    # one per step cache of fluxnb.faster.CACHES (tests/test_recipes.py holds them in step)
    Recipe("staged-nf4-cache-first-block", "the course flow with diffusers' first-block step cache "
           "(threshold on the model's outputs)"),
    Recipe("staged-nf4-cache-magcache", "the course flow with diffusers' magcache step cache "
           "(fixed by the shipped FLUX ratios)"),
    Recipe("staged-nf4-cache-taylorseer", "the course flow with diffusers' taylorseer step cache (fixed schedule)"),
    Recipe("staged-nf4-cache-pab", "the course flow with diffusers' pab step cache (fixed schedule)"),
    Recipe("staged-nf4-cache-fastercache", "the course flow with diffusers' fastercache step cache (fixed schedule)"),
    # notebook 10: two GPUs
    Recipe("split-bf16-2gpu", "encoders balanced, bf16 transformer device_map='auto' over 2 GPUs capped at 16 GiB each, "
           "VAE alone", "recipes/two_gpus.py", "bf16 split over two GPUs: notebook 10"),
    Recipe("split-fp16-kaggle", "Kaggle's 2x T4 shape: NF4 T5 (fp32), fp16 transformer device_map='auto' over 2 GPUs "
           "capped at 14.74 GiB each, VAE alone"),
    Recipe("cp-bf16-1gpu", "bf16 transformer resident, torchrun on 1 GPU (context parallel's baseline)"),
    Recipe("cp-bf16-2gpu", "bf16 transformer on each of 2 GPUs, one image: context parallel "
           "(ContextParallelConfig(ulysses_degree=2))"),
    Recipe("two-pipelines-nf4", "the course's NF4 flow on each of 2 GPUs, two images at once (torchrun)"),
    # notebook 08: offloading, and the streamed NF4 transformer
    Recipe("nf4-resident", "NF4 transformer from the saved 4-bit package, resident (the reference)"),
    Recipe("nf4-streamed", "NF4 transformer, all 57 blocks streamed from pinned host RAM (fluxnb.streaming)"),
    Recipe("nf4-streamed-8gb", "NF4 transformer, as many blocks resident as fit a 7.6 GiB card, the rest streamed"),
    Recipe("nf4-model-offload-transformer", "the course's model offload: NF4 transformer + VAE, enable_model_cpu_offload"),
    Recipe("bf16-group-offload-block", "bf16 transformer, diffusers group offload, block level, with streams"),
    Recipe("nf4-group-offload-block", "NF4 transformer (quantized on the GPU), group offload, block level, streams"),
    Recipe("nf4-group-offload-block-cpu", "NF4 package loaded to host RAM, group offload, block level, streams"),
    Recipe("nf4-group-offload-leaf", "NF4 transformer (quantized on the GPU), group offload, leaf level, streams"),
    Recipe("vae-tiling", "VAE decode, whole image vs enable_tiling() with 512-pixel tiles"),
    # notebook 12: FLUX.2 [klein] 4B
    Recipe("klein-bf16", "FLUX.2 [klein] 4B staged: bf16 Qwen3-4B encode, free, bf16 transformer denoise, free, "
           "VAE decode", family="klein"),
    Recipe("klein-fp16", "FLUX.2 [klein] 4B staged in fp16, as on a T4: Qwen3-4B encode, free, transformer "
           "(unquantized) denoise 4 steps, free, VAE decode", "recipes/t4_flux2_klein_fp16.py",
           "FLUX.2 [klein] 4B, fp16: a T4", family="klein"),
    Recipe("klein-nf4", "FLUX.2 [klein] 4B staged: Qwen3-4B in the compute dtype, NF4 transformer", family="klein"),
    Recipe("klein-nf4-encoder4bit", "FLUX.2 [klein] 4B staged: 4-bit NF4 Qwen3-4B, NF4 transformer", family="klein"),
    Recipe("klein-fp16-encoder4bit", "FLUX.2 [klein] 4B staged in fp16 with a 4-bit NF4 Qwen3-4B",
           family="klein"),
]}


def how_to_run(name: str) -> str:
    """Recipe ``name`` as advice names it: its script and a few words (``recipes/t4_staged_nf4_fp16.py
    (staged NF4, fp16: a T4)``), or its name and description where it has no script."""
    recipe = RECIPES[name]
    if recipe.script is None:
        return f"the {name} recipe ({recipe.description})"
    return f"{recipe.script} ({recipe.in_short})" if recipe.in_short else recipe.script
