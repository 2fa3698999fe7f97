"""``python -m fluxnb.fit``, the "will it fit?" dry run: its verdict, and its runner end to end on the CPU
with the tiny checkpoint (the real child process, and children that fail, die or hang)."""

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fluxnb
from fluxnb import fit

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TINY_RUN = ["--checkpoint", "tiny", "--height", "64", "--width", "64", "--steps", "2"]
STAGES = ["encode (NF4 T5 + CLIP)", "load NF4 transformer + VAE", "denoise 64x64", "free transformer (keep VAE)",
          "decode (VAE)"]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")


@pytest.mark.parametrize("result, total, fits, says", [
    (dict(ok=True, peaks=dict(vram_device_gib=7.75)), 8.0, True, "0.25 GiB to spare. That is tight"),
    (dict(ok=True, peaks=dict(vram_device_gib=8.26)), 15.0, True, "peak was 8.26 GiB"),
    (dict(ok=False, error="OutOfMemoryError: CUDA out of memory", peaks={}), 6.0, False, "does NOT fit"),
    (dict(ok=False, error="killed by SIGKILL in stage 'encode (NF4 T5 + CLIP)'", signal="SIGKILL", peaks={}), 15.0,
     False, "probably host RAM ran out"),
    (dict(ok=False, error="timed out after 9 s in stage 'start-up'", timed_out_s=9, peaks={}), None, False,
     "larger --timeout"),
    (dict(ok=False, error="NonFiniteLatentsError: NaN", peaks={}), 15.0, False, "not a memory verdict"),
    (dict(ok=True, peaks=dict(vram_device_gib=None)), None, True, "mechanics only and measured no VRAM"),
    (dict(ok=True, stand_in="tiny", peaks=dict(vram_device_gib=0.6)), 80.0, True, "says nothing about FLUX.1-dev"),
])
def test_fit_verdict(result, total, fits, says):
    ok, message = fit.fit_verdict(result, total)
    assert ok is fits and says in message
    measured = fits and total is not None and result.get("stand_in") is None
    assert ("tight" in message) is (measured and total - result["peaks"]["vram_device_gib"] < 0.5)
    memory_ran_out = result.get("signal") == "SIGKILL" or "OutOfMemory" in (result.get("error") or "")
    assert ("does NOT fit" in message) is memory_ran_out


