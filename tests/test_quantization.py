"""fluxnb.quantization on the tiny checkpoint: schemes load and run, GGUF files are right, metrics are honest."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fluxnb
from fluxnb import quant_configs
from fluxnb import gguf_export, slices
from fluxnb import quant_metrics as M
from fluxnb import quantization as Q

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny())


@pytest.fixture(scope="module")
def reference(tiny):
    inputs = M.fixed_inputs(tiny, 128, 128, 32)
    return inputs, M.transformer_output(Q.load_transformer(tiny, "bf16", torch.float32), inputs)


def test_relative_error_is_zero_for_identical_outputs_and_scales_with_the_difference():
    ref = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    assert M.relative_error(ref.clone(), ref) == 0.0
    assert M.relative_error(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-4)  # ref * 1.01 is rounded to float32
    assert M.relative_error(torch.zeros_like(ref), ref) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        M.relative_error(ref[:1], ref)
    with pytest.raises(ValueError, match="non-zero"):
        M.relative_error(ref, torch.zeros_like(ref))


def test_image_metrics_identical_and_different_images():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(np.clip(np.asarray(a).astype(int) + rng.integers(-20, 21, (64, 64, 3)), 0, 255).astype(np.uint8))
    same = M.image_metrics(a, a)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5) and same["psnr_db"] > 80
    near = M.image_metrics(b, a)
    assert 15 < near["psnr_db"] < 40 and near["ssim"] < 0.99
    with pytest.raises(ValueError, match="sizes differ"):
        M.image_metrics(a.resize((32, 32)), a)


def test_fixed_inputs_are_seeded_and_shaped(tiny):
    a, b = M.fixed_inputs(tiny, 128, 64, 16, seed=3), M.fixed_inputs(tiny, 128, 64, 16, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["hidden_states"].shape == (1, (128 // 16) * (64 // 16), 64)
    assert a["encoder_hidden_states"].shape[1] == 16 and a["txt_ids"].shape == (16, 3)
    assert not torch.equal(a["hidden_states"], M.fixed_inputs(tiny, 128, 64, 16, seed=4)["hidden_states"])


@pytest.mark.parametrize("scheme", ["bnb-int8", "bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "torchao-int8wo", "quanto-int8",
                                    "quanto-fp8", "fp8-layerwise"])
def test_every_cpu_scheme_runs_shrinks_the_weights_and_stays_close(tiny, reference, scheme):
    inputs, ref = reference
    model = Q.load_transformer(tiny, scheme, torch.float32)
    err = M.relative_error(M.transformer_output(model, inputs), ref)
    assert 0 < err < 0.3, f"{scheme}: relative error {err}"
    full = M.weight_bytes(Q.load_transformer(tiny, "bf16", torch.float32))
    assert M.weight_bytes(model) < 0.6 * full, f"{scheme}: weights not smaller"


def test_four_bits_err_more_than_eight(tiny, reference):
    inputs, ref = reference
    err = {r: M.relative_error(M.transformer_output(Q.load_transformer(tiny, r, torch.float32), inputs), ref)
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
    for qtype in gguf_export.GGUF_TYPES:
        path = gguf_export.make_gguf(tiny, tmp_path / f"t-{qtype}.gguf", qtype)
        tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
        key = "transformer_blocks.0.attn.to_q.weight"
        assert tensors[key].tensor_type == GGMLQuantizationType[qtype]
        shard = sorted((Path(tiny) / "transformer").glob("*.safetensors"))[0]
        with safe_open(str(shard), framework="pt") as f:
            expected = quants.quantize(f.get_tensor(key).float().numpy(), GGMLQuantizationType[qtype])
        assert np.array_equal(np.asarray(tensors[key].data).reshape(expected.shape), expected)
        assert tensors["norm_out.linear.bias"].tensor_type == GGMLQuantizationType.F32  # 1-D: kept in float
        model = Q.load_transformer(tiny, f"gguf-{qtype.lower()}", torch.float32, gguf_folder=tmp_path / "g")
        err[qtype] = M.relative_error(M.transformer_output(model, inputs), ref)
    assert 0 < err["Q8_0"] < err["Q4_0"] < 0.3, err
    with pytest.raises(ValueError, match="cannot make"):
        gguf_export.make_gguf(tiny, tmp_path / "k.gguf", "Q4_K")


def test_make_gguf_reuses_a_file_of_the_same_source_and_type(tiny, tmp_path):
    path = gguf_export.make_gguf(tiny, tmp_path / "a.gguf", "Q8_0")
    stamp = path.stat().st_mtime_ns
    assert gguf_export.make_gguf(tiny, tmp_path / "a.gguf", "Q8_0").stat().st_mtime_ns == stamp
    assert json.loads(path.with_suffix(".json").read_text())["qtype"] == "Q8_0"


def test_slice_keeps_the_first_blocks_with_their_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    folder = slices.slice_checkpoint(tiny, tmp_path / "s", 1, 0)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"]) == (1, 0)
    sliced = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("single_transformer_blocks.") for k in sliced)
    original = Q.load_transformer(tiny, "bf16", torch.float32).state_dict()
    assert torch.equal(sliced["transformer_blocks.0.attn.to_q.weight"], original["transformer_blocks.0.attn.to_q.weight"])
    model = Q.load_transformer(folder, "bf16", torch.float32)
    assert len(model.single_transformer_blocks) == 0 and slices.parameter_count(folder) < slices.parameter_count(tiny)
    with pytest.raises(ValueError, match="asked for 5"):
        slices.slice_checkpoint(tiny, tmp_path / "t", 5, 0)


def test_a_missing_backend_or_gpu_is_reported_clearly(monkeypatch):
    real_find_spec = Q.find_spec
    monkeypatch.setattr(Q, "find_spec", lambda name: None if name == "optimum" else real_find_spec(name))
    assert "pip install optimum-quanto" in Q.scheme_problem("quanto-int8")
    with pytest.raises(Q.BackendUnavailable, match="optimum-quanto"):
        Q.load_transformer("unused", "quanto-int8", torch.float32)
    assert "no CUDA GPU" in (Q.scheme_problem("torchao-fp8") or "") or torch.cuda.get_device_capability() >= (8, 9)
    with pytest.raises(KeyError, match="unknown quantization scheme"):
        Q.scheme_problem("int3")
    out = Q.run_all(["quanto-int8", "bnb-nf4"], lambda name: {"ran": name})
    assert out == {"quanto-int8": {"skipped": Q.scheme_problem("quanto-int8")}, "bnb-nf4": {"ran": "bnb-nf4"}}


def test_run_all_shows_a_failure_and_strict_raises_it():
    def boom(name):
        raise RuntimeError("kernel missing")

    assert Q.run_all(["bnb-nf4"], boom) == {"bnb-nf4": {"error": "RuntimeError: kernel missing"}}
    with pytest.raises(RuntimeError, match="kernel missing"):
        Q.run_all(["bnb-nf4"], boom, strict=True)


def test_committed_table_says_when_there_is_none(tmp_path):
    assert "No GPU quantization results are committed yet" in M.committed_table(tmp_path)
    (tmp_path / "quant-h100.md").write_text("| recipe |\n")
    assert M.committed_table(tmp_path) == "| recipe |"


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
    assert table.count("\n| quant-") == len(Q.SCHEMES) and "staged-nf4" not in table  # one row per recipe
    assert table.count("not measured in these runs") == len(Q.SCHEMES) - 3  # the ones with no result say so
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
    assert Q.scheme_problem("quanto-fp8") == problem
    assert Q.scheme_problem("quanto-int8") is None  # int8 weights never use that kernel
    assert [name for name, r in Q.SCHEMES.items() if r.check is not None] == ["quanto-fp8"]
    monkeypatch.setenv("FLUXNB_BUILD_QUANTO_KERNELS", "1")
    assert Q.quanto_kernel_problem() is None
    monkeypatch.delenv("FLUXNB_BUILD_QUANTO_KERNELS")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))  # a T4: no Marlin path
    assert Q.quanto_kernel_problem() is None


# --- the schemes' configs: one builder each, and the notebooks write the same ones out ----------------

def _builders_expected():
    from diffusers import BitsAndBytesConfig, GGUFQuantizationConfig, QuantoConfig, TorchAoConfig
    from sdnq import SDNQConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    def bnb4(quant_type, double):
        return lambda c, dtype: (c.load_in_4bit and not c.load_in_8bit and c.bnb_4bit_quant_type == quant_type
                                 and c.bnb_4bit_compute_dtype == dtype and c.bnb_4bit_use_double_quant is double)

    return {
        "bnb-int8": (BitsAndBytesConfig, lambda c, dtype: c.load_in_8bit and not c.load_in_4bit
                     and c.llm_int8_threshold == 6.0 and c.llm_int8_skip_modules is None),
        "bnb-nf4": (BitsAndBytesConfig, bnb4("nf4", False)),
        "bnb-fp4": (BitsAndBytesConfig, bnb4("fp4", False)),
        "bnb-nf4-dq": (BitsAndBytesConfig, bnb4("nf4", True)),
        "torchao-int8wo": (TorchAoConfig, lambda c, dtype: type(c.quant_type) is Int8WeightOnlyConfig),
        "torchao-fp8": (TorchAoConfig, lambda c, dtype: type(c.quant_type) is Float8DynamicActivationFloat8WeightConfig
                        and all(isinstance(g, PerRow) for g in c.quant_type.granularity)),
        "quanto-int8": (QuantoConfig, lambda c, dtype: c.weights_dtype == "int8"),
        "quanto-fp8": (QuantoConfig, lambda c, dtype: c.weights_dtype == "float8"),
        "gguf-q8_0": (GGUFQuantizationConfig, lambda c, dtype: c.compute_dtype == dtype),
        "gguf-q4_0": (GGUFQuantizationConfig, lambda c, dtype: c.compute_dtype == dtype),
        "sdnq-int8": (SDNQConfig, lambda c, dtype: c.weights_dtype == "int8"),
    }


def test_the_table_has_one_builder_per_scheme_and_none_for_the_unquantized():
    assert list(quant_configs.CONFIGS) == list(Q.SCHEMES)  # the same schemes, in the same order
    assert [r for r, b in quant_configs.CONFIGS.items() if b is None] == ["bf16", "fp8-layerwise"]
    assert set(_builders_expected()) == {r for r, b in quant_configs.CONFIGS.items() if b is not None}
    with pytest.raises(KeyError, match="unknown quantization scheme"):
        quant_configs.build("int3", torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", sorted(_builders_expected()))
def test_every_builder_returns_its_librarys_config_with_the_schemes_options(scheme, dtype):
    cls, right = _builders_expected()[scheme]
    config = quant_configs.build(scheme, dtype)
    assert type(config) is cls, f"{scheme}: {type(config).__name__}"
    assert right(config, dtype), f"{scheme}: {config.to_dict()}"
    assert quant_configs.build("bf16", dtype) is None and quant_configs.build("fp8-layerwise", dtype) is None


def test_options_reach_the_config_and_override_the_schemes_own():
    int8 = quant_configs.build("bnb-int8", torch.float16, llm_int8_threshold=0.0, llm_int8_skip_modules=["proj_out"])
    assert int8.llm_int8_threshold == 0.0 and int8.llm_int8_skip_modules == ["proj_out"]
    nf4 = quant_configs.build("bnb-nf4", torch.float16, bnb_4bit_compute_dtype=torch.float32)
    assert nf4.bnb_4bit_compute_dtype == torch.float32 and nf4.bnb_4bit_quant_type == "nf4"
    assert quant_configs.build("torchao-int8wo", torch.bfloat16, modules_to_not_convert=["x"]).modules_to_not_convert == ["x"]
    assert Q.quantization_config("bnb-nf4-dq", torch.float16).to_dict() == quant_configs.bnb_nf4_double_quant(
        torch.float16).to_dict()


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CONFIG_CLASSES = {"BitsAndBytesConfig", "TorchAoConfig", "QuantoConfig", "SDNQConfig", "GGUFQuantizationConfig"}


def _code(notebook):
    return [("".join(c["source"])) for c in json.loads((NOTEBOOKS / notebook).read_text())["cells"]
            if c["cell_type"] == "code"]


def _written_configs(notebook, dtype):
    """Every config object a notebook's code cells build (a call of one of CONFIG_CLASSES), evaluated with
    the notebook's own imports and ``DTYPE = dtype``; calls whose arguments name other variables are left out."""
    import ast

    trees = [ast.parse("\n".join(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith("%") else l
                                 for l in src.splitlines())) for src in _code(notebook)]
    namespace = {"torch": torch, "DTYPE": dtype, "SKIP": ["x_embedder", "context_embedder", "proj_out", "norm_out"]}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("diffusers", "torchao", "sdnq"):
                exec(compile(ast.Module([node], []), notebook, "exec"), namespace)
    found = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in CONFIG_CLASSES:
                try:
                    found.append(eval(compile(ast.Expression(node), notebook, "eval"), namespace))
                except NameError:
                    continue  # e.g. 05's bnb_4bit_compute_dtype=compute: a variant, not a scheme
    return found


