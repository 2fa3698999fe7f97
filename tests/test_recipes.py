"""The copy-paste recipes (recipes/*.py): each runs in tiny mode on the CPU, and says what the notebooks say.

"In step" is checked on the code itself: the quantization configs, the loaders' safety arguments,
the encode call, the default settings and the seeding are compared with fluxnb/stages.py (the code
notebooks 01-04 show), and one recipe's image is compared pixel for pixel with the notebooks' flow.
"""

import ast
import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fluxnb
from fluxnb import capacity, faster, quantization, recipes, stages
from fluxnb.prequantized import PREQUANTIZED_REPOS

REPO = Path(__file__).parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.py"))
NAMES = [p.stem for p in RECIPES]
SINGLE_GPU_OR_CPU = [n for n in NAMES if n != "two_gpus"]
TINY_ARGS = ["--checkpoint", "tiny", "--steps", "2", "--height", "64", "--width", "48", "--seed", "7",
             "--prompt", "a red fox"]
ALLOWED_IMPORTS = {"argparse", "gc", "json", "os", "time", "pathlib", "torch", "diffusers", "transformers", "PIL",
                   "bitsandbytes"}


def start_recipe(name: str, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # FLUXNB_CACHE: the tests' (conftest.py)
    return subprocess.Popen([sys.executable, str(REPO / "recipes" / f"{name}.py"), *TINY_ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_recipe(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return finish(start_recipe(name, out, *extra))


def test_the_course_recipes_each_have_a_script():
    assert set(NAMES) == {"t4_staged_nf4_fp16", "card_8gb_staged_nf4_bf16", "model_cpu_offload",
                          "prequantized_from_hub", "two_gpus", "all_resident_bf16", "t4_flux2_klein_fp16"}
    for name in capacity.SIZE_MODEL_RECIPES:  # what an out-of-memory message tells a learner to run
        assert recipes.RECIPES[name].script, name


def test_one_table_names_every_script_and_every_benchmark_row():
    """fluxnb.recipes.RECIPES is the one list of recipes: every script in recipes/ is named there, every
    script it names exists, and the benchmark runs exactly its measured recipes (in its own order)."""
    from benchmarks.recipes import RECIPES as BENCHMARK

    scripts = [r.script for r in recipes.RECIPES.values() if r.script]
    assert sorted(scripts) == sorted(f"recipes/{p.name}" for p in RECIPES)  # each script once, and no other
    assert all((REPO / script).is_file() for script in scripts)
    per_scheme = {recipes.PER_SCHEME + scheme for scheme in quantization.SCHEMES}  # described by their schemes
    assert set(BENCHMARK) == {name for name, r in recipes.RECIPES.items() if r.measured} | per_scheme
    assert all(BENCHMARK[name].description == recipes.RECIPES[name].description for name in set(BENCHMARK) - per_scheme)
    assert {f"staged-nf4-cache-{name}" for name in faster.CACHES} <= set(recipes.RECIPES)  # one row per step cache
    assert all(BENCHMARK[name].model == recipes.RECIPES[name].family for name in set(BENCHMARK) - per_scheme)
    assert all(r.measured or r.script for r in recipes.RECIPES.values())  # a recipe nobody runs is not one
    assert recipes.how_to_run("staged-nf4-fp16") == "recipes/t4_staged_nf4_fp16.py (staged NF4, fp16: a T4)"
    for r in recipes.RECIPES.values():  # each script runs the family its row says (fluxnb.checkpoints.family_of)
        assert r.family in ("flux1", "klein"), r.name
        if r.script:
            model = re.search(r'^MODEL_ID = "([^"]+)"', (REPO / r.script).read_text(), re.M).group(1)
            assert fluxnb.checkpoints.family_of(model) == r.family, (r.name, model)
    assert {n for n, r in recipes.RECIPES.items() if r.family == "klein" and r.script} == {"klein-fp16"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each single-GPU recipe once, in tiny mode on the CPU: its result line and output folder."""
    fluxnb.allow_bitsandbytes_on_cpu()
    for variant in ("dev", "schnell", "klein"):  # built once, here: the recipes' stand-in Hubs serve them
        fluxnb.build_tiny(variant)
    fluxnb.prequantized.stand_in_package("tiny", fluxnb.pick_dtype())
    outs = {name: tmp_path_factory.mktemp(name) for name in SINGLE_GPU_OR_CPU}
    started = {name: start_recipe(name, out) for name, out in outs.items()}  # in parallel: each is one process
    runs = {}
    for name, process in started.items():
        done = finish(process)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        runs[name] = (json.loads(done.stdout.strip().splitlines()[-1]), outs[name], done)
    return runs


@pytest.mark.parametrize("name", SINGLE_GPU_OR_CPU)
def test_each_recipe_runs_in_tiny_mode_and_saves_a_png_with_its_settings(tiny_runs, name):
    result, out, _ = tiny_runs[name]
    image = Image.open(result["image"])
    assert Path(result["image"]).parent == out and image.size == (48, 64)
    assert {k: image.text[k] for k in ("prompt", "seed", "steps", "height", "width", "checkpoint")} == {
        "prompt": "a red fox", "seed": "7", "steps": "2", "height": "64", "width": "48", "checkpoint": "tiny"}
    assert image.text["recipe"] == result["recipe"]


def test_a_second_run_never_overwrites_the_first(tiny_runs):
    result, out, _ = tiny_runs["all_resident_bf16"]
    again = run_recipe("all_resident_bf16", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["image"] != result["image"]
    assert sorted(p.name for p in out.glob("*.png")) == ["image-0001.png", "image-0002.png"]


def test_two_gpus_stops_at_once_on_a_machine_with_fewer(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs: the GPU script (benchmarks/gpu_recipes.sh) runs the recipe")
    done = run_recipe("two_gpus", tmp_path)
    assert done.returncode == 1 and not any(tmp_path.iterdir())
    assert f"splits FLUX.1 over two GPUs and this machine has {torch.cuda.device_count()}: skipped, nothing was loaded" in done.stderr


def test_the_t4_recipe_makes_the_notebooks_image(tiny_runs, tmp_path):
    """The same settings through fluxnb.stages (notebooks 01-03, with the T4's dtypes) give the same pixels."""
    result, _, _ = tiny_runs["t4_staged_nf4_fp16"]
    tiny = str(fluxnb.build_tiny("dev"))
    fluxnb.allow_bitsandbytes_on_cpu()
    settings = fluxnb.generation_settings("black-forest-labs/FLUX.1-dev")
    path = fluxnb.encode_and_save(tiny, "a red fox", torch.float32, tmp_path, settings["max_sequence_length"])
    embeds, _ = fluxnb.load_embeddings(path, "cpu")
    pipe = fluxnb.load_denoising_pipeline(tiny, fluxnb.load_transformer_4bit(tiny, torch.float16), torch.float16)
    latents = fluxnb.denoise(pipe, embeds, 64, 48, 2, settings["guidance"], 7)
    image = fluxnb.decode(pipe.vae, latents, 64, 48)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(result["image"]).convert("RGB")))


def test_the_klein_recipe_makes_the_one_pipeline_image(tiny_runs):
    """Staged (encode, free, denoise, free, decode) gives the pixels of one Flux2KleinPipeline call, fp16 as on a T4."""
    from diffusers import Flux2KleinPipeline

    result, _, _ = tiny_runs["t4_flux2_klein_fp16"]
    assert result["recipe"] == "klein-fp16" and result["dtype"] == "torch.float16"
    pipe = Flux2KleinPipeline.from_pretrained(str(fluxnb.build_tiny("klein")), dtype=torch.float16, use_safetensors=True)
    image = pipe(prompt="a red fox", height=64, width=48, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(result["image"]).convert("RGB")))


# --- the code says what the notebooks say -------------------------------------------------------------


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node):
        f = node.func
        return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) == name]


