"""The planner against a fixture of results (so the answers do not move when new rows are measured),
and the shipped recipes.json against the committed benchmark results it is generated from."""

import json
from pathlib import Path

import pytest

from benchmarks import report
from fluxnb import planner

ROOT = Path(__file__).resolve().parent.parent


def _row(recipe, s_per_step, vram, ram=1.5, compute="bfloat16", gpus=1, size="1024x1024", **extra):
    return dict(recipe=recipe, description=f"{recipe} (fixture)", size=size, compute=compute, gpus=gpus,
                images_at_once=extra.pop("images_at_once", 1), s_per_step=s_per_step, vram_peak_gib=vram,
                ram_peak_gib=ram, compile_s=extra.pop("compile_s", None), warmup_s=1.0,
                exact=extra.pop("exact", True), gpu="NVIDIA H100 80GB HBM3", date="2026-11-21",
                command="python -m benchmarks run (fixture)", upper_bound=False, **extra)


FIXTURE = dict(recipes=[
    _row("bf16-resident", 0.183, 36.8),
    _row("staged-nf4", 0.193, 8.26),
    _row("staged-nf4-expandable", 0.199, 7.75),
    _row("staged-nf4-fp16", 0.204, 8.26, compute="float16"),
    _row("nf4-model-offload", 0.208, 11.3, ram=18.9),
    _row("staged-nf4-compile", 0.144, 7.95, compile_s=32.0),
    _row("staged-nf4-fbcache", 0.090, 8.3, exact=False),
    _row("split-bf16-2gpu", 0.30, 15.5, gpus=2),
    _row("two-pipelines-nf4", 0.21, 8.3, gpus=2, images_at_once=2),
    _row("staged-nf4", 0.118, 8.26, size="512x768"),
], course=[dict(envelope="colab-t4", vram_gib=14.74, ram_gib=12.0, bf16=False, passed=5, notebooks=5, failed=[],
                vram_peak_gib=7.67, gpu="NVIDIA H100 80GB HBM3", date="2026-11-22", command="fixture")])


def test_a_t4_gets_the_staged_nf4_flow_in_fp16_with_a_rough_speed_for_a_t4():
    p = planner.plan(vram_gib=14.74, ram_gib=12.0, gpu_count=1, bf16=False, gpu_name="Tesla T4", data=FIXTURE)
    assert p.recipe["recipe"] == "staged-nf4-fp16"  # the only fp16 row; bf16 rows do not apply without bf16
    text = str(p)
    assert "measured on NVIDIA H100 80GB HBM3" in text and "on your Tesla T4 roughly" in text
    assert f"{0.204 * 989 / 65:.2f} s/step" in text  # scaled by the datasheet ratio it names
    assert "8.26 GiB VRAM" in text and "colab-t4" in text and "all 5 passed" in text


def test_an_8gb_card_gets_what_fits_with_the_margin():
    p = planner.plan(vram_gib=8.0, ram_gib=16.0, gpu_count=1, bf16=True, data=FIXTURE)
    assert p.recipe["recipe"] == "staged-nf4-expandable"  # 7.75 + 0.2 <= 8.0; staged-nf4's 8.26 does not fit
    assert {r["recipe"] for r in p.fitting} == {"staged-nf4-expandable"}
    assert "torch.compile" not in str(p)  # 7.95 + 0.2 > 8.0: no compiled extra to offer


def test_80gb_gets_bf16_resident_and_compile_only_as_an_extra():
    p = planner.plan(vram_gib=79.2, ram_gib=128.0, gpu_count=1, bf16=True, data=FIXTURE)
    assert p.recipe["recipe"] == "bf16-resident"
    assert "faster with torch.compile: `staged-nf4-compile` 0.144 s/step after 32 s" in str(p)
    assert "fbcache" not in str(p)  # step caching changes outputs: not offered unless asked
    assert planner.plan(vram_gib=79.2, ram_gib=128.0, gpu_count=1, bf16=True, data=FIXTURE,
                        allow_compile=True).recipe["recipe"] == "staged-nf4-compile"
    assert planner.plan(vram_gib=79.2, ram_gib=128.0, gpu_count=1, bf16=True, data=FIXTURE,
                        allow_approximate=True).recipe["recipe"] == "staged-nf4-fbcache"


