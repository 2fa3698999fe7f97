"""The course runner on a CPU: a dead kernel ends its notebook within seconds, SIGTERM stops the run and
its kernels, a failing cell is named, and the envelope's pieces (cgroup, kernel launcher, what the
kernels see) do what they say. The real envelope needs a GPU and root: it ran on the GPU machine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

import fluxnb
from fluxnb import envelopes, environment, memory
from fluxnb.lab import course, enter, limits, supervisor

ROOT = Path(__file__).resolve().parent.parent


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def _runner(out: Path, *notebooks: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fluxnb.course", str(out), *map(str, notebooks)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_a_kernel_that_dies_ends_its_notebook_within_seconds_and_the_run_fails(tmp_path):
    dies = _notebook(tmp_path / "01_dies.ipynb", "print('before')",
                     "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "print('never')")
    fine = _notebook(tmp_path / "02_fine.ipynb", "print('still runs')")
    start = time.perf_counter()
    proc = _runner(tmp_path / "out", dies, fine)
    output, _ = proc.communicate(timeout=60)
    assert time.perf_counter() - start < 30, output
    assert proc.returncode == 1, output
    assert "01_dies.ipynb: FAILED in cell 1" in output and "kernel died: killed by SIGKILL" in output
    results = json.loads((tmp_path / "out" / course.RESULTS_NAME).read_text())
    first, second = results["notebooks"]
    assert first["passed"] is False and first["failed_cell"] == 1 and first["cause"] == "kernel died: killed by SIGKILL"
    assert second["passed"] is True  # each notebook stands alone: one death does not hide the rest
    kept = nbformat.read(tmp_path / "out" / "01_dies.ipynb", as_version=4)  # the partly executed copy
    assert kept.cells[0].outputs[0]["text"] == "before\n" and kept.cells[2].outputs == []


def test_sigterm_stops_the_run_and_kills_its_kernel_and_the_kernels_children(tmp_path):
    pids = tmp_path / "pids"
    sleeps = _notebook(tmp_path / "01_sleeps.ipynb",
                       "import os, subprocess, time\n"
                       "child = subprocess.Popen(['sleep', '300'])\n"
                       f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
                       "time.sleep(300)")
    never = _notebook(tmp_path / "02_never.ipynb", "print('must not run')")
    proc = _runner(tmp_path / "out", sleeps, never)
    deadline = time.time() + 60
    while not (pids.exists() and pids.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert pids.exists(), "the notebook never started"
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert time.perf_counter() - start < 10, output
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "02_never" not in output
    time.sleep(0.5)
    for pid in map(int, pids.read_text().split()):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid


def test_a_failing_cell_is_named_with_its_error(tmp_path):
    bad = _notebook(tmp_path / "01_bad.ipynb", "x = 1", "1 / 0")
    results = course.run_course(tmp_path / "out", [bad], timeout_s=60, command="test")
    (row,) = results["notebooks"]
    assert results["passed"] is False and row["failed_cell"] == 1 and row["failed_source"] == "1 / 0"
    assert row["cause"].startswith("ZeroDivisionError")
    table = course.results_markdown(results)
    assert "| 01_bad.ipynb | **FAIL** in cell 1: ZeroDivisionError" in table and "no envelope" in table


def test_the_envelope_needs_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the CPU path")
    assert course.main([str(tmp_path), "--envelope", "colab-t4"]) == 2
    assert "run it on a machine with a GPU" in capsys.readouterr().err


def test_ram_cgroup_is_made_with_memory_max_and_no_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    group = limits.RamCgroup.create("fluxnb-colab-t4-03", 12.0, root=tmp_path)
    assert group is not None and (tmp_path / "cgroup.subtree_control").read_text() == "+memory"
    assert int((group.path / "memory.max").read_text()) == 12 * 2**30
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (group.path / "memory.peak").write_text(str(12 * 2**30))
    assert group.oom_kills() == 1 and group.peak_gib() == 12.0
    state = course._Execution()
    assert course._cause(state, -9, 1, group) == "kernel died: killed by SIGKILL (cgroup oom_kill=1: host RAM over 12 GiB)"


def test_no_cgroup_without_root_or_memory_controller(tmp_path, monkeypatch):
    (tmp_path / "cgroup.controllers").write_text("cpu pids\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert limits.RamCgroup.create("x", 1.0, root=tmp_path) is None  # then the results say "RAM not enforced"
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert limits.RamCgroup.create("x", 1.0, root=tmp_path) is None


def test_the_kernel_joins_its_cgroup_before_it_starts(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execv", lambda exe, args: started.append((exe, args)))
    argv = course.kernel_spec_manager(limits.RamCgroup(tmp_path)).get_kernel_spec("python3").argv
    assert argv[:3] == [sys.executable, "-m", "fluxnb.lab.enter"]
    enter.main(argv[3:])
    assert (tmp_path / "cgroup.procs").read_text() == str(os.getpid())
    assert started == [(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])]
    assert course.kernel_spec_manager(None).get_kernel_spec("python3").argv[:3] == [
        sys.executable, "-m", "ipykernel_launcher"]  # no cgroup: the kernel itself


def test_the_supervisor_kills_a_child_at_its_timeout_and_names_a_signal(tmp_path):
    start = time.perf_counter()
    done = supervisor.run_process([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], 2,
                                  output="all", stop_grace_s=1)
    assert done.timed_out and done.returncode is None and "up" in done.output and time.perf_counter() - start < 20
    killed = supervisor.run_process([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], 30)
    assert killed.returncode == -signal.SIGSEGV and killed.describe() == "killed by SIGSEGV"
    ran = supervisor.run_process([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 30, output="stdout")
    assert (ran.returncode, ran.output, ran.describe()) == (3, "out\n", "exited with code 3")


def test_a_child_that_asked_to_die_with_its_parent_does(tmp_path):
    """torchrun is started so: a launcher killed by a runner's timeout leaves no rank holding a GPU."""
    pid_file = tmp_path / "child.pid"
    grandchild = supervisor.entry_command([sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w')"
                                           ".write(str(os.getpid())); time.sleep(60)"], parent_death_signal=signal.SIGTERM)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; subprocess.Popen({grandchild!r}); time.sleep(60)"])
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def test_kernels_in_the_colab_envelope_compute_in_fp16_and_see_the_t4s_vram(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fluxnb.pick_dtype() is torch.bfloat16  # an H100 on its own
    monkeypatch.setenv(envelopes.ENV_VAR, "colab-t4")
    assert fluxnb.pick_dtype() is torch.float16  # the same H100 rehearsing a T4
    monkeypatch.setenv(envelopes.ENV_VAR, "8gb-card")
    assert fluxnb.pick_dtype() is torch.bfloat16
    monkeypatch.setenv(envelopes.ENV_VAR, "colab-k80")
    with pytest.raises(ValueError, match="not an envelope fluxnb knows: use one of colab-t4, 8gb-card"):
        fluxnb.pick_dtype()


def test_machine_info_reports_the_envelopes_ram_and_vram(monkeypatch):
    monkeypatch.setenv(envelopes.ENV_VAR, "colab-t4")
    info = fluxnb.machine_info()
    assert info.envelope == "colab-t4" and info.ram_gib <= 12.0 and info.bf16_supported is False


def test_device_memory_of_the_envelopes_holder_is_not_counted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert memory.device_used_bytes() == 70 * 2**30
    monkeypatch.setenv(envelopes.OTHERS_VAR, str(65 * 2**30))
    assert memory.device_used_bytes() == 5 * 2**30


def test_missing_resources_names_what_is_short(monkeypatch):
    monkeypatch.setattr(environment, "free_vram_gib", lambda: 3.0)
    monkeypatch.setattr(environment, "available_ram_gib", lambda: 10.0)
    assert environment.missing_resources(vram_gib=2.0, ram_gib=8.0) is None
    assert environment.missing_resources(vram_gib=40.0) == "needs 40.0 GiB of free VRAM, this machine has 3.0 GiB free"
    assert environment.missing_resources(ram_gib=11.0) == "needs 11.0 GiB of host RAM, 10.0 GiB is available"
    monkeypatch.setattr(environment, "free_vram_gib", lambda: None)
    assert "no GPU" in environment.missing_resources(vram_gib=1.0)


def test_available_ram_follows_a_cgroup_limit(monkeypatch):
    monkeypatch.setattr(environment, "_cgroup_ram_left_bytes", lambda: 2**30)
    assert environment.available_ram_gib() == pytest.approx(1.0)
    monkeypatch.setattr(environment, "_cgroup_ram_left_bytes", lambda: None)
    assert environment.available_ram_gib() > 0


def test_committed_course_runs_are_what_docs_results_show():
    """The course tables are generated from fluxnb/results/course-*.json: regenerating changes nothing.
    (Notebook 04 links them instead of embedding them: tests/test_benchmarks.py checks its short table.)"""
    from benchmarks import report

    body = report.course_markdown().strip()
    assert body.count("| notebook | result |") == len(list(envelopes.RESULTS.glob("course-*.json"))) >= 2
    assert body in (ROOT / "docs" / "results.md").read_text()
    for name in ("colab-t4", "8gb-card"):
        run = fluxnb.committed_run(name)
        assert run["envelope"]["name"] == name and run["ram_enforced"] is True and run["provenance"]["gpu"]


def test_notebooks_may_follow_the_options(tmp_path, capsys):
    """`python -m fluxnb.course OUT --envelope colab-t4 NB.ipynb` (notebooks last) parses: it once failed on the GPU."""
    if torch.cuda.is_available():
        pytest.skip("the CPU path")
    assert course.main([str(tmp_path), "--envelope", "colab-t4", "--timeout", "5", "notebooks/09_faster.ipynb"]) == 2
    assert "run it on a machine with a GPU" in capsys.readouterr().err  # got past the parser


def test_each_notebook_downloads_into_an_empty_cache_and_its_bytes_are_counted(tmp_path):
    """As on a fresh Colab VM: the second notebook downloads again what the first did, and the runner says how much."""
    fetch = ("import fluxnb\n"
             "checkpoint = fluxnb.resolve_checkpoint('black-forest-labs/FLUX.1-schnell')\n"
             "from huggingface_hub import hf_hub_download\n"
             "for name in ('vae/config.json', 'vae/diffusion_pytorch_model.safetensors'):\n"
             "    hf_hub_download(checkpoint, name)")
    first = _notebook(tmp_path / "01_fetch.ipynb", fetch)
    second = _notebook(tmp_path / "02_fetch.ipynb", fetch)
    nothing = _notebook(tmp_path / "03_nothing.ipynb", "print('no download')")
    proc = _runner(tmp_path / "out", first, second, nothing, env={**os.environ, "FLUXNB_CHECKPOINT": "tiny"})
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    tiny = fluxnb.build_tiny("schnell")
    size = sum((tiny / "vae" / name).stat().st_size for name in ("config.json", "diffusion_pytorch_model.safetensors"))
    rows = json.loads((tmp_path / "out" / course.RESULTS_NAME).read_text())["notebooks"]
    assert [r["downloaded_bytes"] for r in rows] == [size, size, 0]
    assert rows[0]["downloads"] == {"black-forest-labs/FLUX.1-schnell": size} and rows[2]["downloads"] == {}
    assert f"downloaded {fluxnb.prequantized.size_text(size)}" in output
    assert not (tmp_path / "out" / "hub-cache" / "01_fetch").exists()  # a VM's disk goes with the VM


def _course_output_with(*names: str) -> Path:
    """A tiny course run that executed ``names`` into one output folder: CI's (FLUXNB_COURSE_OUTPUT, made by
    .ci/run before the tests), or one made here."""
    given = os.environ.get("FLUXNB_COURSE_OUTPUT")
    if given and all((Path(given) / "downloads" / f"{Path(n).stem}.jsonl").exists() for n in names):
        return Path(given)
    out = Path(os.environ["FLUXNB_OUTPUT"]).parent / "course-01-03"
    proc = _runner(out, *(ROOT / "notebooks" / n for n in names), env={**os.environ, "FLUXNB_CHECKPOINT": "tiny"})
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    return out


def test_notebook_03_reads_01s_embeddings_and_loads_no_text_encoder():
    out = _course_output_with("01_encode_prompt_4bit_t5.ipynb", "03_generate.ipynb")
    results = {r["notebook"]: r for r in json.loads((out / course.RESULTS_NAME).read_text())["notebooks"]}
    assert results["01_encode_prompt_4bit_t5.ipynb"]["passed"] and results["03_generate.ipynb"]["passed"]
    fetched = [json.loads(line) for line in (out / "downloads" / "03_generate.jsonl").read_text().splitlines()]
    dev = [e["path"] for e in fetched if e["repo"] == "black-forest-labs/FLUX.1-dev"]
    assert dev and not [p for p in dev if p.startswith(("text_encoder", "tokenizer"))], dev  # the VAE, not T5
    assert not [e for e in fetched if e["repo"] == "hf-internal-testing/flux.1-dev-nf4-pkg"
                and e["path"].startswith("text_encoder_2/")]  # 03 starts from an empty cache: encoding would fetch T5


def test_the_committed_downloads_table_is_what_docs_results_show():
    """docs/results.md's downloads come from committed runner results (benchmarks/results/downloads/*.json),
    each notebook's bytes counted by the stand-in Hub, not computed from file lists."""
    from benchmarks import report

    runs = sorted((ROOT / "benchmarks" / "results" / "downloads").glob("*.json"))
    assert runs, "no committed course run counted its downloads"
    for path in runs:
        rows = json.loads(path.read_text())["notebooks"]
        assert len(rows) == 13 and all(r["passed"] and r["downloaded_bytes"] is not None for r in rows)
        assert sum(r["downloaded_bytes"] for r in rows) == sum(sum(r["downloads"].values()) for r in rows) > 0
    assert report.downloads_markdown().strip() in (ROOT / "docs" / "results.md").read_text()
