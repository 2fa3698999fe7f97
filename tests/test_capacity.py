"""fluxnb.capacity: one memory model, generated from the committed measurements, and its decisions."""

import json
from pathlib import Path

import pytest

from fluxnb import capacity

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def test_the_capacity_data_is_generated_from_the_committed_benchmarks():
    main = json.loads((REPO / "benchmarks" / "results" / "h100.json").read_text())
    offload = json.loads((REPO / "benchmarks" / "results" / "h100-offload.json").read_text())
    assert capacity.from_benchmarks(main, offload) == json.loads(capacity.CAPACITY.read_text()), (
        "fluxnb/results/capacity.json is stale: run python -m fluxnb.capacity")


def test_the_needs_reproduce_the_measured_stages():
    """Each need, added to what was loaded, gives back the allocated peak the benchmark measured."""
    offload = json.loads((REPO / "benchmarks" / "results" / "h100-offload.json").read_text())
    stages = {s["stage"]: s for s in offload["recipes"]["nf4-resident"]["stages"]}
    loaded = stages["load NF4 transformer (resident) + VAE"]["vram_allocated_gib"]
    margin = capacity.MARGIN_GIB
    for h, w in ((1024, 1024), (512, 768)):
        step = capacity.step_bytes(h, w) / GIB - capacity._needs()["step"]["slack_gib"] - margin
        assert abs(loaded + step - stages[f"denoise {h}x{w}"]["vram_allocated_gib"]) < 0.005
        decode = capacity.decode_bytes(h, w) / GIB - capacity._needs()["decode"]["slack_gib"] - margin
        assert abs(loaded + decode - stages[f"decode {h}x{w}"]["vram_allocated_gib"]) < 0.005
    # a whole decode grows with the pixels; one in tiles does not
    assert capacity.decode_bytes(2048, 2048) > 3 * capacity.decode_bytes(1024, 1024, tiled=True)
    assert capacity.decode_bytes(2048, 2048, tiled=True) == capacity.decode_bytes(512, 512, tiled=True)
    # the caches that keep every block's activations need more than those that skip whole steps
    assert capacity.cache_bytes("taylorseer", 1024, 1024) > 2 * GIB > capacity.cache_bytes("magcache", 1024, 1024)


def test_the_studio_at_1024_on_an_8gb_card_must_stream_for_the_decode():
    """Finding 1 of issue 16: the Studio made room for the step only, and the decode next to the
    transformer ran out of memory on the 8 GB card. Its decode needs more than its step."""
    assert capacity.decode_bytes(1024, 1024) > 2.5 * capacity.step_bytes(1024, 1024) / 2
    assert capacity.decode_bytes(1024, 1024) > capacity.step_bytes(1024, 1024) + GIB


def test_the_course_runs_fit_the_estimates():
    """03 at 1024x1024 passed on the 8 GB card by streaming a few blocks; resident it would not fit."""
    assert capacity.estimate_vram_gib("staged-nf4-expandable", 1024, 1024) < 7.6
    assert capacity.estimate_vram_gib("staged-nf4-expandable", 1024, 1024, stream_blocks=False) > 7.6
    assert capacity.largest_size_that_fits("staged-nf4-expandable", 2048, 2048, 7.6)[0] < 2048


def _assigned(source, name):
    """The first value assigned to ``name`` in a notebook cell's source (a literal)."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names = [t.id for t in getattr(target, "elts", [target]) if isinstance(t, ast.Name)]
                if name in names:
                    value = ast.literal_eval(node.value)
                    return value[names.index(name)] if len(names) > 1 else value
    raise KeyError(name)


def test_notebook_09_makes_room_or_skips_instead_of_running_out_of_memory():
    """Finding 2 of issue 16: 09 ran out of memory on the 8 GB card in its first step at 1024x1024, all 57
    blocks resident. Now it measures at a T4's size, asks blocks_to_keep before its first step (streaming
    where the step does not fit), and its compile and cache cells skip, saying why, where blocks stream."""
    cells = ["".join(c["source"]) for c in json.loads((REPO / "notebooks" / "09_faster.ipynb").read_text())["cells"]]
    parameters = next(c for c in cells if "NEW_SIZES =" in c)
    height, width = _assigned(parameters, "HEIGHT"), _assigned(parameters, "WIDTH")
    assert capacity.tokens(height, width) < capacity.tokens(1024, 1024)
    for h, w in _assigned(parameters, "NEW_SIZES"):
        assert capacity.tokens(h, w) <= capacity.tokens(height, width)  # new shapes, no more memory
    assert _assigned(parameters, "RUN_WHOLE_MODEL") is False  # the longest compile is opt-in
    baseline = next(c for c in cells if "eager_first, eager = time_steps" in c)
    assert baseline.index("fluxnb.blocks_to_keep(") < baseline.index("apply_block_streaming(") < baseline.index("time_steps(")
    caches = next(c for c in cells if "cache_rows, reference = [], None" in c)
    assert "keep is not None" in caches and "fluxnb.capacity.cache_bytes(" in caches  # skips what would not fit


def test_compile_says_why_it_cannot_trace_a_streaming_transformer():
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxnb import faster, streaming
    from fluxnb.checkpoints import TINY_TRANSFORMER

    transformer = FluxTransformer2DModel(**dict(TINY_TRANSFORMER, num_layers=1, num_single_layers=2)).eval()
    streaming.apply_block_streaming(transformer, streaming.BlockStreamingConfig(resident_blocks=1, device="cpu"))
    assert "stream from host RAM" in faster.compile_blocker(transformer)
    streaming.remove_block_streaming(transformer)
    assert faster.compile_blocker(transformer) is None  # a plain (not 4-bit) transformer, blocks back: nothing stops it


def test_next_recipe_walks_down_the_ladder_in_a_dtype_the_gpu_has():
    """"What should I try next?" has one answer: the next recipe of SIZE_MODEL_RECIPES that fits, by its script."""
    on_t4 = capacity.next_recipe("bf16-resident", 1024, 1024, 14.74, bf16=False)
    assert on_t4.startswith("recipes/t4_staged_nf4_fp16.py (staged NF4, fp16: a T4), estimated ")  # no bf16 on a T4
    on_ampere = capacity.next_recipe("bf16-resident", 1024, 1024, 14.74, bf16=True)
    assert on_ampere.startswith("recipes/card_8gb_staged_nf4_bf16.py (staged NF4, bf16: notebooks 01-03), estimated ")
    need = capacity.estimate_vram_gib("staged-nf4-expandable", 1024, 1024, stream_blocks=False)
    assert on_ampere.endswith(f"estimated {need:.1f} GiB at 1024x1024")
    nothing = capacity.next_recipe("staged-nf4-fp16", 2048, 2048, 7.6, bf16=False)
    assert nothing.startswith("recipes/model_cpu_offload.py (NF4 transformer, model CPU offload: notebook 04) at ")
    assert nothing.endswith("(no recipe in the course's list fits 2048x2048 here)")