def test_host_ram_and_gpu_count_rule_recipes_out():
    p = planner.plan(vram_gib=12.0, ram_gib=12.0, gpu_count=1, bf16=True, data=FIXTURE)
    assert "nf4-model-offload" not in {r["recipe"] for r in p.fitting}  # needs 18.9 GiB of host RAM
    two = planner.plan(vram_gib=16.0, ram_gib=64.0, gpu_count=2, bf16=True, data=FIXTURE)
    assert two.recipe["recipe"] == "two-pipelines-nf4"  # 0.21 s/step for 2 images: 0.105 per image-step
    assert "per GPU" in str(two)


def test_too_small_says_nothing_fits_and_what_the_smallest_needs():
    p = planner.plan(vram_gib=6.0, ram_gib=16.0, gpu_count=1, bf16=True, data=FIXTURE)
    assert not p.fits and p.recipe is None and p.smallest["recipe"] == "staged-nf4-expandable"
    assert "nothing measured fits: the smallest, `staged-nf4-expandable`, needs 7.75 GiB" in str(p)
    assert "1.75 GiB more VRAM" in str(p)
    cpu = planner.plan(vram_gib=None, ram_gib=16.0, gpu_count=0, bf16=False, data=FIXTURE)
    assert not cpu.fits and "no GPU" in str(cpu) and "FLUXNB_CHECKPOINT=tiny" in str(cpu)


def test_an_unmeasured_size_is_a_clear_error():
    with pytest.raises(ValueError, match="measured sizes are 1024x1024, 512x768"):
        planner.plan(vram_gib=16.0, ram_gib=16.0, gpu_count=1, bf16=True, size="2048x2048", data=FIXTURE)


def test_gpu_names_map_to_the_datasheet_table():
    assert planner.peak_tflops("Tesla T4") == 65.0
    assert planner.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert planner.peak_tflops("NVIDIA L40S") == 362.0 and planner.peak_tflops("NVIDIA L4") == 121.0
    assert planner.peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert planner.peak_tflops("NVIDIA A10G") is None and planner.peak_tflops(None) is None


def test_defaults_read_this_machine(monkeypatch):
    monkeypatch.delenv("FLUXNB_ENVELOPE", raising=False)
    p = planner.plan(data=FIXTURE)
    assert p.machine["gpu_count"] is not None and p.machine["ram_gib"] > 0


def test_shipped_recipes_json_is_generated_from_the_committed_results():
    shipped = json.loads(planner.RECIPES_JSON.read_text())
    fresh = report.recipes_json(sorted((ROOT / "benchmarks" / "results").glob("*.json")))
    assert shipped == json.loads(json.dumps(fresh)), "stale: run `python -m benchmarks report`"
    assert {"staged-nf4-fp16", "bf16-resident"} <= {r["recipe"] for r in shipped["recipes"]}
    assert planner.plan(vram_gib=14.74, ram_gib=12.0, gpu_count=1, bf16=False).recipe is not None


def test_pyproject_ships_recipes_json():
    assert '"results/*.json"' in (ROOT / "pyproject.toml").read_text()


def test_recipe_rows_skip_failures_and_take_per_gpu_peaks():
    results = json.loads((ROOT / "benchmarks" / "results" / "h100.json").read_text())
    rows = report.recipe_rows(results)
    assert "staged-nf4-compile-full" not in {r["recipe"] for r in rows}  # timed out: not recommended
    assert "nf4-save-reload" not in {r["recipe"] for r in rows}  # load times only
    multi = dict(results["recipes"]["staged-nf4"], recipe="split-bf16-2gpu", gpus=2,
                 per_gpu_peaks_gib={"cuda:0": 9.5, "cuda:1": 12.25})
    row = report.recipe_rows(dict(results, recipes={"x": multi}))[0]
    assert row["gpus"] == 2 and row["vram_peak_gib"] == 12.25


def test_the_command_line_answers_for_a_t4_and_asks_about_bf16(capsys):
    assert planner.main(["--vram", "14.74", "--ram", "12", "--no-bf16", "--gpu-name", "Tesla T4"]) == 0
    assert "staged-nf4-fp16" in capsys.readouterr().out
    assert planner.main(["--vram", "6", "--ram", "16", "--bf16"]) == 0  # streaming the NF4 blocks fits 6 GiB
    assert "nf4-streamed" in capsys.readouterr().out
    assert planner.main(["--vram", "1.5", "--ram", "16", "--bf16"]) == 1  # nothing measured fits: exit 1
    with pytest.raises(SystemExit):
        planner.main(["--vram", "14.74", "--ram", "12"])
    assert "--no-bf16" in capsys.readouterr().err