def test_fit_measures_the_flow_as_the_notebooks_run_it():
    """The dry run must use the notebooks' allocator setting (without it the 8 GiB flow measures 8.26 GiB)
    and notebook 04's prompt, guidance and seed; a setting the user made wins, as in the notebooks."""
    nb = json.loads((NOTEBOOKS / "04_memory_profiling.ipynb").read_text())
    params = next("".join(c["source"]) for c in nb["cells"] if "PYTORCH_CUDA_ALLOC_CONF" in "".join(c["source"]))
    for key, value in fit.NOTEBOOK_ENV.items():
        assert f'os.environ.setdefault("{key}", "{value}")' in params
    assert f"PROMPT = {json.dumps(fit.PROMPT)}" in params
    steps, seed = re.search(r"STEPS, SEED = (\d+), (\d+)", params).groups()
    assert 'GUIDANCE, MAX_SEQUENCE_LENGTH = SETTINGS["guidance"], SETTINGS["max_sequence_length"]' in params
    assert (fluxnb.generation_settings("black-forest-labs/FLUX.1-dev")["guidance"], int(seed)) == (fit.GUIDANCE, fit.SEED)
    assert fit.child_env({"PATH": "/bin"}) == {"PATH": "/bin", **fit.NOTEBOOK_ENV}
    assert fit.child_env({"PYTORCH_CUDA_ALLOC_CONF": "backend:native"})["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"


@cpu_only
def test_dry_run_end_to_end_on_the_cpu(tmp_path, capfd, monkeypatch):
    """The real runner: the tiny checkpoint, the real child process, the JSON it writes, the report."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    out = tmp_path / "fit.json"
    code = fit.main([*TINY_RUN, "--json", str(out)])
    printed = capfd.readouterr().out
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"] and result["fits"] and result["error"] is None
    assert [s["stage"] for s in result["stages"]] == STAGES
    for stage in result["stages"]:
        assert math.isfinite(stage["seconds"]) and stage["seconds"] >= 0 and stage["ram_anon_gib"] > 0
        assert stage["vram_device_gib"] is None  # absent on a CPU, never zero
    assert math.isfinite(result["s_per_step"]) and result["s_per_step"] > 0 and len(result["step_s"]) == 2
    assert result["peaks"]["vram_device_gib"] is None and result["peaks"]["ram_anon_gib"] > 0
    assert result["image_size"] == [64, 64] and result["compute_dtype"] == "torch.float32"
    assert result["stand_in"] == "tiny" and result["allocator_conf"] == "expandable_segments:True"
    assert all(f"STAGE {name}" in printed for name in STAGES)  # the child's progress reaches the user
    assert "| stage |" in printed and "| decode (VAE) |" in printed and "s/step" in printed
    assert "mechanics only" in printed and "measured no VRAM" in printed


def _kill_in(function: str) -> str:
    """Python code for a child that runs the real flow until ``function``, then dies as the OOM killer kills."""
    return ("import os, signal, sys\n"
            "import fluxnb.fit as fit\n"
            f"fit.{function} = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)\n"
            "sys.exit(fit.main(['--worker', *sys.argv[1:]]))\n")


def test_a_child_killed_at_start_up_is_reported_within_seconds(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(fit, "child_command", lambda args: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", *args])
    out = tmp_path / "fit.json"
    out.write_text(json.dumps(dict(ok=True, stage_in_progress="decode (VAE)", stages=[], peaks={})))  # an earlier run's
    start = time.perf_counter()
    code = fit.main([*TINY_RUN, "--json", str(out)])
    assert time.perf_counter() - start < 30
    printed = capfd.readouterr().out
    assert code == 1 and "killed by SIGKILL in stage 'start-up'" in printed and "host RAM" in printed
    assert json.loads(out.read_text())["signal"] == "SIGKILL"
    assert fit.signal_name(-9) == "SIGKILL" and fit.signal_name(-11) == "SIGSEGV"


def test_a_child_killed_mid_flow_keeps_the_stages_it_finished(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(fit, "child_command", lambda args: [sys.executable, "-c", _kill_in("denoise"), *args])
    out = tmp_path / "fit.json"
    code = fit.main([*TINY_RUN, "--json", str(out)])
    printed = capfd.readouterr().out
    result = json.loads(out.read_text())
    assert code == 1 and not result["ok"] and not result["fits"] and result["signal"] == "SIGKILL"
    assert result["failed_stage"] == "denoise 64x64" and [s["stage"] for s in result["stages"]] == STAGES[:2]
    assert "killed by SIGKILL in stage 'denoise 64x64'" in printed and "probably host RAM ran out" in printed
    assert "| encode (NF4 T5 + CLIP) |" in printed  # what was measured before the kill is shown


def test_a_hanging_child_is_stopped_at_the_timeout(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(fit, "child_command", lambda args: [sys.executable, "-c", "import time; time.sleep(300)"])
    start = time.perf_counter()
    code = fit.main([*TINY_RUN, "--timeout", "2"])
    assert time.perf_counter() - start < 30
    printed = capfd.readouterr().out
    assert code == 1 and "timed out after 2 s in stage 'start-up'" in printed and "--timeout" in printed


def test_a_failing_child_names_its_stage(tmp_path, capfd):
    """A checkpoint without transformer weights: encoding works, loading the transformer fails."""
    broken = tmp_path / "broken"
    shutil.copytree(fluxnb.build_tiny("dev"), broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "fit.json"
    code = fit.main(["--checkpoint", str(broken), *TINY_RUN[2:], "--json", str(out)])
    printed = capfd.readouterr().out
    result = json.loads(out.read_text())
    assert code == 1 and not result["ok"] and result["failed_stage"] == "load NF4 transformer + VAE"
    assert [s["stage"] for s in result["stages"]] == STAGES[:2]  # the failed stage's memory is recorded too
    assert result["error_type"] and result["error"].startswith(result["error_type"])
    assert "did not finish" in printed and "not a memory verdict" in printed


def test_a_size_flux_cannot_make_is_refused_before_the_child_starts(capsys, monkeypatch):
    def no_child(args):
        raise AssertionError("the child was started for a size FLUX cannot make")

    monkeypatch.setattr(fit, "child_command", no_child)
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--checkpoint", "tiny", "--height", "1000", "--width", "64"])
    assert exit_.value.code == 2 and "height=1000 must be a positive multiple of 16" in capsys.readouterr().err


@cpu_only
def test_no_gpu_refuses_the_full_size_run_before_building_anything(capsys, monkeypatch):
    def no_build(choice):
        raise AssertionError("the 34 GB stand-in was about to be built on a machine that cannot use it")

    monkeypatch.setattr(fit, "prepare_checkpoint", no_build)
    assert fit.main([]) == 2
    err = capsys.readouterr().err
    assert "No GPU here" in err and "--checkpoint tiny" in err
    assert not (fluxnb.checkpoints.cache_dir() / "random-flux.1-dev").exists()


@pytest.mark.parametrize("device, says", [
    ("cpu", "needs about 36 GB of disk"),  # fluxnb.check_free_disk's message, with what to do
])
def test_a_stand_in_that_cannot_be_built_says_why(capsys, monkeypatch, device, says):
    monkeypatch.setattr(fit, "build_device", lambda: device)
    monkeypatch.setenv("FLUXNB_BUILD_WITHOUT_GPU", "1")  # past the no-GPU refusal (tests/test_checkpoints.py)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=100e9, used=99e9, free=1e9))
    assert fit.main(["--build", "--checkpoint", "random-dev"]) == 2
    err = capsys.readouterr().err
    assert says in err and ("FLUXNB_CACHE" in err or device is None)
    assert not (fluxnb.checkpoints.cache_dir() / "random-flux.1-dev").exists()


def test_help_explains_the_dry_run(capsys):
    with pytest.raises(SystemExit):
        fit.main(["--help"])
    text = capsys.readouterr().out
    for words in ("Will the course fit this GPU?", "random-dev", "--checkpoint tiny", "Exit code", "--timeout"):
        assert words in text
    assert "--worker" not in text and "--build" not in text  # the children's flags are internal


KLEIN_STAGES = ["encode (NF4 Qwen3)", "load float32 transformer + VAE", "denoise 64x64", "free transformer (keep VAE)",
                "decode (VAE)"]


@cpu_only
def test_dry_run_of_klein_end_to_end_on_the_cpu(tmp_path, capfd):
    """``--model klein``: FLUX.2 [klein]'s staged flow in the real child on tiny klein, same stages and verdict."""
    out = tmp_path / "fit.json"
    code = fit.main(["--model", "klein", *TINY_RUN, "--json", str(out)])
    printed = capfd.readouterr().out
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"] and result["fits"] and result["model"] == "klein"
    assert [s["stage"] for s in result["stages"]] == KLEIN_STAGES
    assert "flux.2-klein-4b" in result["checkpoint"] and result["stand_in"] == "tiny"
    assert result["image_size"] == [64, 64] and len(result["step_s"]) == 2 and result["s_per_step"] > 0
    assert all(f"STAGE {name}" in printed for name in KLEIN_STAGES)
    assert "FLUX.2 [klein]'s staged flow ran end to end on the CPU" in printed and "--model klein" in printed


def test_klein_s_random_stand_in_is_built_in_a_child_whatever_random_is_named(monkeypatch):
    """``random-dev`` with ``--model klein`` is random-klein; it is built by a ``--build`` child (a CUDA context
    made here would count in every later peak), told the model."""
    commands = []

    def fake_run(cmd, timeout_s, output=None, **kwargs):
        commands.append(cmd)
        return SimpleNamespace(returncode=0, output="/somewhere/random-flux.2-klein-4b\n")

    monkeypatch.setattr(fit, "run_process", fake_run)
    assert fit.prepare_checkpoint("random-dev", "klein") == "/somewhere/random-flux.2-klein-4b"
    assert commands[0][-6:] == ["fluxnb.fit", "--build", "--checkpoint", "random-dev", "--model", "klein"][-6:]
    assert fit.random_variant(fit.MODEL_IDS["klein"], "random-dev") == "klein"
    assert fit.prepare_checkpoint("tiny", "klein").endswith("tiny-flux.2-klein-4b")


@cpu_only
def test_the_klein_build_child_refuses_a_machine_without_a_gpu(capsys, monkeypatch):
    monkeypatch.delenv("FLUXNB_BUILD_WITHOUT_GPU", raising=False)
    assert fit.main(["--build", "--checkpoint", "random-dev", "--model", "klein"]) == 2
    err = capsys.readouterr().err
    assert "Could not build random-dev" in err and "FLUX.2-klein-4B" in err
    assert not (fluxnb.checkpoints.cache_dir() / "random-flux.2-klein-4b").exists()


def test_nf4_transformer_is_a_klein_option(capsys):
    with pytest.raises(SystemExit):
        fit.main(["--nf4-transformer", *TINY_RUN])
    assert "--nf4-transformer is for --model klein" in capsys.readouterr().err
