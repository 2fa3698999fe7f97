"""FLUX.1 on two GPUs (notebook 10): three ways, each for a different reason.

* **Split** (one process): the text encoders spread with ``device_map="balanced"``, the transformer's
  blocks spread with ``device_map="auto"`` and ``max_memory``, the VAE decoding alone. Two 16 GB cards
  (or Kaggle's two T4s) then hold a 16-bit transformer that fits neither alone. It is not faster: one
  GPU waits while the other computes.
* **Context parallelism** (one process per GPU, ``torchrun``): each GPU holds the whole transformer and
  computes half of the image's tokens; diffusers' ``ContextParallelConfig(ulysses_degree=2)`` swaps the
  attention heads between GPUs so each still attends over every token. One image, faster steps.
* **Two pipelines** (one process per GPU, ``torchrun``): each GPU runs the course's NF4 flow on its own
  prompt and seed. Steps are not faster; images per minute double.

    torchrun --nproc_per_node=2 -m fluxnb.multigpu cp --checkpoint CKPT --json out.json
    torchrun --nproc_per_node=2 -m fluxnb.multigpu replicas --checkpoint CKPT --json out.json

:func:`launch` starts those from a notebook or a benchmark and returns rank 0's JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import fluxnb
from fluxnb.lab.supervisor import die_with_parent, module_command, run_process
from fluxnb.memory import GIB, GpuTracker, StepTimer, cap_vram, flush
from fluxnb.quiet import DropMessages

NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- weights per GPU: accelerate's max_memory and device map -----------------------------------------


def max_memory_for(vram_gib: float, headroom_gib: float, gpus: int = 2) -> dict[int, str]:
    """accelerate's ``max_memory``: what each GPU may hold in *weights*, leaving ``headroom_gib`` of a
    ``vram_gib`` card for the CUDA context and the activations of a step."""
    budget = vram_gib - headroom_gib
    if budget <= 0:
        raise ValueError(f"headroom {headroom_gib} GiB leaves nothing of a {vram_gib} GiB card for weights.")
    return {i: f"{budget:.2f}GiB" for i in range(gpus)}


def _empty_transformer(tiny: bool) -> Any:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from fluxnb.checkpoints import FULL_TRANSFORMER, TINY_TRANSFORMER

    with init_empty_weights():
        return FluxTransformer2DModel(**dict(TINY_TRANSFORMER if tiny else FULL_TRANSFORMER, guidance_embeds=True))


def transformer_gib(dtype: torch.dtype = torch.bfloat16, tiny: bool = False) -> float:
    """The transformer's weights in ``dtype``, in GiB (FLUX.1-dev's shapes, or the tiny stand-in's)."""
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(_empty_transformer(tiny), dtype=dtype)[""] / GIB


def planned_device_map(max_memory: dict[int | str, str | int], dtype: torch.dtype = torch.bfloat16,
                       tiny: bool = False) -> dict[str, int | str]:
    """The device map ``device_map="auto"`` gives FLUX's transformer under ``max_memory``, computed the
    way diffusers does it (accelerate balances the budget over the GPUs, then fills them in order) on
    empty (meta) weights: no GPU and no download needed, so it runs anywhere.

    ``tiny``: the tiny stand-in's shapes instead of FLUX.1-dev's.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = _empty_transformer(tiny)
    no_split = model._no_split_modules  # a block never straddles two GPUs
    quiet = logging.getLogger("accelerate.utils.modeling")  # planning for GPUs this machine lacks is the point:
    absent = DropMessages("is not available, available devices are")  # drop accelerate's warning about it
    quiet.addFilter(absent)
    try:
        balanced = get_balanced_memory(model, max_memory=dict(max_memory), dtype=dtype, no_split_module_classes=no_split)
        return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    finally:
        quiet.removeFilter(absent)


def blocks_per_device(device_map: dict[str, Any], transformer_config: dict[str, Any] | None = None) -> dict[str, int]:
    """How many transformer blocks (double + single stream) a device map puts on each device.

    A map may name single blocks (``single_transformer_blocks.7``) or a whole list of them
    (``single_transformer_blocks``): the config's ``num_layers`` / ``num_single_layers`` count those.
    """
    from fluxnb.checkpoints import FULL_TRANSFORMER

    config = transformer_config or FULL_TRANSFORMER
    whole = {"transformer_blocks": config["num_layers"], "single_transformer_blocks": config["num_single_layers"]}
    counts: dict[str, int] = {}
    for name, device in device_map.items():
        parts = name.split(".")
        if parts[0] not in whole:
            continue
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[key] = counts.get(key, 0) + (1 if len(parts) >= 2 else whole[parts[0]])
    return counts


# --- the split: encoders balanced, transformer auto, decode alone -------------------------------------------


def load_text_encoders_split(checkpoint: str, dtype: torch.dtype, max_memory: dict[int, str]) -> Any:
    """CLIP and T5-XXL in ``dtype`` (unquantized), spread over the GPUs with ``device_map="balanced"``."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(checkpoint, transformer=None, vae=None, device_map="balanced",
                                        max_memory=max_memory, dtype=dtype, use_safetensors=True)


