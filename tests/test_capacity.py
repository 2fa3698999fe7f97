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


def test_notebook_09_measures_at_a_size_an_8gb_card_holds():
    """Finding 2 of issue 16: 09 ran out of memory on the 8 GB card at 1024x1024, its eager step next to
    all 57 blocks. Its measuring size now fits there by the committed measurements (the NF4 transformer
    and the VAE loaded: benchmarks/results/h100-offload.json), and its recompile sizes need no more."""
    from fluxnb.envelopes import ENVELOPES

    cells = json.loads((REPO / "notebooks" / "09_faster.ipynb").read_text())["cells"]
    parameters = next("".join(c["source"]) for c in cells if "NEW_SIZES =" in "".join(c["source"]))
    height, width = _assigned(parameters, "HEIGHT"), _assigned(parameters, "WIDTH")
    offload = json.loads((REPO / "benchmarks" / "results" / "h100-offload.json").read_text())
    stages = {s["stage"]: s for s in offload["recipes"]["nf4-resident"]["stages"]}
    loaded_device = stages["load NF4 transformer (resident) + VAE"]["vram_device_gib"]  # CUDA context included
    free = ENVELOPES["8gb-card"].vram_gib - loaded_device
    assert capacity.step_bytes(height, width) <= free * GIB, (height, width, free)
    assert capacity.step_bytes(1024, 1024) > free * GIB  # where 09 used to measure: it did not fit
    for h, w in _assigned(parameters, "NEW_SIZES"):
        assert capacity.tokens(h, w) <= capacity.tokens(height, width)
    assert _assigned(parameters, "RUN_WHOLE_MODEL") is False  # the longest compile is opt-in
