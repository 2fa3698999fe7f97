"""Notebook 09's and 10's helpers on a CPU: step caches on the tiny stand-in, compile payback arithmetic,
the two-GPU device map computed on empty weights, and the benchmark rows they feed."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import fluxnb
from benchmarks import report, worker
from benchmarks.recipes import RECIPES
from fluxnb import faster, multigpu


@pytest.fixture(scope="module")
def tiny():
    return str(fluxnb.build_tiny("dev"))


def test_every_cache_and_two_gpu_recipe_is_a_benchmark_row():
    assert {f"staged-nf4-cache-{name}" for name in faster.CACHES} <= set(RECIPES)
    assert {"split-bf16-2gpu", "split-fp16-kaggle", "cp-bf16-2gpu", "two-pipelines-nf4"} <= set(RECIPES)
    assert RECIPES["cp-bf16-2gpu"].gpus == 2 and RECIPES["cp-bf16-1gpu"].gpus == 1
    assert RECIPES["split-fp16-kaggle"].compute_dtype == "fp16"


def test_threshold_and_schedule_caches_are_told_apart():
    assert "first-block" not in faster.FIXED_SCHEDULE
    assert {"pab", "taylorseer", "fastercache", "magcache"} <= set(faster.FIXED_SCHEDULE)
    with pytest.raises(ValueError, match="unknown cache 'teacache'"):
        faster.cache_config("teacache", None, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_a_fixed_schedule_cache_skips_steps_and_is_marked_approximate(tiny):
    base = worker.run("staged-nf4-steps", tiny, [(64, 64)], steps=8)
    pab = worker.run("staged-nf4-cache-pab", tiny, [(64, 64)], steps=8)
    assert base["ok"] and pab["ok"]
    assert base["exact"] is True and base["computed_steps"] == {"64x64": 8}
    assert pab["exact"] is False and pab["cache"] == "pab" and 0 < pab["computed_steps"]["64x64"] < 8
    timed = pab["sizes"][0]
    assert timed["s_per_step"] == pytest.approx(sum(timed["step_s"]) / len(timed["step_s"]), abs=1e-3)  # the mean
    rows = report.recipe_rows(dict(provenance=dict(gpu="CPU", date="2026-11-22", command="test"),
                                   recipes={"a": dict(base, provenance=None), "b": dict(pab, provenance=None)}))
    assert [r["exact"] for r in rows] == [True, False]


def test_compile_blocker_explains_the_cpu():
    class Quantized(torch.nn.Module):
        is_quantized = True

    reason = faster.compile_blocker(Quantized())
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert "no GPU" in reason and "inductor" in reason
    assert faster.compile_blocker(torch.nn.Linear(2, 2)) is None


def test_payback_is_compile_time_over_time_saved_per_image():
    assert faster.payback_images(17.0, 0.193, 0.144, 50) == pytest.approx(17.0 / (0.049 * 50))
    assert faster.payback_images(30.0, 0.2, 0.2, 50) is None  # no faster: never pays off


def test_the_device_map_of_flux_over_two_gpus_is_computed_on_empty_weights():
    assert multigpu.transformer_gib(torch.bfloat16) == pytest.approx(22.17, abs=0.01)
    for cap in (16.0, 14.74):
        device_map = multigpu.planned_device_map(multigpu.max_memory_for(cap, 3.0), torch.float16)
        blocks = multigpu.blocks_per_device(device_map)
        assert set(blocks) == {"cuda:0", "cuda:1"} and sum(blocks.values()) == 57  # 19 double + 38 single
    too_much_headroom = multigpu.planned_device_map(multigpu.max_memory_for(14.74, 3.5), torch.float16)
    assert "disk" in too_much_headroom.values()  # 2 x 11.24 GiB cannot hold 22.17 GiB of weights
    with pytest.raises(ValueError, match="leaves nothing"):
        multigpu.max_memory_for(8.0, 9.0)


def test_the_torchrun_worker_refuses_to_start_without_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        multigpu.main(["cp", "--checkpoint", "x", "--json", "out.json"])
    assert "start it with torchrun" in capsys.readouterr().err


def test_the_report_states_the_two_gpu_and_cache_results_it_is_given():
    import json
    from pathlib import Path

    results = json.loads((Path(report.ROOT) / "benchmarks" / "results" / "h100.json").read_text())
    base = results["recipes"]["staged-nf4"]

    def row(name, s_per_step, **extra):
        return dict(base, recipe=name, sizes=[dict(base["sizes"][0], s_per_step=s_per_step)], **extra)

    results["recipes"] = {
        "staged-nf4-steps": row("staged-nf4-steps", 0.2),
        "staged-nf4-cache-pab": row("staged-nf4-cache-pab", 0.16, cache="pab", exact=False, computed_steps={"1024x1024": 15}, steps=28),
        "cp-bf16-1gpu": row("cp-bf16-1gpu", 0.18, per_gpu_peaks_gib={"cuda:0": 30.0}),
        "cp-bf16-2gpu": row("cp-bf16-2gpu", 0.10, gpus=2, per_gpu_peaks_gib={"cuda:0": 30.0, "cuda:1": 29.5}),
        "split-bf16-2gpu": row("split-bf16-2gpu", 0.25, gpus=2, per_gpu_peaks_gib={"cuda:0": 13.9, "cuda:1": 15.1},
                               blocks_per_gpu={"cuda:0": 17, "cuda:1": 40}),
        "two-pipelines-nf4": row("two-pipelines-nf4", 0.2, gpus=2, images_at_once=2,
                                 per_gpu_peaks_gib={"cuda:0": 8.3, "cuda:1": 8.3}),
    }
    text = report.markdown(results)
    assert "context parallel (Ulysses) on 2 GPUs, bf16, 1024x1024: 0.100 vs 0.180 s/step on 1 GPU, 1.80x" in text
    assert "step cache `pab`: 0.160 vs 0.200 s/step" in text and "15 of 28 steps" in text
    assert "`split-bf16-2gpu`: per-GPU peaks cuda:0 13.90 GiB, cuda:1 15.10 GiB" in text
    assert "30.00 / 29.50 (per GPU)" in text
    assert f"{2 * 60 / (50 * 0.2):.2f} images/minute" in text
    rows = {r["recipe"]: r for r in report.recipe_rows(results)}
    assert rows["split-bf16-2gpu"]["vram_peak_gib"] == 15.1 and rows["two-pipelines-nf4"]["images_at_once"] == 2


def _gloo_aborted(output: str) -> bool:
    """Did a two-rank gloo run die of a rank's SIGABRT? If so, say so loudly (a pytest warning with the rank's
    own error), and the caller runs it once more: a second failure fails its test.

    In one CI run (2026-11-22) a gloo CPU rank aborted while the other was alive (its stack was cut from the
    log); 29 local runs, some under load, never did. Gloo on CPU is a test stand-in for NCCL here, and its
    rare aborts are a known flake (pytorch/pytorch#65237, #60662)."""
    if "(SIGABRT)" not in output:
        return False
    import warnings

    warnings.warn("the two-rank gloo run aborted once; its output:\n" + multigpu.failure_excerpt(output, 4000))
    return True


def test_two_rank_context_parallel_gives_the_one_process_latents(tmp_path):
    """The real torchrun worker, 2 CPU ranks over gloo, context parallel on the tiny checkpoint: the
    latents equal a plain one-process denoise with the same embeddings and seed."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    checkpoint = str(fluxnb.build_tiny("dev"))
    out = tmp_path / "cp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("cp_on_cpu.py")), "cp", "--checkpoint", checkpoint, "--json", str(out), "--dtype", "fp32",
           "--size", "128x128", "--steps", "2", "--seed", "3", "--save-latents"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **multigpu.NCCL_SAFE_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0 and _gloo_aborted(proc.stdout + proc.stderr):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, multigpu.failure_excerpt(proc.stdout + proc.stderr)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["latents_finite"] and len(result["ranks"]) == 2
    cp_latents = load_file(str(out.with_suffix(".safetensors")))["latents"]

    fluxnb.allow_bitsandbytes_on_cpu()
    encoders = fluxnb.load_text_encoders_4bit(checkpoint, torch.float32)
    embeds = fluxnb.encode_prompt(encoders, "A cat holding a sign that says hello world")
    transformer = multigpu._load_transformer(checkpoint, torch.float32, "none", torch.device("cpu"))
    pipe = fluxnb.load_denoising_pipeline(checkpoint, transformer, torch.float32)
    reference = fluxnb.denoise(pipe, embeds, 128, 128, 2, 3.5, 3)
    assert cp_latents.shape == reference.shape
    torch.testing.assert_close(cp_latents, reference, rtol=1e-4, atol=1e-4)


def test_launch_runs_torchrun_ranks_on_cpu_and_gathers_them(tmp_path, monkeypatch):
    """fluxnb.multigpu.launch end to end (torchrun, 2 gloo ranks, NF4 transformer, a seed each): rank 0's
    JSON holds both ranks; a launch past its timeout raises, naming it, and leaves no rank behind."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    checkpoint = str(fluxnb.build_tiny("dev"))
    try:
        out = multigpu.launch("replicas", 2, checkpoint, tmp_path / "r.json", "fp32", "nf4", 64, 64, 1, 0, timeout_s=120)
    except RuntimeError as error:  # launch() puts the ranks' output in its error
        if not _gloo_aborted(str(error)):
            raise
        out = multigpu.launch("replicas", 2, checkpoint, tmp_path / "r.json", "fp32", "nf4", 64, 64, 1, 0, timeout_s=120)
    assert out["world_size"] == 2 and out["images_at_once"] == 2 and out["latents_finite"]
    assert [r["rank"] for r in out["ranks"]] == [0, 1] and out["gpu"] == "cpu"
    with pytest.raises(RuntimeError, match="ran past 2 s"):
        multigpu.launch("replicas", 2, checkpoint, tmp_path / "t.json", "fp32", "nf4", 64, 64, 1, 0, timeout_s=2)
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "t.json")], capture_output=True, text=True).stdout
    assert leftover == "", f"ranks outlived their launch: pids {leftover.split()}"