def _kwargs(call: ast.Call) -> dict[str, str]:
    return {k.arg: ast.unparse(k.value) for k in call.keywords}


STAGES = _tree(Path(stages.__file__))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_quantization_configs_are_the_notebooks(path):
    ours = _calls(_tree(path), "BitsAndBytesConfig") + _calls(_tree(path), "DiffusersBitsAndBytesConfig")
    theirs = _calls(STAGES, "BitsAndBytesConfig")
    assert {tuple(sorted(_kwargs(c))) for c in theirs} == {("bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "load_in_4bit")}
    for call in ours:
        kwargs = _kwargs(call)
        assert sorted(kwargs) == ["bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "load_in_4bit"]
        assert kwargs["load_in_4bit"] == "True" and kwargs["bnb_4bit_quant_type"] == "'nf4'"
        assert kwargs["bnb_4bit_compute_dtype"] in ("DTYPE", "TEXT_DTYPE")
    expected = {"two_gpus": 0, "all_resident_bf16": 0, "prequantized_from_hub": 0, "t4_flux2_klein_fp16": 0}.get(path.stem, 2)
    assert len(ours) == expected  # T5 and the transformer; none where nothing is quantized while loading (klein: fp16)


@pytest.mark.parametrize("path", RECIPES + [Path(stages.__file__)], ids=lambda p: p.stem)
def test_every_load_is_safetensors_and_runs_no_remote_code(path):
    calls = _calls(_tree(path), "from_pretrained")
    assert calls
    for call in calls:
        kwargs = _kwargs(call)
        assert kwargs.get("use_safetensors") == "True", f"{path.name}:{call.lineno}: use_safetensors=True missing"
        assert "trust_remote_code" not in kwargs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_prompt_encoding_seeding_and_defaults_are_the_notebooks(path):
    tree = _tree(path)
    source = path.read_text()
    model = re.search(r'^MODEL_ID = "([^"]+)"', source, re.M).group(1)
    assert model in ("black-forest-labs/FLUX.1-dev", KLEIN)
    encode = _calls(tree, "encode_prompt")
    if encode and model == KLEIN:  # klein's recipe encodes as notebook 12's cells do
        theirs = {tuple(sorted(_kwargs(c))) for c in _calls(_notebook_tree(NOTEBOOK_12), "encode_prompt")}
        assert theirs == {("device", "max_sequence_length", "prompt")}
        assert {tuple(sorted(_kwargs(c))) for c in encode} == theirs
    elif encode:  # the staged recipes encode as fluxnb.stages.encode_prompt does
        (theirs,) = [c for c in _calls(STAGES, "encode_prompt") if isinstance(c.func, ast.Attribute)]  # pipe.encode_prompt
        assert [sorted(_kwargs(c)) for c in encode] == [sorted(_kwargs(theirs))]
    assert 'generator=torch.Generator("cpu").manual_seed(args.seed)' in source  # stages.denoise's seeding
    assert 'generator=torch.Generator("cpu").manual_seed(seed)' in Path(stages.__file__).read_text()
    assert 'generator=torch.Generator("cpu").manual_seed(SEED)' in NOTEBOOK_12.read_text().replace('\\"', '"')
    settings = fluxnb.generation_settings(model)  # dev's, or klein's 4 steps and guidance 1.0
    defaults = {a.dest: a.default for a in _parser(path)._actions}
    assert (defaults["steps"], defaults["guidance"], defaults["max_sequence_length"]) == (
        settings["steps"], settings["guidance"], settings["max_sequence_length"])
    assert "output_type=\"latent\"" in source or "images[0]" in source


KLEIN = "black-forest-labs/FLUX.2-klein-4B"
NOTEBOOK_12 = REPO / "notebooks" / "12_flux2_klein.ipynb"


def _notebook_tree(path: Path) -> ast.Module:
    """A notebook's code cells as one module (IPython's % lines left out)."""
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return ast.parse("\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith("%") else line
                               for cell in code for line in cell.splitlines()))  # %-lines: pass, as IPython runs them


def _parser(path: Path):
    """The recipe's argparse parser, built without running the recipe."""
    namespace = {}
    tree = _tree(path)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))
            or (isinstance(n, ast.FunctionDef) and n.name == "parse_args")]
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    captured = {}

    class Stop(Exception):
        pass

    import argparse

    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise Stop

    argparse.ArgumentParser.parse_args = capture
    try:
        namespace["parse_args"]()
    except Stop:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def test_dtypes_follow_the_notebooks_rule():
    """Notebooks: DTYPE = bf16 where the GPU has it, else fp16; TEXT_DTYPE = float32 when DTYPE is fp16."""
    t4 = (REPO / "recipes" / "t4_staged_nf4_fp16.py").read_text()
    assert "DTYPE = torch.float16" in t4 and "TEXT_DTYPE = torch.float32" in t4
    card = (REPO / "recipes" / "card_8gb_staged_nf4_bf16.py").read_text()
    assert "DTYPE = torch.bfloat16" in card and "TEXT_DTYPE = DTYPE" in card
    for name in ("model_cpu_offload", "prequantized_from_hub", "two_gpus"):
        assert "TEXT_DTYPE = torch.float32 if DTYPE == torch.float16 else DTYPE" in (REPO / "recipes" / f"{name}.py").read_text()
    klein = (REPO / "recipes" / "t4_flux2_klein_fp16.py").read_text()  # Qwen3 in float32 would not fit a T4: fp16
    assert "DTYPE = torch.float16" in klein and "TEXT_DTYPE" not in klein


