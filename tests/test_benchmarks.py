"""The benchmark's own logic on the CPU with the tiny checkpoint: recipes, result schema, judging an
envelope, merging runs, and the generated table/chart/markers. (The GPU numbers come from a GPU.)"""

import json
from pathlib import Path

import pytest
import torch

import fluxnb
from benchmarks import __main__ as cli
from benchmarks import report, worker
from benchmarks.recipes import RECIPES

ISSUE_RECIPES = {"bf16-resident", "staged-nf4", "nf4-model-offload", "staged-int8", "staged-nf4-fp16",
                 "staged-nf4-compile", "nf4-save-reload"}


@pytest.fixture(scope="module")
def tiny():
    return str(fluxnb.build_tiny("dev"))


def test_every_recipe_the_course_promises_is_there():
    assert ISSUE_RECIPES <= set(RECIPES)
    assert RECIPES["staged-nf4-fp16"].compute_dtype == "fp16"
    assert RECIPES["staged-nf4-expandable"].env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_sizes_parse_as_height_by_width():
    assert worker.parse_sizes("1024x1024, 512X768") == [(1024, 1024), (512, 768)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_worker_records_every_field_for_a_staged_recipe(tiny):
    result = worker.run("staged-nf4", tiny, [(64, 64), (32, 48)], steps=2)
    assert result["ok"] and result["error"] is None and result["compute_dtype"] == "torch.float32"
    assert [(s["height"], s["width"]) for s in result["sizes"]] == [(64, 64), (32, 48)]
    for size in result["sizes"]:
        assert size["latents_finite"] is True and size["s_per_step"] > 0 and size["warmup_s"] > 0
    assert [s["stage"] for s in result["stages"]] == [
        "encode (T5 nf4)", "load transformer (nf4) + VAE", "warm-up 64x64", "denoise 64x64", "warm-up 32x48",
        "denoise 32x48", "free transformer", "decode 64x64", "decode 32x48"]
    assert result["peaks"]["vram_device_gib"] is None and result["peaks"]["ram_anon_gib"] > 0
    assert result["load_s"] > 0 and result["compile_s"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_worker_reports_a_failure_with_its_stage(tiny):
    result = worker.run("staged-nf4", tiny, [(1000, 64)], steps=2)  # not a multiple of 16
    assert not result["ok"] and result["failed_stage"] == "warm-up 1000x64"
    assert "multiple of 16" in result["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_run_skips_gpu_recipes_and_writes_results(tmp_path):
    out = tmp_path / "cpu.json"
    code = cli.main(["run", "--checkpoint", "tiny", "--recipes", "bf16-resident,staged-nf4,nf4-save-reload", "--sizes", "32x32",
                     "--steps", "1", "--results", str(out), "--no-docs"])
    data = json.loads(out.read_text())
    assert code == 0
    assert data["recipes"]["bf16-resident"]["skipped"] == "needs a GPU"
    saved = data["recipes"]["nf4-save-reload"]
    assert saved["ok"] and saved["on_the_fly_s"] > 0 and saved["prequantized_s"] > 0
    assert data["recipes"]["staged-nf4"]["sizes"][0]["latents_finite"] is True
    assert data["provenance"]["stand_in"] == "tiny" and data["provenance"]["command"].startswith("python -m benchmarks run")
    assert out.with_suffix(".png").is_file() and "NOT the real shapes" in out.with_suffix(".md").read_text()


def _result(ok=True, device=7.5, ram=1.2, stage="denoise 1024x1024"):
    stages = [dict(stage="encode", vram_device_gib=5.0), dict(stage=stage, vram_device_gib=device)]
    return dict(ok=ok, error=None if ok else "OutOfMemoryError: CUDA out of memory", failed_stage=None if ok else stage,
                stages=stages, peaks=dict(vram_device_gib=device, ram_anon_gib=ram))


@pytest.mark.parametrize("kwargs, passed, why", [
    (dict(result=_result()), True, "inside the envelope"),
    (dict(result=_result(device=8.3)), False, "device VRAM 8.30 GiB > 8 GiB in stage 'denoise 1024x1024'"),
    (dict(result=_result(ok=False)), False, "failed in stage 'denoise 1024x1024': OutOfMemoryError"),
    (dict(result=None, oom_kills=1, output="STAGE encode (T5 nf4)\nSTAGE load transformer\n"), False,
     "host RAM over 12 GiB: OOM-killed in stage 'load transformer'"),
    (dict(result=None, code=-9), False, "worker exited -9 in stage 'start-up'"),
    (dict(result=_result(ram=13.0), ram_peak_gib=None), False, "host RAM 13.00 GiB > 12 GiB"),
])
def test_envelope_judgement_names_the_stage_that_broke_it(kwargs, passed, why):
    args = dict(code=0, output="", vram_gib=8.0, ram_gib=12.0, oom_kills=0, ram_peak_gib=1.0)
    args.update(kwargs)
    ok, reason = cli.judge_envelope(**args)
    assert ok is passed and why in reason


def test_merge_keeps_good_measurements_over_failed_attempts(tmp_path):
    prov = dict(command="python -m benchmarks run", gpu="G", driver="1", date="2026-11-21T00:00:00", cuda="13",
                libraries=dict(torch="t", diffusers="d", transformers="x", bitsandbytes="b", accelerate="a"))
    good = dict(recipe="a", ok=True, sizes=[], stages=[], peaks={}, provenance=prov)
    failed = dict(recipe="a", ok=False, sizes=[], stages=[], peaks={}, error="timeout", failed_stage=None, provenance=prov)
    newer = dict(recipe="b", ok=True, sizes=[], stages=[], peaks={}, provenance=prov)
    for name, recipes in (("1.json", {"a": good}), ("2.json", {"a": failed, "b": newer})):
        (tmp_path / name).write_text(json.dumps(dict(provenance=prov, recipes=recipes, envelopes={})))
    cli.main(["merge", str(tmp_path / "1.json"), str(tmp_path / "2.json"), "--out", str(tmp_path / "m.json"), "--no-docs"])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["recipes"]["a"]["ok"] is True and set(merged["recipes"]) == {"a", "b"}


def test_committed_results_regenerate_to_the_committed_table():
    """docs/results.md's and notebook 04's table are generated from the JSON, not typed: regenerating changes nothing."""
    results = sorted(p for p in cli.RESULTS.glob("*.json") if not p.stem.endswith("-offload"))
    assert results, "no committed benchmark results"
    for path in results:
        data = json.loads(path.read_text())
        assert path.with_suffix(".md").read_text() == report.markdown(data)
        for recipe in data["recipes"].values():
            assert recipe.get("skipped") or {"provenance", "stages", "peaks", "sizes", "ok"} <= set(recipe)
    doc = report.RESULTS_DOC.read_text()  # docs/results.md, generated whole
    assert report.markdown(json.loads(results[0].read_text())).strip() in doc
    data = json.loads(report.RECIPES_JSON.read_text())
    assert report.summary_markdown(data) in (report.ROOT / "README.md").read_text()  # the front page's summary


def test_committed_offload_results_regenerate_to_notebook_08s_table():
    """Notebook 08's GPU table is generated from benchmarks/gpu_offload.sh's committed results."""
    offload = sorted(cli.RESULTS.glob("*-offload.json"))
    assert offload, "no committed offload results (benchmarks/gpu_offload.sh)"
    body = report.offload_markdown(json.loads(offload[0].read_text()))
    assert offload[0].with_suffix(".md").read_text() == body + "\n"
    notebook = (report.ROOT / "notebooks" / "08_offloading.ipynb").read_text()
    cell = next("".join(c["source"]) for c in json.loads(notebook)["cells"] if report.OFFLOAD_START in "".join(c["source"]))
    assert f"{report.OFFLOAD_START}\n{body.strip()}\n{report.OFFLOAD_END}" in cell
    assert "nf4-streamed" in body and "bf16-group-offload-block" in body


def test_notebook_08_shows_host_ram_as_the_planners_anonymous_memory():
    """One host-RAM figure: 08's column is the anonymous memory recipes.json (the planner) has, never max RSS;
    the rows whose pinned copies anonymous memory misses say so, and only their note gives the resident set."""
    results = json.loads(sorted(cli.RESULTS.glob("*-offload.json"))[0].read_text())
    body = report.offload_markdown(results)
    head = next(line for line in body.splitlines() if line.startswith("| recipe |")).split(" | ")
    column = head.index("host RAM peak, anon (GiB)")
    assert not any("RSS" in h for h in head)
    planner = {(r["recipe"], r["size"]): r["ram_peak_gib"] for r in json.loads(report.RECIPES_JSON.read_text())["recipes"]}
    shown = 0
    for line in body.splitlines():
        cells = line.split(" | ")
        key = (cells[0].removeprefix("| "), cells[1]) if len(cells) > column else None
        if key in planner:
            value = cells[column]
            assert value.startswith(f"{planner[key]:.2f}"), (key, value)
            assert value.endswith("+ pinned (below)") == (report.PINNED_OUTSIDE_ANON in key[0])
            shown += 1
    assert shown >= 6
    streamed = results["recipes"]["nf4-streamed"]
    rss = max(s["ram_maxrss_gib"] for s in streamed["stages"])
    assert f"{rss:.2f}" not in body  # the 13.42 GiB that made 08 disagree with the planner
    pinned = max(s["ram_maxrss_gib"] for s in results["recipes"]["bf16-group-offload-block"]["stages"])
    note = next(line for line in body.splitlines() if line.startswith("- + pinned"))
    assert f"`bf16-group-offload-block` {pinned:.2f} GiB" in note


def test_notebook_04_embeds_its_short_table_and_links_the_rest():
    """04 shows at most eight recipes from recipes.json, as generated, with a link to docs/results.md; no dump."""
    data = json.loads(report.RECIPES_JSON.read_text())
    body = report.measured_markdown(data)
    nb = json.loads((report.ROOT / "notebooks" / "04_memory_profiling.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert f"{report.MEASURED_START}\n{body.strip()}\n{report.MEASURED_END}" in text
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    assert 6 <= len(rows) <= 8 and "[docs/results.md](../docs/results.md)" in body
    by_name = {(r["recipe"], r["size"]): r for r in data["recipes"]}
    for line in rows:
        name = line.split("`")[1]
        row = by_name[(name, report.MEASURED_SIZE)]
        assert f"| {row['s_per_step']:.3f} | {row['vram_peak_gib']:.2f} | {row['ram_peak_gib']:.2f} |" in line
    for dump in (report.START, report.COURSE_START, "| notebook | result |", "could bring back"):
        assert dump not in text
    assert len(text.split()) < 2500  # the generated dump alone was about 3,300 words
    missing = dict(data, recipes=[r for r in data["recipes"] if r["recipe"] != "bf16-resident"])
    assert "`bf16-resident`" not in report.measured_markdown(missing)  # a recipe without a row is left out


def test_markers_are_replaced_and_missing_markers_fail():
    text = f"before\n{report.START}\nold\n{report.END}\nafter"
    assert report.replace_marked(text, "new") == f"before\n{report.START}\nnew\n{report.END}\nafter"
    with pytest.raises(ValueError, match="markers"):
        report.replace_marked("no markers here", "new")


def test_gpu_slug_on_this_machine():
    assert cli.gpu_slug() == ("cpu" if not torch.cuda.is_available() else cli.gpu_slug())


def test_repeated_runs_keep_the_median_run_and_every_speed():
    def run(s1024, s512, device=8.0):
        return dict(ok=True, sizes=[dict(height=1024, width=1024, s_per_step=s1024),
                                    dict(height=512, width=768, s_per_step=s512)],
                    peaks=dict(vram_device_gib=device), load_s=4.0)

    chosen = cli.pick_median([run(0.23, 0.15), run(0.19, 0.10, 7.9), run(0.20, 0.14)])
    assert chosen["sizes"][0]["s_per_step"] == 0.20 and chosen["sizes"][1]["s_per_step"] == 0.14
    assert [r["s_per_step"]["1024x1024"] for r in chosen["repeats"]] == [0.23, 0.19, 0.20]
    assert [r["vram_device_gib"] for r in chosen["repeats"]] == [8.0, 7.9, 8.0]
    cell = report._speed(chosen, chosen["sizes"][0])
    assert cell == "0.200 (0.190-0.230, 3 runs)"
    failed = dict(ok=False, sizes=[], error="OOM")
    assert cli.pick_median([run(0.2, 0.1), failed]) is failed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_run_repeats_each_recipe_in_fresh_processes(tmp_path):
    out = tmp_path / "cpu.json"
    assert cli.main(["run", "--checkpoint", "tiny", "--recipes", "staged-nf4", "--sizes", "32x32", "--steps", "2",
                     "--repeat", "2", "--results", str(out), "--no-docs"]) == 0
    result = json.loads(out.read_text())["recipes"]["staged-nf4"]
    assert len(result["repeats"]) == 2 and all(r["s_per_step"]["32x32"] > 0 for r in result["repeats"])
    assert "2 runs)" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_a_killed_worker_keeps_the_sizes_it_finished(tmp_path, monkeypatch):
    """A timeout (here: a worker killed after its first size) keeps that size and names the stage."""
    real_run_worker = cli.run_worker

    def killed_after_first_size(args, log, timeout_s, preexec=None, env=None):
        code, output = real_run_worker(args, log, timeout_s, preexec, env)
        out = Path(args[args.index("--json") + 1])
        first = json.loads(out.read_text())
        first["sizes"], first["error"] = first["sizes"][:1], worker.INCOMPLETE
        out.write_text(json.dumps(first))
        return -1, output.replace("STAGE decode", "STAGE x") + f"\nSTAGE warm-up 32x48\nTIMEOUT after {timeout_s} s"

    monkeypatch.setattr(cli, "run_worker", killed_after_first_size)
    out = tmp_path / "cpu.json"
    code = cli.main(["run", "--checkpoint", "tiny", "--recipes", "staged-nf4", "--sizes", "64x64,32x48", "--steps", "1",
                     "--timeout", "99", "--results", str(out), "--no-docs"])
    result = json.loads(out.read_text())["recipes"]["staged-nf4"]
    assert code == 1 and not result["ok"] and [s["height"] for s in result["sizes"]] == [64]
    assert result["error"] == "TIMEOUT after 99 s in stage 'warm-up 32x48'"
    assert "| staged-nf4 | float32 | - | TIMEOUT after 99 s in stage 'warm-up 32x48' |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_worker_saves_partial_results_after_each_size(tiny, tmp_path):
    partial = tmp_path / "partial.json"
    result = worker.run("staged-nf4", tiny, [(32, 32), (1000, 64)], steps=1, partial_json=partial)
    saved = json.loads(partial.read_text())  # the bad second size never finished: the partial file stays
    assert saved["error"] == worker.INCOMPLETE and [s["height"] for s in saved["sizes"]] == [32]
    assert not result["ok"] and result["failed_stage"] == "warm-up 1000x64"


def test_a_timed_out_worker_log_is_text_and_names_its_stage(tmp_path, monkeypatch):
    """A worker killed at its timeout keeps what it printed (its STAGE lines), as text, and says it timed out."""
    import sys

    stalls = "import sys, time; print('STAGE denoise 1024x1024\\nSTAGE warm-up 512x768', flush=True); " \
             "print('compiling...', file=sys.stderr, flush=True); time.sleep(60)"
    monkeypatch.setattr(cli, "module_command", lambda module, *args: [sys.executable, "-c", stalls])
    code, output = cli.run_worker(["--recipe", "staged-nf4"], tmp_path / "log.txt", 3)
    assert code == -1 and output.startswith("STAGE denoise") and output.endswith("TIMEOUT after 3 s")
    assert "compiling..." in output and (tmp_path / "log.txt").read_text() == output
    partial = dict(ok=False, error=worker.INCOMPLETE, stages=[dict(stage="denoise 1024x1024")])
    cli.mark_killed(partial, code, output)
    assert partial["error"] == "TIMEOUT after 3 s in stage 'warm-up 512x768'"
    cli.mark_killed(partial, -9, "no stage lines in this log")
    assert partial["error"] == "worker exited -9 in stage 'after denoise 1024x1024'"


def test_every_recipe_has_a_callable_run():
    """A recipe factory that forgot to return its function fails on the GPU only ('NoneType' object is not callable)."""
    from benchmarks.recipes import RECIPES

    assert [name for name, r in RECIPES.items() if not callable(r.run)] == []


def test_notebook_outputs_keep_the_results_and_drop_progress_bars(tmp_path):
    """`python -m benchmarks outputs`: an executed notebook's printed results, headed by where they ran."""
    import nbformat

    from benchmarks import report

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(speed)\nmore()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="  0%|          | 0/5 [00:00<?, ?it/s]\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="regional compile: 23.0 s, 1.36x\n")]
    quiet = nbformat.v4.new_code_cell("x = 1")
    failed = nbformat.v4.new_code_cell("1 / 0")
    failed.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell, quiet, failed]
    executed = tmp_path / "09_faster.ipynb"
    nbformat.write(nb, executed)
    libs = dict(torch="2.11.0", diffusers="0.42.1", transformers="5.17.0", bitsandbytes="0.50.2")
    results = dict(provenance=dict(gpu="NVIDIA H100 80GB HBM3", driver="580", cuda="13.0", libraries=libs,
                                   date="2026-11-22T07:00:00+00:00", command="python -m fluxnb.course OUT", checkpoint="random-dev"),
                   envelope=dict(name="colab-t4"),
                   notebooks=[dict(notebook="09_faster.ipynb", passed=True, seconds=319.1, vram_device_peak_gib=10.97,
                                   ram_anon_peak_gib=11.98)])
    (tmp_path / "r.json").write_text(json.dumps(results))
    text = report.notebook_outputs(executed, tmp_path / "r.json")
    assert "executed on NVIDIA H100 80GB HBM3 (2026-11-22" in text and "inside the `colab-t4` envelope" in text
    assert "passed in 319 s, device VRAM peak 10.97 GiB" in text
    assert "regional compile: 23.0 s, 1.36x" in text and "it/s]" not in text
    assert "**cell 3** `1 / 0`" in text and "ZeroDivisionError: division by zero" in text
    assert "x = 1" not in text  # a cell that printed nothing is left out


def test_course_rows_take_each_notebooks_latest_run_per_envelope(tmp_path):
    """A notebook fixed and run again replaces its failure; other envelopes stay apart."""
    from benchmarks import report

    def write(name, envelope, date, gpu, notebooks):
        run = dict(envelope=dict(name=envelope, vram_gib=14.74, ram_gib=12.0, bf16=False),
                   provenance=dict(gpu=gpu, date=date, command="python -m fluxnb.course OUT"),
                   notebooks=[dict(notebook=n, passed=ok, vram_device_peak_gib=v) for n, ok, v in notebooks])
        (tmp_path / f"course-{name}.json").write_text(json.dumps(run))

    write("a", "colab-t4", "2026-11-22T07:37:00", "H100", [("05_x.ipynb", True, 4.1), ("06_y.ipynb", False, 3.3)])
    write("b", "colab-t4", "2026-11-22T08:01:00", "H200", [("06_y.ipynb", True, 3.3)])
    write("c", "8gb-card", "2026-11-22T05:00:00", "H100", [("06_y.ipynb", False, 7.9)])
    rows = {r["envelope"]: r for r in report.course_rows(tmp_path)}
    t4 = rows["colab-t4"]
    assert (t4["passed"], t4["notebooks"], t4["failed"]) == (2, 2, [])
    assert t4["gpu"] == "H100, H200" and t4["notebook_names"] == ["05", "06"] and t4["vram_peak_gib"] == 4.1
    assert rows["8gb-card"]["failed"] == ["06_y.ipynb"]


KLEIN_RECIPES = ["klein-bf16", "klein-fp16", "klein-nf4", "klein-nf4-encoder4bit", "klein-fp16-encoder4bit"]
KLEIN_STAGES = ["load transformer ({}) + VAE", "warm-up 64x64", "denoise 64x64", "free transformer", "decode 64x64"]


def test_the_klein_recipes_load_klein():
    assert [name for name, r in RECIPES.items() if r.model == "klein"] == KLEIN_RECIPES
    assert all(RECIPES[name].model_id == "black-forest-labs/FLUX.2-klein-4B" for name in KLEIN_RECIPES)
    assert RECIPES["staged-nf4"].model == "flux1"
    assert {name: RECIPES[name].compute_dtype for name in KLEIN_RECIPES} == {
        "klein-bf16": "bf16", "klein-fp16": "fp16", "klein-nf4": "auto", "klein-nf4-encoder4bit": "auto",
        "klein-fp16-encoder4bit": "fp16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_every_klein_recipe_runs_the_staged_flow_on_tiny_klein():
    """Each klein-* row through the worker on tiny klein (a second each): the staged stages, klein's guidance."""
    checkpoint = fluxnb.checkpoints.stand_in_folder("black-forest-labs/FLUX.2-klein-4B", "tiny")
    encoders = {"klein-bf16": "bf16", "klein-fp16": "fp16", "klein-nf4": "fp32", "klein-nf4-encoder4bit": "nf4",
                "klein-fp16-encoder4bit": "nf4"}
    transformers = {"klein-bf16": "bf16", "klein-fp16": "fp16", "klein-nf4": "nf4", "klein-nf4-encoder4bit": "nf4",
                    "klein-fp16-encoder4bit": "fp16"}
    for name in KLEIN_RECIPES:
        result = worker.run(name, checkpoint, [(64, 64)], steps=1)
        assert result["ok"] and result["error"] is None and result["model"] == "klein", (name, result["error"])
        assert [s["stage"] for s in result["stages"]] == [f"encode (Qwen3 {encoders[name]})",
                                                          KLEIN_STAGES[0].format(transformers[name]), *KLEIN_STAGES[1:]]
        assert result["sizes"][0]["latents_finite"] is True and result["sizes"][0]["s_per_step"] > 0
        assert result["load_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_one_checkpoint_choice_resolves_per_recipe_and_klein_gets_its_own_table(tmp_path):
    """``--checkpoint tiny`` gives FLUX.1's rows tiny FLUX.1-dev and klein's tiny klein (random-dev: random-klein);
    the report puts klein's rows in their own table and marks them for the planner."""
    out = tmp_path / "cpu.json"
    code = cli.main(["run", "--checkpoint", "tiny", "--recipes", "staged-nf4,klein-fp16-encoder4bit", "--sizes", "32x32",
                     "--steps", "1", "--results", str(out), "--no-docs"])
    data = json.loads(out.read_text())
    assert code == 0
    flux1, klein = data["recipes"]["staged-nf4"], data["recipes"]["klein-fp16-encoder4bit"]
    assert "flux.1-dev" in flux1["provenance"]["checkpoint"] and "flux.2-klein-4b" in klein["provenance"]["checkpoint"]
    assert klein["provenance"]["stand_in"] == "tiny" and klein["model"] == "klein" and klein["ok"]
    text = report.markdown(data)
    main, _, rest = text.partition("FLUX.2 [klein] 4B recipes")
    assert "| staged-nf4 |" in main and "| klein-fp16-encoder4bit |" not in main
    assert "| klein-fp16-encoder4bit | float16 | 32x32 |" in rest and "| staged-nf4 |" not in rest
    rows = report.recipe_rows(data)
    assert [r.get("model") for r in rows] == [None, "klein"]  # FLUX.1's rows stay as they were
    assert "FLUX.2-klein-4B's" in report.recipes_json([out], course_folder=tmp_path)["note"]
    assert "`random-klein`" in report.results_document("", text, None)
    assert "`random-klein`" not in report.results_document("", report.markdown(dict(
        data, recipes={"staged-nf4": flux1})), None)