def load_transformer_split(checkpoint: str, dtype: torch.dtype, max_memory: dict[int, str]) -> Any:
    """FLUX's transformer in ``dtype`` (unquantized), its blocks spread over the GPUs by
    ``device_map="auto"`` under ``max_memory``; ``transformer.hf_device_map`` says where each went."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer", device_map="auto",
                                                  max_memory=max_memory, dtype=dtype, use_safetensors=True)


def run_split(checkpoint: str, dtype: torch.dtype, vram_gib: float, height: int = 1024, width: int = 1024,
              steps: int = 5, prompt: str = "A cat holding a sign that says hello world", seed: int = 0,
              guidance: float = 3.5, headroom_gib: float = 3.0, nf4_text: bool = False,
              tracker: GpuTracker | None = None) -> dict[str, Any]:
    """The staged flow split over all GPUs, each capped at ``vram_gib``: encode, free, denoise, free, decode.

    ``nf4_text``: encode with the course's NF4 T5 on one GPU instead of spreading a 16-bit T5 (on T4s,
    whose fp16 overflows in T5, the text encoders compute in fp32; an fp32 T5 is 19 GB). Returns s/step,
    the device map's blocks per GPU, per-GPU peaks per stage, and whether the latents are finite.
    """
    tracker = tracker or GpuTracker()
    contexts = cap_vram(vram_gib)
    max_memory = max_memory_for(vram_gib, headroom_gib, torch.cuda.device_count())
    text_dtype = torch.float32 if dtype == torch.float16 else dtype
    with tracker.stage("encode"):
        if nf4_text:
            encoders = fluxnb.load_text_encoders_4bit(checkpoint, text_dtype)
        else:
            encoders = load_text_encoders_split(checkpoint, text_dtype, max_memory)
        placement = {name: str(getattr(encoders, name).device) for name in ("text_encoder", "text_encoder_2")}
        embeds = {k: v.detach() for k, v in fluxnb.encode_prompt(encoders, prompt).items()}
        del encoders
        flush()
    with tracker.stage("load transformer (split)"):
        transformer = load_transformer_split(checkpoint, dtype, max_memory)
        pipe = fluxnb.load_denoising_pipeline(checkpoint, transformer, dtype)
    device_map = dict(transformer.hf_device_map)
    blocks = blocks_per_device(device_map, dict(transformer.config))  # now: the transformer is freed before decoding
    off_gpu = sorted({str(d) for d in device_map.values() if str(d) in ("cpu", "disk")})
    if off_gpu:
        raise RuntimeError(f"the transformer does not fit {max_memory} on the GPUs: accelerate put part of it on "
                           f"{', '.join(off_gpu)}. Lower headroom_gib, or compute in fewer bytes (NF4, notebook 02).")
    with tracker.stage("warm-up"):
        fluxnb.denoise(pipe, embeds, height, width, 1, guidance, seed)
    timer = StepTimer()
    with tracker.stage(f"denoise {height}x{width}"):
        latents = fluxnb.denoise(pipe, embeds, height, width, steps, guidance, seed, step_timer=timer)
    vae = pipe.vae
    with tracker.stage("free transformer"):
        del pipe, transformer
        flush()
    with tracker.stage("decode (VAE alone)"):
        image = fluxnb.decode(vae, latents, height, width)
    return dict(dtype=str(dtype).replace("torch.", ""), text_dtype=str(text_dtype).replace("torch.", ""),
                vram_cap_gib=vram_gib, cuda_context_gib=contexts, max_memory=max_memory, text_encoders=placement,
                device_map=device_map, blocks_per_gpu=blocks, s_per_step=timer.seconds_per_step,
                step_s=timer.step_seconds, latents_finite=bool(torch.isfinite(latents).all()), stages=tracker.records,
                per_gpu_peaks_gib=tracker.peaks(), image=image)


# --- one process per GPU: context parallelism and two pipelines -----------------------------------------------


def _init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group: NCCL on this rank's own GPU, or gloo on the CPU where there is no
    GPU (the tiny checkpoint's test of this code; diffusers' context parallelism itself needs an
    accelerator, see tests/test_faster_multigpu.py)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"rank {rank} needs GPU {local_rank} but this machine has {torch.cuda.device_count()}: "
                           "start torchrun with --nproc_per_node at most the number of GPUs.")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)  # bitsandbytes and execution_device() use the current device
    dist.init_process_group("nccl", device_id=device)
    return rank, world, device


def _load_transformer(checkpoint: str, dtype: torch.dtype, quant: str, device: torch.device) -> Any:
    if quant == "nf4":
        return fluxnb.load_transformer_4bit(checkpoint, dtype)  # bitsandbytes loads onto the current device
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer", dtype=dtype,
                                                  use_safetensors=True).to(device)


def worker(mode: str, checkpoint: str, dtype: torch.dtype, quant: str, height: int, width: int, steps: int,
           seed: int, json_path: Path, prompt: str = "A cat holding a sign that says hello world",
           save_latents: bool = False) -> None:
    """One rank of ``torchrun``: ``cp`` (all ranks denoise one image together) or ``replicas`` (each
    rank its own image, seed ``seed + rank``). Rank 0 gathers every rank's numbers into ``json_path``
    (and, with ``save_latents``, its latents into the same name ending ``.safetensors``).

    Every rank runs the whole pipeline call with the same embeddings and seed: context parallelism
    splits the tokens inside the transformer, so the inputs must be identical on every rank."""
    import torch.distributed as dist

    die_with_parent()  # if torchrun is killed, this rank goes too
    rank, world, device = _init_distributed()
    fluxnb.allow_bitsandbytes_on_cpu()  # no-op on a GPU; lets the NF4 T5 load on a CPU rank (tiny checkpoint)
    on_gpu = device.type == "cuda"
    context_gib = 0.0
    if on_gpu:  # only this rank's own GPU is queried: asking about another would open a context there too
        torch.zeros(1, device=device)  # this process's CUDA context exists now: measure it once
        free, total = torch.cuda.mem_get_info(device)
        context_gib = (total - free) / GIB  # device-level: any other process on this GPU is counted too
    text_dtype = torch.float32 if dtype == torch.float16 else dtype
    start = time.perf_counter()
    encoders = fluxnb.load_text_encoders_4bit(checkpoint, text_dtype)
    embeds = {k: v.detach() for k, v in fluxnb.encode_prompt(encoders, prompt).items()}
    del encoders
    flush()
    pipe = fluxnb.load_denoising_pipeline(checkpoint, _load_transformer(checkpoint, dtype, quant, device), dtype)
    if mode == "cp" and world > 1:
        from diffusers import ContextParallelConfig

        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    load_s = time.perf_counter() - start
    image_seed = seed + rank if mode == "replicas" else seed  # context parallel: every rank the same noise
    warm = time.perf_counter()
    fluxnb.denoise(pipe, embeds, height, width, 1, 3.5, image_seed)
    warmup_s = time.perf_counter() - warm
    dist.barrier()
    timer = StepTimer()
    wall = time.perf_counter()
    latents = fluxnb.denoise(pipe, embeds, height, width, steps, 3.5, image_seed, step_timer=timer)
    dist.barrier()
    wall_s = time.perf_counter() - wall
    mine = dict(rank=rank, device=str(device), s_per_step=timer.seconds_per_step, step_s=timer.step_seconds,
                wall_s=wall_s, warmup_s=warmup_s, load_s=load_s, latents_finite=bool(torch.isfinite(latents).all()),
                # the whole run's peak on this GPU: what was in use when it started (its CUDA context) plus the
                # most its allocator ever reserved
                vram_device_gib=round(context_gib + torch.cuda.max_memory_reserved(device) / GIB, 3) if on_gpu else None,
                vram_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3) if on_gpu else None)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        images = world if mode == "replicas" else 1
        result = dict(mode=mode, world_size=world, dtype=str(dtype).replace("torch.", ""), quant=quant,
                      height=height, width=width, steps=steps,
                      gpu=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                      s_per_step=max(r["s_per_step"] for r in everyone), images_at_once=images,
                      latents_finite=all(r["latents_finite"] for r in everyone),
                      per_gpu_peaks_gib={r["device"]: r["vram_device_gib"] for r in everyone}, ranks=everyone)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        if save_latents:
            save_file({"latents": latents.detach().float().cpu().contiguous()}, str(json_path.with_suffix(".safetensors")))
    dist.barrier()  # every rank leaves together: none closes its connections while another still uses them
    dist.destroy_process_group()


def launch(mode: str, nproc: int, checkpoint: str, json_path: str | Path, dtype: str = "bf16", quant: str = "none",
           height: int = 1024, width: int = 1024, steps: int = 5, seed: int = 0, timeout_s: int = 500) -> dict[str, Any]:
    """Run :func:`worker` on ``nproc`` GPUs with ``torchrun`` (one process each); return rank 0's result.

    Raises ``RuntimeError`` with the end of the ranks' output if they fail or run past ``timeout_s``
    (then torchrun and every rank are killed, so no rank is left holding a GPU).

    The ranks are ``python -m fluxnb.multigpu`` run by this interpreter, in this folder, with this
    process's environment: they import fluxnb as the notebook does (on Kaggle: the one the setup cell
    installed). ``json_path`` is made absolute and its folder created, so rank 0 writes where it was asked:
    ``fluxnb.output_dir(...)`` is ``/kaggle/working/outputs/...`` on Kaggle, which Kaggle keeps with the
    notebook's version. A Hub token that :func:`fluxnb.environment.find_hub_token` read from a Colab or
    Kaggle secret is in that environment as ``HF_TOKEN``: no library reads those secrets in a rank.
    """
    json_path = Path(json_path).expanduser().absolute()
    json_path.unlink(missing_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if not Path(checkpoint).is_dir():
        fluxnb.find_hub_token()  # a token from a notebook secret becomes HF_TOKEN, which the ranks inherit
    cmd = module_command("torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                         "-m", "fluxnb.multigpu", mode, "--checkpoint", checkpoint, "--json", str(json_path), "--dtype",
                         dtype, "--quant", quant, "--size", f"{height}x{width}", "--steps", str(steps), "--seed", str(seed))
    # torchrun starts each rank in a session of its own, so only torchrun can end them: it does on SIGTERM. It
    # asks for SIGTERM when this process dies (a runner's timeout), and gets it at our own timeout, then SIGKILL
    # 60 s later; the ranks die with it then (each asked for SIGKILL at torchrun's death, in worker()).
    done = run_process(cmd, timeout_s, env={**os.environ, **NCCL_SAFE_ENV}, output="all",
                       parent_death_signal=signal.SIGTERM, stop_grace_s=60)
    if done.timed_out:
        raise RuntimeError(f"torchrun {mode} on {nproc} processes ran past {timeout_s} s and was stopped with its "
                           f"ranks; its output:\n{failure_excerpt(done.output)}")
    if done.returncode != 0 or not json_path.is_file():
        raise RuntimeError(f"torchrun {mode} on {nproc} processes exited {done.returncode}:\n{failure_excerpt(done.output)}")
    return json.loads(json_path.read_text())


_FIRST_FAILURE_MARKS = ("terminate called", "Fatal Python error", "Traceback (most recent call last)")


def failure_excerpt(output: str, chars: int = 6000) -> str:
    """What a failed torchrun printed, cut to ``chars``: the first rank's own failure (a C++ ``terminate``,
    a ``Fatal Python error`` with its Python stacks, or a traceback) and then the end of the output.

    torchrun appends a long summary after a rank dies, so the end alone often hides why it died."""
    if len(output) <= chars:
        return output
    starts = [i for i in (output.find(mark) for mark in _FIRST_FAILURE_MARKS) if i >= 0]
    if not starts:
        return output[-chars:]
    first = min(starts)
    half = chars // 2
    if first + half >= len(output) - half:
        return output[first:][-chars:]
    return f"{output[first:first + half]}\n[... {len(output) - first - 2 * half} characters left out ...]\n{output[-half:]}"


def _record(fn: Any) -> Any:
    """torchrun's ``@record``: a rank's exception goes into torchrun's failure summary, at the end of the
    output that :func:`launch` shows (else only "To enable traceback see ...")."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m fluxnb.multigpu", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["cp", "replicas"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quant", choices=["none", "nf4"], default="none", help="transformer weights")
    parser.add_argument("--size", default="1024x1024", help="height x width")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-latents", action="store_true", help="rank 0's latents next to --json")
    ns = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("start it with torchrun (one process per GPU): torchrun --nproc_per_node=2 -m fluxnb.multigpu ...")
    height, _, width = ns.size.partition("x")
    worker(ns.mode, ns.checkpoint, DTYPES[ns.dtype], ns.quant, int(height), int(width), ns.steps, ns.seed, ns.json,
           save_latents=ns.save_latents)
    return 0


if __name__ == "__main__":
    sys.exit(_record(main)())