def test_the_prequantized_package_is_the_courses():
    source = (REPO / "recipes" / "prequantized_from_hub.py").read_text()
    assert f'PREQUANTIZED = "{PREQUANTIZED_REPOS["dev"]}"' in source
    ours = next(n for n in _tree(REPO / "recipes" / "prequantized_from_hub.py").body
                if isinstance(n, ast.FunctionDef) and n.name == "set_compute_dtype")
    theirs = next(n for n in STAGES.body if isinstance(n, ast.FunctionDef) and n.name == "set_compute_dtype")
    assert ast.unparse(ours.body[1:]) == ast.unparse(theirs.body[1:])  # the same loop, docstrings aside


def test_the_big_gpu_recipe_states_its_measured_need():
    peak = json.loads((REPO / "benchmarks" / "results" / "h100.json").read_text())["recipes"]["bf16-resident"]["peaks"]
    source = (REPO / "recipes" / "all_resident_bf16.py").read_text()
    assert f"NEED_GIB = {math.ceil(peak['vram_device_gib'])} " in source


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_use_only_the_libraries_and_fluxnb_only_for_stand_ins_and_checks(path):
    """The libraries, and of fluxnb only the checks before loading and the save (one import line) and the
    stand-ins (inside the functions that resolve them)."""
    tree = _tree(path)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    top = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0] for n in imports}
    assert top <= ALLOWED_IMPORTS | {"fluxnb"}, top - ALLOWED_IMPORTS
    ours = [ast.unparse(n) for n in imports if ast.unparse(n).split()[1].startswith("fluxnb")]
    assert ours == ["from fluxnb.recipe_checks import check_before_loading, save_or_keep"]
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(func):
            if isinstance(node, ast.Import) and any(a.name == "fluxnb" for a in node.names):
                assert func.name in ("checkpoint_path", "prequantized_path"), f"{path.name}: fluxnb in {func.name}"