def test_failure_excerpt_keeps_the_first_rank_failure_and_the_end():
    """A dead rank's own words come first in torchrun's output, its long summary last: both are kept."""
    summary = "ChildFailedError summary line\n" * 400
    output = "loading...\n" * 50 + "terminate called after throwing an instance of 'gloo::IoException'\n" + summary + "THE END"
    excerpt = multigpu.failure_excerpt(output, chars=2000)
    assert excerpt.startswith("terminate called after throwing") and excerpt.endswith("THE END")
    assert "characters left out" in excerpt and len(excerpt) < 2100
    assert multigpu.failure_excerpt("short") == "short"
    assert multigpu.failure_excerpt("x" * 5000, chars=100) == "x" * 100
    with pytest.warns(UserWarning, match="aborted once"):
        assert _gloo_aborted("traceback : Signal 6 (SIGABRT) received by PID 3444")
    assert not _gloo_aborted("exitcode  : 1 (pid: 3444)")


def test_notebook_10_on_kaggle_writes_into_kaggle_working_and_its_ranks_get_the_secret_token(kaggle, monkeypatch, tmp_path):
    """Notebook 10 as a Kaggle notebook starts it, up to torchrun (a CPU has no two GPUs to run the ranks
    on): the outputs folder its parameters cell makes is Kaggle's kept /kaggle/working/outputs whatever the
    kernel's folder, torchrun gets this interpreter, fluxnb's worker and an absolute --json there, and its
    environment carries the token read from Kaggle's secret (no library reads that secret in a rank) and
    the NCCL settings; and fluxnb's worker can be started from that folder with that environment."""
    import sys

    from fluxnb.lab.supervisor import Finished

    kaggle.secrets["HF_TOKEN"] = "hf_kaggle_secret_value"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("FLUXNB_OUTPUT")  # conftest.py set it; a Kaggle kernel has none
    output_dir = fluxnb.output_dir("multi-gpu")  # as in notebook 10's parameters cell
    output_dir.mkdir(parents=True, exist_ok=True)
    assert output_dir == kaggle.working / "outputs" / "multi-gpu"
    started = {}

    def torchrun(argv, timeout_s, **kwargs):  # what fluxnb.lab.supervisor.run_process would start
        started.update(argv=argv, **kwargs)
        json_path = Path(argv[argv.index("--json") + 1])
        json_path.write_text(json.dumps({"mode": "cp", "world_size": 2}))  # what rank 0 writes
        return Finished(0, "")

    monkeypatch.setattr(multigpu, "run_process", torchrun)
    out = multigpu.launch("cp", 2, "black-forest-labs/FLUX.1-dev", output_dir / "cp-2.json", "fp16", "nf4", 1024, 1024, 5, 0)
    assert out == {"mode": "cp", "world_size": 2}
    argv, env = started["argv"], started["env"]
    assert argv[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fluxnb.multigpu"]
    assert argv[argv.index("--json") + 1] == str(kaggle.working / "outputs" / "multi-gpu" / "cp-2.json")
    assert argv[argv.index("--dtype") + 1] == "fp16" and argv[argv.index("--quant") + 1] == "nf4"
    assert started.get("cwd") is None  # the ranks start in the kernel's folder
    assert env["HF_TOKEN"] == "hf_kaggle_secret_value" and env["KAGGLE_KERNEL_RUN_TYPE"] == "Interactive"
    assert all(env[name] == value for name, value in multigpu.NCCL_SAFE_ENV.items())
    rank = subprocess.run([sys.executable, "-m", "fluxnb.multigpu", "--help"], env=env, cwd=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert rank.returncode == 0 and "torchrun --nproc_per_node=2 -m fluxnb.multigpu" in rank.stdout, rank.stderr
