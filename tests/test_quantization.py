"""fluxnb.quantization on the tiny checkpoint: recipes load and run, GGUF files are right, metrics are honest."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fluxnb
from fluxnb import quantization as Q

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny())


@pytest.fixture(scope="module")
def reference(tiny):
    inputs = Q.fixed_inputs(tiny, 128, 128, 32)
    return inputs, Q.transformer_output(Q.load_transformer(tiny, "bf16", torch.float32), inputs)


def test_relative_error_is_zero_for_identical_outputs_and_scales_with_the_difference():
    ref = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    assert Q.relative_error(ref.clone(), ref) == 0.0
    assert Q.relative_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-4)  # ref * 1.01 is rounded to float32
    assert Q.relative_error(torch.zeros_like(ref), ref) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        Q.relative_error(ref[:1], ref)
    with pytest.raises(ValueError, match="non-zero"):
        Q.relative_error(ref, torch.zeros_like(ref))


def test_image_metrics_identical_and_different_images():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(np.clip(np.asarray(a).astype(int) + rng.integers(-20, 21, (64, 64, 3)), 0, 255).astype(np.uint8))
    same = Q.image_metrics(a, a)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5) and same["psnr_db"] > 80
    near = Q.image_metrics(b, a)
    assert 15 < near["psnr_db"] < 40 and near["ssim"] < 0.99
    with pytest.raises(ValueError, match="sizes differ"):
        Q.image_metrics(a.resize((32, 32)), a)


def test_fixed_inputs_are_seeded_and_shaped(tiny):
    a, b = Q.fixed_inputs(tiny, 128, 64, 16, seed=3), Q.fixed_inputs(tiny, 128, 64, 16, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["hidden_states"].shape == (1, (128 // 16) * (64 // 16), 64)
    assert a["encoder_hidden_states"].shape[1] == 16 and a["txt_ids"].shape == (16, 3)
    assert not torch.equal(a["hidden_states"], Q.fixed_inputs(tiny, 128, 64, 16, seed=4)["hidden_states"])


@pytest.mark.parametrize("recipe", ["bnb-int8", "bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "torchao-int8wo", "quanto-int8",
                                    "quanto-fp8", "fp8-layerwise"])
def test_every_cpu_recipe_runs_shrinks_the_weights_and_stays_close(tiny, reference, recipe):
    inputs, ref = reference
    model = Q.load_transformer(tiny, recipe, torch.float32)
    err = Q.relative_error(Q.transformer_output(model, inputs), ref)
    assert 0 < err < 0.3, f"{recipe}: relative error {err}"
    full = Q.weight_bytes(Q.load_transformer(tiny, "bf16", torch.float32))
    assert Q.weight_bytes(model) < 0.6 * full, f"{recipe}: weights not smaller"


def test_four_bits_err_more_than_eight(tiny, reference):
    inputs, ref = reference
    err = {r: Q.relative_error(Q.transformer_output(Q.load_transformer(tiny, r, torch.float32), inputs), ref)
           for r in ("bnb-int8", "bnb-nf4", "torchao-int8wo")}
    assert err["bnb-int8"] < err["bnb-nf4"] and err["torchao-int8wo"] < err["bnb-nf4"]


def test_double_quantization_shrinks_the_scales(tiny):
    import bitsandbytes as bnb

    def scales(model):
        states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return sum(s.absmax.numel() * s.absmax.element_size() for s in states), states

    plain, plain_states = scales(Q.load_transformer(tiny, "bnb-nf4", torch.float32))
    double, double_states = scales(Q.load_transformer(tiny, "bnb-nf4-dq", torch.float32))
    assert all(s.nested for s in double_states) and not any(s.nested for s in plain_states)
    assert double * 4 == plain  # fp32 absmax -> uint8 absmax


def test_gguf_files_q8_errs_less_than_q4_and_match_ggufs_own_quantizer(tiny, reference, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from safetensors import safe_open

    inputs, ref = reference
    err = {}
    for qtype in Q.GGUF_TYPES:
        path = Q.make_gguf(tiny, tmp_path / f"t-{qtype}.gguf", qtype)
        tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
        key = "transformer_blocks.0.attn.to_q.weight"
        assert tensors[key].tensor_type == GGMLQuantizationType[qtype]
        shard = sorted((Path(tiny) / "transformer").glob("*.safetensors"))[0]
        with safe_open(str(shard), framework="pt") as f:
            expected = quants.quantize(f.get_tensor(key).float().numpy(), GGMLQuantizationType[qtype])
        assert np.array_equal(np.asarray(tensors[key].data).reshape(expected.shape), expected)
        assert tensors["norm_out.linear.bias"].tensor_type == GGMLQuantizationType.F32  # 1-D: kept in float
        model = Q.load_transformer(tiny, f"gguf-{qtype.lower()}", torch.float32, gguf_folder=tmp_path / "g")
        err[qtype] = Q.relative_error(Q.transformer_output(model, inputs), ref)
    assert 0 < err["Q8_0"] < err["Q4_0"] < 0.3, err
    with pytest.raises(ValueError, match="cannot make"):
        Q.make_gguf(tiny, tmp_path / "k.gguf", "Q4_K")


def test_make_gguf_reuses_a_file_of_the_same_source_and_type(tiny, tmp_path):
    path = Q.make_gguf(tiny, tmp_path / "a.gguf", "Q8_0")
    stamp = path.stat().st_mtime_ns
    assert Q.make_gguf(tiny, tmp_path / "a.gguf", "Q8_0").stat().st_mtime_ns == stamp
    assert json.loads(path.with_suffix(".json").read_text())["qtype"] == "Q8_0"


def test_slice_keeps_the_first_blocks_with_their_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    folder = Q.slice_checkpoint(tiny, tmp_path / "s", 1, 0)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"]) == (1, 0)
    sliced = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("single_transformer_blocks.") for k in sliced)
    original = Q.load_transformer(tiny, "bf16", torch.float32).state_dict()
    assert torch.equal(sliced["transformer_blocks.0.attn.to_q.weight"], original["transformer_blocks.0.attn.to_q.weight"])
    model = Q.load_transformer(folder, "bf16", torch.float32)
    assert len(model.single_transformer_blocks) == 0 and Q.parameter_count(folder) < Q.parameter_count(tiny)
    with pytest.raises(ValueError, match="asked for 5"):
        Q.slice_checkpoint(tiny, tmp_path / "t", 5, 0)


def test_a_missing_backend_or_gpu_is_reported_clearly(monkeypatch):
    real_find_spec = Q.find_spec
    monkeypatch.setattr(Q, "find_spec", lambda name: None if name == "optimum" else real_find_spec(name))
    assert "pip install optimum-quanto" in Q.recipe_problem("quanto-int8")
    with pytest.raises(Q.BackendUnavailable, match="optimum-quanto"):
        Q.load_transformer("unused", "quanto-int8", torch.float32)
    assert "no CUDA GPU" in (Q.recipe_problem("torchao-fp8") or "") or torch.cuda.get_device_capability() >= (8, 9)
    with pytest.raises(KeyError, match="unknown recipe"):
        Q.recipe_problem("int3")
    out = Q.run_all(["quanto-int8", "bnb-nf4"], lambda name: {"ran": name})
    assert out == {"quanto-int8": {"skipped": Q.recipe_problem("quanto-int8")}, "bnb-nf4": {"ran": "bnb-nf4"}}


def test_run_all_shows_a_failure_and_strict_raises_it():
    def boom(name):
        raise RuntimeError("kernel missing")

    assert Q.run_all(["bnb-nf4"], boom) == {"bnb-nf4": {"error": "RuntimeError: kernel missing"}}
    with pytest.raises(RuntimeError, match="kernel missing"):
        Q.run_all(["bnb-nf4"], boom, strict=True)


def test_guessing_game_reveals_the_answers_and_the_metrics():
    images = {n: Image.new("RGB", (32, 32), c) for n, c in [("bf16", "red"), ("bnb-nf4", "blue")]}
    metrics = {"bf16": dict(relative_error=0.0, psnr_db=float("inf"), ssim=1.0),
               "bnb-nf4": dict(relative_error=0.1234, psnr_db=20.5, ssim=0.5)}
    game = Q.guessing_game(images, metrics)
    game.guesses["bf16"].value = "bf16"
    game.guesses["bnb-nf4"].value = "bf16"
    game.reveal()
    html = game.children[-1].value
    assert "1 of 2 right" in html and "0.1234" in html and "20.5" in html


def test_committed_table_says_when_there_is_none(tmp_path):
    assert "No GPU quantization results are committed yet" in Q.committed_table(tmp_path)
    (tmp_path / "quant-h100.md").write_text("| recipe |\n")
    assert Q.committed_table(tmp_path) == "| recipe |"


def test_benchmark_rows_compare_with_the_bf16_reference_of_the_same_command(tiny, tmp_path, monkeypatch):
    from benchmarks import report, worker
    from benchmarks.recipes import quant_reference_path

    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "cache"))
    missing = worker.run("quant-bnb-nf4", tiny, [(32, 32)], steps=1)
    assert not missing["ok"] and "put quant-bf16 first" in missing["error"]
    ref = worker.run("quant-bf16", tiny, [(32, 32)], steps=1)
    assert ref["ok"] and ref["relative_error"] == 0.0 and quant_reference_path(tiny, torch.float32).is_file()
    nf4 = worker.run("quant-bnb-nf4", tiny, [(32, 32), (16, 32)], steps=1)
    assert nf4["ok"] and 0 < nf4["relative_error"] < 0.3 and nf4["weight_gib"] < ref["weight_gib"]
    assert [(s["height"], s["width"]) for s in nf4["sizes"]] == [(32, 32), (16, 32)] and nf4["load_s"] > 0
    assert nf4["backend"].startswith("bitsandbytes 0.") and ref["backend"] == "diffusers"
    results = {"provenance": dict(gpu="CPU only", stand_in="tiny", date="2026-11-22", driver="-", command="test",
                                  libraries=dict(torch="t", diffusers="d", transformers="t", bitsandbytes="b",
                                                 accelerate="a")),
               "recipes": {"quant-bf16": ref, "quant-bnb-nf4": nf4, "staged-nf4": {"recipe": "staged-nf4"},
                           "quant-torchao-fp8": dict(recipe="quant-torchao-fp8", skipped="needs a GPU")}}
    table = report.quant_table(results)
    assert table.count("\n| quant-") == len(Q.RECIPES) and "staged-nf4" not in table  # one row per recipe
    assert table.count("not measured in these runs") == len(Q.RECIPES) - 3  # the ones with no result say so
    assert "| quant-gguf-q8_0 | - |" in table
    assert f"{nf4['relative_error']:.4f}" in table and "skipped: needs a GPU" in table
    assert "s/step 32x32 | s/step 16x32" in table
    assert report.quant_table({"recipes": {}}) == ""


def test_quanto_fp8_is_skipped_where_its_kernel_would_be_compiled_first(monkeypatch):
    """On sm80+ quanto compiles its fp8 Marlin kernel on first use (killed a 12 GiB VM on the H100): skip it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv("FLUXNB_BUILD_QUANTO_KERNELS", raising=False)
    problem = Q.quanto_kernel_problem()
    assert problem and "sm90" in problem and "FLUXNB_BUILD_QUANTO_KERNELS=1" in problem
    assert Q.recipe_problem("quanto-fp8") == problem
    assert Q.recipe_problem("quanto-int8") is None  # int8 weights never use that kernel
    assert [name for name, r in Q.RECIPES.items() if r.check is not None] == ["quanto-fp8"]
    monkeypatch.setenv("FLUXNB_BUILD_QUANTO_KERNELS", "1")
    assert Q.quanto_kernel_problem() is None
    monkeypatch.delenv("FLUXNB_BUILD_QUANTO_KERNELS")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4: no Marlin path
    assert Q.quanto_kernel_problem() is None