# --- bad input stops before anything loads; a finished image is never lost (issue 25, finding 6) ----------

HARNESS = r'''
import errno, json, os, runpy, shutil, sys
from pathlib import Path

report, fault, script, *argv = sys.argv[1:]
seen = {}
import fluxnb

real_resolve = fluxnb.switch.resolve_checkpoint


def resolve(*args, **kwargs):  # the stand-ins must be resolved before huggingface_hub is first imported
    seen.setdefault("huggingface_hub_imported_before_resolve", "huggingface_hub" in sys.modules)
    return real_resolve(*args, **kwargs)


fluxnb.resolve_checkpoint = resolve  # what the scripts' checkpoint_path calls
out = Path(argv[argv.index("--out") + 1]).resolve()
if fault == "disk-full":  # the disk of --out fills up half way through the PNG
    from PIL import Image

    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if Path(getattr(fp, "name", str(fp))).resolve().parent == out:
            fp.write(b"\x89PNG\r\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    Image.Image.save = save
elif fault == "folder-replaced":  # after the checks passed, --out is replaced by a file (one of the user's)
    from PIL import PngImagePlugin

    real_info = PngImagePlugin.PngInfo

    def info(*args, **kwargs):  # save_png calls it after its mkdir, before it opens the file
        if out.is_dir():
            shutil.rmtree(out)
            out.write_text("a file of the user's")
        return real_info(*args, **kwargs)

    PngImagePlugin.PngInfo = info
sys.argv = [script, *argv]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    seen["imported"] = sorted(m for m in ("diffusers", "transformers", "huggingface_hub") if m in sys.modules)
    Path(report).write_text(json.dumps(seen))
'''
"""Runs a recipe unchanged (``runpy``, as ``python recipe.py`` does), with a fault injected at its save if
asked, and reports which libraries it had imported when it ended and whether ``huggingface_hub`` was
imported before the stand-in was resolved."""