def test_the_committed_course_runs_cover_every_notebook_in_both_envelopes():
    """Finding 3 of issue 16: no notebook after 08 had been run in the 8gb-card envelope, and README and
    the planner said "00-04, 08 passed". Every notebook's latest committed run in each envelope passed,
    and the planner's course line (from recipes.json) counts all of them."""
    notebooks = sorted(p.name[:2] for p in (Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))
    rows = {row["envelope"]: row for row in planner.load_recipes()["course"]}
    for envelope in ("colab-t4", "8gb-card"):
        row = rows[envelope]
        assert sorted(row["notebook_names"]) == notebooks, (envelope, row["notebook_names"])
        assert not row["failed"] and row["passed"] == len(notebooks), (envelope, row["failed"])
    line = next(n for n in planner.plan(vram_gib=7.6, ram_gib=16, gpu_count=1, bf16=True).notes if "8gb-card" in n)
    assert f"all {len(notebooks)} passed" in line


KLEIN = dict(recipes=[*FIXTURE["recipes"],
                      _row("klein-bf16", 0.10, 17.5, model="klein"), _row("klein-bf16", 0.05, 17.0, size="512x768", model="klein"),
                      _row("klein-fp16-encoder4bit", 0.11, 9.8, compute="float16", model="klein"),
                      _row("klein-fp16-encoder4bit", 0.06, 9.5, compute="float16", size="512x768", model="klein")],
             course=FIXTURE["course"])


def test_klein_reads_only_klein_rows_and_flux1_only_its_own():
    p = planner.plan(vram_gib=14.74, ram_gib=12.0, gpu_count=1, bf16=False, gpu_name="Tesla T4", data=KLEIN, model="klein")
    assert p.recipe["recipe"] == "klein-fp16-encoder4bit" and {r["recipe"] for r in p.fitting} == {"klein-fp16-encoder4bit"}
    assert "colab-t4" not in str(p)  # the course runs are FLUX.1's notebooks
    assert planner.plan(vram_gib=80.0, ram_gib=128.0, gpu_count=1, bf16=True, data=KLEIN,
                        model="klein").recipe["recipe"] == "klein-bf16"
    flux1 = planner.plan(vram_gib=14.74, ram_gib=12.0, gpu_count=1, bf16=False, data=KLEIN)
    assert not any(r["recipe"].startswith("klein-") for r in flux1.fitting)
    t4 = planner.step_seconds(1024, 1024, "Tesla T4", bf16=False, data=KLEIN, model="klein")
    assert t4 == pytest.approx(0.11 * 989 / 65)
    assert planner.step_seconds(1024, 1024, "NVIDIA H100 80GB HBM3", data=KLEIN, model="klein") == pytest.approx(0.10)
    line = planner.eta(4, 1024, 1024, what="the 4 denoising steps", data=KLEIN, model="klein")
    assert line.startswith("the 4 denoising steps: 4 steps at 1024x1024") and "on a free Colab T4" in line
    assert "FLUX.2 [klein]" in line and "not known" not in line


def test_klein_without_measured_rows_says_so_and_makes_up_no_number(capsys):
    line = planner.eta(4, 1024, 1024, what="the 4 denoising steps", data=FIXTURE, model="klein")
    assert "a T4 time is not known yet" in line and "s on a free Colab T4" not in line and "H100" not in line
    assert planner.step_seconds(1024, 1024, "Tesla T4", bf16=False, data=FIXTURE, model="klein") is None
    p = planner.plan(vram_gib=14.74, ram_gib=12.0, gpu_count=1, bf16=False, data=FIXTURE, model="klein")
    assert not p.fits and "No FLUX.2 [klein] recipe has been measured yet" in str(p)
    shipped = planner.load_recipes()
    if not planner.rows_of(shipped, "klein"):  # the shipped results, until klein's rows are committed
        assert planner.main(["--vram", "14.74", "--ram", "12", "--no-bf16", "--model", "klein"]) == 1
        assert "No FLUX.2 [klein] recipe has been measured yet" in capsys.readouterr().out
        assert "not known yet" in planner.eta(4, 1024, 1024, what="the 4 denoising steps", model="klein")
    with pytest.raises(ValueError, match="model must be one of"):
        planner.step_seconds(1024, 1024, "Tesla T4", model="flux2")