@pytest.mark.parametrize("notebook, schemes", [
    ("05_bitsandbytes_options.ipynb", ["bnb-int8", "bnb-nf4", "bnb-fp4", "bnb-nf4-dq"]),
    ("06_quantization_backends.ipynb", ["torchao-int8wo", "torchao-fp8", "quanto-int8", "quanto-fp8", "sdnq-int8",
                                        "gguf-q8_0", "gguf-q4_0"]),
])
def test_the_notebooks_write_out_the_same_configs_as_the_table(notebook, schemes):
    """05 and 06 build each scheme's config in a code cell, with the same options as the table the benchmarks use."""
    dtype = torch.bfloat16
    written = [(type(c), c.to_dict()) for c in _written_configs(notebook, dtype)]
    code = "\n".join(_code(notebook))
    for scheme in schemes:
        config = quant_configs.build(scheme, dtype)
        assert (type(config), config.to_dict()) in written, f"{notebook}: {scheme}'s config is not written out"
        assert f'"{scheme}"' in code, f"{notebook} does not measure {scheme}"
    assert "M.measure(" not in code and "Q.quantization_config" not in code  # the lesson's own calls, not fluxnb's
    assert code.count("quantization_config=") > len(schemes) // 2


def test_notebook_06_loads_gguf_and_layerwise_casting_as_load_transformer_does():
    import inspect

    code = "\n".join(_code("06_quantization_backends.ipynb"))
    ours = inspect.getsource(Q.load_transformer)
    casting = "enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype="
    assert casting + "DTYPE)" in code and casting + "dtype)" in ours
    assert "from_single_file(" in code and "config=SLICE, subfolder=\"transformer\"" in code
    assert 'config=checkpoint,\n            subfolder="transformer"' in ours