def start_checked(folder: Path, name: str, *extra: str, fault: str = "none", cwd: Path | None = None,
                  own_cache: bool = True) -> tuple[subprocess.Popen, Path]:
    """Start recipe ``name`` in tiny mode (``TINY_ARGS``, ``--out folder/images``, then ``extra``) through
    HARNESS; with ``own_cache``, FLUXNB_CACHE is ``folder/cache``, so a stand-in built shows there."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if own_cache:
        env["FLUXNB_CACHE"] = str(folder / "cache")
    report = folder / "report.json"
    command = [sys.executable, "-c", HARNESS, str(report), fault, str(REPO / "recipes" / f"{name}.py"), *TINY_ARGS,
               "--out", str(folder / "images"), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd or folder), report


def finish_checked(started: tuple[subprocess.Popen, Path]) -> tuple[subprocess.CompletedProcess, dict]:
    process, report = started
    done = finish(process)
    return done, json.loads(report.read_text()) if report.is_file() else {}


def run_checked(folder: Path, name: str, *extra: str, **kwargs) -> tuple[subprocess.CompletedProcess, dict]:
    return finish_checked(start_checked(folder, name, *extra, **kwargs))


def refused(done: subprocess.CompletedProcess) -> str:
    """The one line a refused run printed: exit status 2, one line on stderr, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, (
        done.returncode, done.stderr[-3000:])
    return lines[0]


def assert_nothing_loaded(report: dict, folder: Path, hub: bool = False) -> None:
    """Neither diffusers nor transformers was imported (nor huggingface_hub, unless a Hub id was checked),
    and no stand-in was built."""
    assert report["imported"] == (["huggingface_hub"] if hub else []), report
    assert not (folder / "cache").exists()


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_an_out_folder_that_cannot_be_written_stops_before_loading(tmp_path, where):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    out = notes / "images" if where == "under a file" else Path("/proc/forbidden")
    done, report = run_checked(tmp_path, "t4_staged_nf4_fp16", "--out", str(out))
    line = refused(done)
    assert line.startswith(f"--out {out}: ") and "pass a folder" in line, line
    assert_nothing_loaded(report, tmp_path)
    assert notes.read_text() == "the user's notes"


def test_zero_steps_stop_before_loading(tmp_path):
    done, report = run_checked(tmp_path, "t4_staged_nf4_fp16", "--steps", "0")
    line = refused(done)
    assert line.startswith("--steps 0: ") and "must be an integer >= 1" in line, line
    assert_nothing_loaded(report, tmp_path)
    assert not (tmp_path / "images").exists()  # the settings are checked before the folder is made


@pytest.mark.parametrize("flag, value, nearest", [("--height", "50", "height=48"), ("--width", "0", "width=16"),
                                                   ("--width", "8192", "width=4096")])
def test_a_size_flux_cannot_make_stops_before_loading_with_the_nearest_one(tmp_path, flag, value, nearest):
    done, report = run_checked(tmp_path, "t4_staged_nf4_fp16", flag, value)
    line = refused(done)
    assert line.startswith(f"{flag} {value}: ") and f"try {nearest}." in line, line
    assert_nothing_loaded(report, tmp_path)