def test_measure_model_measures_a_model_loaded_by_hand_as_measure_does(tiny, reference):
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    inputs, ref = reference
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer", quantization_config=config,
                                                   dtype=torch.float32)
    row = M.measure_model(model, inputs, ref)
    by_name = M.measure(tiny, "bnb-nf4", torch.float32, inputs, ref)
    assert row["weights_gib"] == by_name["weights_gib"] < M.weight_bytes(Q.load_transformer(tiny, "bf16", torch.float32)) / 2**30
    assert row["relative_error"] == pytest.approx(by_name["relative_error"], rel=1e-6) and row["relative_error"] > 0
    assert row["forward_s"] > 0 and "load_s" not in row and by_name["load_s"] > 0
    assert "relative_error" not in M.measure_model(model, inputs)


def test_rows_table_leaves_out_the_columns_no_row_has():
    table = M.rows_table({"bnb-nf4": dict(weights_gib=1.0, forward_s=0.5, relative_error=0.1),
                          "torchao-fp8": {"skipped": "needs a GPU"}})
    lines = table.splitlines()
    assert lines[0] == "| scheme | weights (GiB) | forward (s) | rel. error | note |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].startswith("| bnb-nf4 | 1.0000 | 0.5000 | 0.1000 | 4-bit NormalFloat")
    assert lines[3] == "| torchao-fp8 | - | - | - | needs a GPU |"
    only_skipped = M.rows_table({"torchao-fp8": {"skipped": "needs a GPU"}}).splitlines()
    assert only_skipped == ["| scheme | note |", "|---|---|", "| torchao-fp8 | needs a GPU |"]