@pytest.mark.parametrize("checkpoint", ["does/not-exist", "./no/such/folder"])
def test_a_checkpoint_that_is_not_there_stops_before_loading(tmp_path, checkpoint):
    """Offline (HF_HUB_OFFLINE=1): a Hub id that is not cached, or a folder that does not exist. The output
    folder the check made for the run is removed again."""
    out = tmp_path / "new" / "images"
    done, report = run_checked(tmp_path, "t4_staged_nf4_fp16", "--checkpoint", checkpoint, "--out", str(out))
    line = refused(done)
    assert line.startswith(f"--checkpoint {checkpoint}: there is no such folder") and "--checkpoint tiny" in line
    assert_nothing_loaded(report, tmp_path, hub=checkpoint == "does/not-exist")
    assert not (tmp_path / "new").exists()


def test_every_recipe_checks_its_settings_before_it_imports_the_libraries(tmp_path):
    """Each single-GPU script with --steps 0, all at once (two_gpus stops earlier on a machine with fewer
    than two GPUs; its order is checked on the code below)."""
    started = {name: start_checked(tmp_path / name, name, "--steps", "0") for name in SINGLE_GPU_OR_CPU}
    for name, run in started.items():
        done, report = finish_checked(run)
        assert refused(done).startswith("--steps 0: "), name
        assert_nothing_loaded(report, tmp_path / name)


def _main(tree: ast.Module) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_main_checks_before_it_imports_the_libraries_and_saves_without_losing_the_image(path):
    """On the code, for all seven (two_gpus included): diffusers, transformers and huggingface_hub are
    imported only in main(), after check_before_loading(args, MODEL_ID, checkpoint_path); the image is
    saved through save_or_keep with the script's save_png, which is every script's same function and
    removes a file it could not finish."""
    tree = _tree(path)
    heavy = ("diffusers", "transformers", "huggingface_hub")

    def imports_heavy(node: ast.AST) -> bool:
        return any((isinstance(n, ast.ImportFrom) and n.module.split(".")[0] in heavy)
                   or (isinstance(n, ast.Import) and any(a.name.split(".")[0] in heavy for a in n.names))
                   for n in ast.walk(node))

    assert not any(imports_heavy(n) for n in tree.body if not isinstance(n, ast.FunctionDef))
    main = _main(tree)
    (check,) = _calls(main, "check_before_loading")
    assert [ast.unparse(a) for a in check.args[:3]] == ["args", "MODEL_ID", "checkpoint_path"]
    first_check = next(i for i, s in enumerate(main.body) if check in ast.walk(s))
    first_import = next(i for i, s in enumerate(main.body) if imports_heavy(s))
    assert first_check < first_import
    (keep,) = _calls(main, "save_or_keep")
    assert [ast.unparse(a) for a in keep.args] == ["save_png", "image", "args.out", "settings"]
    assert not _calls(main, "save_png")  # only through save_or_keep
    save_png = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "save_png")
    theirs = next(n for n in _tree(REPO / "recipes" / "t4_staged_nf4_fp16.py").body
                  if isinstance(n, ast.FunctionDef) and n.name == "save_png")
    assert ast.unparse(save_png) == ast.unparse(theirs) and _calls(save_png, "unlink")


@pytest.mark.parametrize("name, fault, reason", [("t4_staged_nf4_fp16", "disk-full", errno.ENOSPC),
                                                  ("all_resident_bf16", "folder-replaced", errno.ENOTDIR)],
                         ids=["t4-disk-full", "all_resident-folder-replaced"])
def test_an_image_whose_save_fails_at_the_end_is_kept_and_the_script_says_where(tmp_path, name, fault, reason):
    """The run finishes, then saving into --out fails (its disk full half way through the PNG, or the folder
    replaced by a file after the checks): the image is saved in the current folder instead, one line says
    so, the exit status is 1 and --out is left as it was (no half PNG, the user's file untouched). The
    stand-in was resolved before huggingface_hub was imported."""
    here = tmp_path / "here"
    here.mkdir()
    done, report = run_checked(tmp_path, name, fault=fault, cwd=here, own_cache=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (kept,) = here.glob("image-*.png")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["image"]).resolve() == kept.resolve()
    out = tmp_path / "images"
    said = [line for line in done.stderr.splitlines() if line.startswith("Could not save")]
    assert said == [f"Could not save the image in {out} ({os.strerror(reason)}): it is kept as {result['image']} instead."]
    image = Image.open(kept)
    assert image.size == (48, 64) and image.text["prompt"] == "a red fox" and image.text["seed"] == "7"
    if fault == "disk-full":
        assert list(out.iterdir()) == []  # the half-written PNG was removed
    else:
        assert out.read_text() == "a file of the user's"
    assert report["huggingface_hub_imported_before_resolve"] is False


# --- fluxnb.recipe_checks in-process: what the runs above cannot reach on a CPU -----------------------


def _request(tmp_path: Path, **changes) -> "argparse.Namespace":
    import argparse

    settings = dict(prompt="a red fox", out=tmp_path / "images", checkpoint="tiny", steps=2, guidance=3.5,
                    height=64, width=48, seed=7, max_sequence_length=512)
    return argparse.Namespace(**{**settings, **changes})


def test_a_stand_in_served_under_the_real_id_is_not_checked_as_a_download(tmp_path, monkeypatch):
    """If resolve_checkpoint serves the tiny stand-in under the real Hub id (a local HF_ENDPOINT), the Hub
    checks (a GPU, a token for the gated repo, the cache while offline) do not apply to it; the same id
    given by the user is checked, and refused here (offline, not cached)."""
    from fluxnb import recipe_checks
    from fluxnb.exceptions import FluxnbError

    dev = "black-forest-labs/FLUX.1-dev"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert recipe_checks.check_request(_request(tmp_path), dev, lambda checkpoint: dev) == dev
    with pytest.raises(FluxnbError, match=f"--checkpoint {dev}: there is no such folder here, and offline"):
        recipe_checks.check_request(_request(tmp_path, checkpoint=dev), dev, lambda checkpoint: checkpoint)


def test_a_hub_id_on_a_gpu_needs_a_token_if_gated_and_a_reachable_hub(tmp_path, monkeypatch, fake_hub):
    """On a CPU a Hub id is refused (it would download tens of GB, then crawl); on a GPU a gated one needs a
    token, another family's is refused, and an unreachable Hub is named as such, with the scripts' flags."""
    from fluxnb import recipe_checks
    from fluxnb.exceptions import HubAccessError, NeedsGPUError

    dev = "black-forest-labs/FLUX.1-dev"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(NeedsGPUError, match=f"--checkpoint {dev}: this machine has no GPU.*--checkpoint tiny"):
        recipe_checks.check_checkpoint(dev, dev)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(HubAccessError, match=f"--checkpoint {dev} is gated and no Hugging Face token was found.*"
                                             "--checkpoint black-forest-labs/FLUX.1-schnell --steps 4"):
        recipe_checks.check_checkpoint(dev, dev)
    with pytest.raises(ValueError, match="FLUX.2-klein-4B is a Flux2KleinPipeline checkpoint and this recipe runs"):
        recipe_checks.check_checkpoint("black-forest-labs/FLUX.2-klein-4B", dev)
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_good")
    with pytest.raises(ConnectionError, match=f"--checkpoint {dev}: the Hugging Face Hub cannot be reached .*"
                                              "--checkpoint tiny"):
        recipe_checks.check_checkpoint(dev, dev)


def test_save_or_keep_tries_the_current_folder_then_the_temp_folder(tmp_path, monkeypatch):
    """--out fails, then the current folder (read-only): the temp folder keeps the image; if it fails too,
    the script ends in one line saying where it tried."""
    from fluxnb import recipe_checks

    here, temp, out = tmp_path / "here", tmp_path / "temp", tmp_path / "out"
    for folder in (here, temp):
        folder.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(recipe_checks.tempfile, "gettempdir", lambda: str(temp))
    failing = {out.resolve(), here.resolve()}

    def save(image, folder, settings):
        if Path(folder).resolve() in failing:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))
        path = Path(folder) / "image-0001.png"
        with open(path, "xb") as f:
            f.write(image)
        return path

    assert recipe_checks.save_or_keep(save, b"png", out, {}) == temp / "image-0001.png"
    failing.add(temp.resolve())
    with pytest.raises(SystemExit, match=f"Could not save the image in {out} .*nor in {here} or {temp}"):
        recipe_checks.save_or_keep(save, b"png", out, {})
