"""Pre-quantized NF4 packages: the export for stand-ins, loading them, the switch, the download plan."""

import json
import os
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, RepoFile

import fluxnb
from fluxnb import prequantized
from fluxnb.prequantized import download_gb, download_plan, export_prequantized
from fluxnb.switch import prequantized_checkpoint

DEV, SCHNELL = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
HUB_PKG = "hf-internal-testing/flux.1-dev-nf4-pkg"


@pytest.fixture(scope="module")
def tiny():
    fluxnb.allow_bitsandbytes_on_cpu()
    return str(fluxnb.build_tiny("dev"))


@pytest.fixture(scope="module")
def pkg(tiny):
    return str(prequantized.stand_in_package("tiny", torch.float32))


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _quantization(folder, part):
    return json.loads((folder / part / "config.json").read_text())["quantization_config"]


def test_tiny_export_has_the_package_layout(pkg):
    folder = fluxnb.checkpoints.cache_dir() / "tiny-flux.1-dev-nf4-float32"
    assert pkg == str(folder)
    assert sorted(p.name for p in (folder / "text_encoder_2").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    for part in ("text_encoder_2", "transformer"):
        quant = _quantization(folder, part)
        assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
        assert quant["bnb_4bit_compute_dtype"] == "float32"
    assert not folder.with_name(folder.name + ".partial").exists()


def test_the_stand_in_package_is_in_the_hub_packages_2024_form(pkg):
    """Finding 6 of issue 16: the Hub package was written by 2024's diffusers and transformers, not
    today's; the stand-in's configs carry that form (fluxnb.prequantized's docstring says what is known)."""
    folder = Path(pkg)
    t5 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert t5["torch_dtype"] == "float32" and "dtype" not in t5  # 4.4x wrote torch_dtype
    assert "is_decoder" not in t5 and "scale_decoder_outputs" not in t5 and t5["output_past"] is True
    assert t5["transformers_version"] == prequantized.HUB_PACKAGE_VERSIONS["transformers"]
    assert t5["_name_or_path"] == DEV
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["_diffusers_version"] == prequantized.HUB_PACKAGE_VERSIONS["diffusers"]
    assert "out_channels" not in transformer
    for config in (t5, transformer):
        assert tuple(config["quantization_config"]) == prequantized.QUANTIZATION_CONFIG_KEYS


def test_todays_libraries_load_a_package_in_the_2024_form_as_they_load_their_own(tiny, tmp_path):
    """A package as today's save_pretrained writes it, and the same package rewritten into the 2024
    form, load with the pinned diffusers/transformers to the same 4-bit models, computing the same."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    todays = tmp_path / "todays"
    for part, model in (("text_encoder_2", fluxnb.load_text_encoders_4bit(tiny, torch.float32).text_encoder_2),
                        ("transformer", fluxnb.load_transformer_4bit(tiny, torch.float32))):
        model.save_pretrained(todays / part)
    old = tmp_path / "old"
    shutil.copytree(todays, old)
    prequantized.to_hub_package_form(old)
    assert json.loads((old / "text_encoder_2" / "config.json").read_text()) != \
        json.loads((todays / "text_encoder_2" / "config.json").read_text())
    ids = torch.tensor([[5, 9, 12, 1]])
    outputs = {}
    for name, folder in (("todays", todays), ("old", old)):
        t5, info = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", dtype=torch.float32,
                                                  output_loading_info=True)
        assert not any(info.values()), info  # nothing missing, unexpected or mismatched
        transformer, info = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.float32,
                                                                   output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert all(isinstance(m, bnb.nn.Linear4bit) for m in _linears(transformer))
        assert sum(isinstance(m, bnb.nn.Linear4bit) for m in t5.modules()) > 0
        with torch.no_grad():
            outputs[name] = (t5(input_ids=ids).last_hidden_state,
                             [p.detach().clone() for p in transformer.parameters()])
    assert torch.equal(outputs["old"][0], outputs["todays"][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs["old"][1], outputs["todays"][1]))
    # and through the course's own loaders, which the notebooks call
    encoders = fluxnb.load_text_encoders_4bit(tiny, torch.float32, prequantized=str(old))
    assert torch.isfinite(fluxnb.encode_prompt(encoders, "a cat", 64)["prompt_embeds"]).all()


def test_an_export_of_todays_form_is_made_again(tiny, tmp_path):
    folder = export_prequantized(tiny, tmp_path / "nf4", torch.float32)
    marker = folder / prequantized._DONE
    marker.write_text(json.dumps({"checkpoint": tiny, "dtype": "float32"}))  # what fluxnb wrote before the 2024 form
    (folder / "transformer" / "config.json").write_text("{}")
    assert export_prequantized(tiny, folder, torch.float32) == folder
    assert json.loads(marker.read_text())["form"] == prequantized.PACKAGE_FORM
    assert "quantization_config" in json.loads((folder / "transformer" / "config.json").read_text())


def test_the_loaders_load_the_package_and_denoise_as_quantizing_does(tiny, pkg):
    encoders = fluxnb.load_text_encoders_4bit(tiny, torch.float32, prequantized=pkg)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in encoders.text_encoder_2.modules()) > 0
    embeds = fluxnb.encode_prompt(encoders, "a cat", max_sequence_length=64)
    assert embeds["prompt_embeds"].shape == (1, 64, 64) and torch.isfinite(embeds["prompt_embeds"]).all()
    quantizing = fluxnb.encode_prompt(fluxnb.load_text_encoders_4bit(tiny, torch.float32), "a cat", 64)
    assert torch.equal(embeds["prompt_embeds"], quantizing["prompt_embeds"])  # NF4 of the same weights

    transformer = fluxnb.load_transformer_4bit(tiny, torch.float32, prequantized=pkg)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in _linears(transformer)) and _linears(transformer)
    pipe = fluxnb.load_denoising_pipeline(tiny, transformer, torch.float32)
    latents = fluxnb.denoise(pipe, embeds, 64, 64, 2, 3.5, 0)
    assert torch.isfinite(latents).all()
    on_the_fly = fluxnb.load_denoising_pipeline(tiny, fluxnb.load_transformer_4bit(tiny, torch.float32),
                                                torch.float32)
    assert torch.equal(latents, fluxnb.denoise(on_the_fly, embeds, 64, 64, 2, 3.5, 0))


def test_compute_dtype_follows_dtype_not_the_saved_one(tiny, pkg):
    from diffusers import FluxTransformer2DModel

    as_saved = FluxTransformer2DModel.from_pretrained(pkg, subfolder="transformer", dtype=torch.bfloat16)
    assert {m.compute_dtype for m in _linears(as_saved)} == {torch.float32}  # why the loaders set it
    for dtype in (torch.bfloat16, torch.float16):
        transformer = fluxnb.load_transformer_4bit(tiny, dtype, prequantized=pkg)
        t5 = fluxnb.load_text_encoders_4bit(tiny, dtype, prequantized=pkg).text_encoder_2
        layers = [m for model in (transformer, t5) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and {m.compute_dtype for m in layers} == {dtype}


def test_embeddings_serve_whichever_way_t5_was_loaded(tiny, pkg, tmp_path, monkeypatch):
    """Notebook 01 quantizes T5 itself by default (prequantized=None); 03 asks with the NF4 package. Both are the
    same 4-bit T5, so 03 must read 01's file, not load T5 again (and the other way round)."""
    own = fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path / "a", max_sequence_length=64)
    other = fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path / "b", 64, prequantized=pkg)
    assert fluxnb.load_embeddings(own, "cpu")[1]["prequantized"] == "None"
    assert fluxnb.load_embeddings(other, "cpu")[1]["prequantized"] == pkg

    def no_loading(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although the embeddings were saved")

    monkeypatch.setattr(fluxnb.stages, "load_text_encoders_4bit", no_loading)
    assert fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path / "a", 64, prequantized=pkg) == own
    assert fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path / "b", 64) == other
    assert len(list((tmp_path / "a").iterdir())) == 1  # one file: nothing encoded twice
    with pytest.raises(AssertionError, match="were loaded"):  # other settings still encode
        fluxnb.encode_and_save(tiny, "a cat", torch.float32, tmp_path / "a", 32, prequantized=pkg)


def test_the_stand_in_package_is_keyed_by_dtype_and_schnell_has_none(tiny, pkg):
    bf16 = str(prequantized.stand_in_package("tiny", torch.bfloat16))
    assert bf16.endswith("tiny-flux.1-dev-nf4-bfloat16") and bf16 != pkg
    assert _quantization(Path(bf16), "transformer")["bnb_4bit_compute_dtype"] == "bfloat16"
    assert prequantized_checkpoint(SCHNELL, torch.float32, choice="tiny") is None  # none on the Hub: none served


def test_export_never_overwrites(tiny, tmp_path):
    partial = tmp_path / "nf4.partial"
    partial.mkdir()
    (partial / "junk").write_text("left by a crash")
    folder = export_prequantized(tiny, tmp_path / "nf4", torch.float32)
    assert not partial.exists()
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert export_prequantized(tiny, folder, torch.float32) == folder
    assert weights.stat().st_mtime_ns == stamp

    mine = tmp_path / "mine"
    (mine / "transformer").mkdir(parents=True)
    (mine / "transformer" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an export by fluxnb"):
        export_prequantized(tiny, mine, torch.float32)
    assert (mine / "transformer" / "config.json").read_text() == "{}"


def test_export_checks_disk_first(tiny, tmp_path, monkeypatch):
    def no_room(path, need_gb, what):
        raise OSError(f"{what} needs about {need_gb:.3f} GB")

    monkeypatch.setattr(prequantized, "check_free_disk", no_room)
    with pytest.raises(OSError, match=re.escape(f"The NF4 export of {tiny} needs")):
        export_prequantized(tiny, tmp_path / "nf4", torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_the_variable_picks_the_package(monkeypatch, tiny, pkg):
    monkeypatch.delenv("FLUXNB_CHECKPOINT", raising=False)
    assert prequantized_checkpoint(DEV, torch.float16) == HUB_PKG
    assert prequantized_checkpoint(SCHNELL, torch.float16) is None  # none published: quantize while loading
    krea = "black-forest-labs/FLUX.1-Krea-dev"
    assert prequantized_checkpoint(krea, torch.float16) is None  # not FLUX.1-dev's weights
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "tiny")  # with a stand-in it is the Hub id too: tests/test_hub.py
    assert prequantized_checkpoint(DEV, torch.float32, choice="") == HUB_PKG  # choice overrides the variable
    assert prequantized_checkpoint(DEV, torch.float32, choice=pkg) == pkg  # a folder in the package layout
    assert prequantized_checkpoint(DEV, torch.float32, choice=tiny) is None  # a bf16/fp32 original
    assert prequantized_checkpoint(DEV, torch.float32, choice="someone/not-cached") is None  # offline, unknown


def test_the_random_stand_ins_package_is_made_from_random_dev(monkeypatch):
    calls = []
    monkeypatch.setattr(fluxnb.checkpoints, "build_random", lambda variant: f"/r/{variant}")
    monkeypatch.setattr(prequantized, "export_prequantized",
                        lambda ckpt, folder, dtype: calls.append((ckpt, folder.name, dtype)) or folder)
    assert prequantized.stand_in_package("random", torch.float16).name == "random-flux.1-dev-nf4-float16"
    assert calls == [("/r/dev", "random-flux.1-dev-nf4-float16", torch.float16)]


# --- the download plan ----------------------------------------------------------------------------


@pytest.fixture
def tiny_with_extras(tiny, tmp_path):
    """A copy of tiny with files from_pretrained does not fetch, as real repos have them."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny, folder)
    for junk in ("flux1-dev.safetensors", "transformer/diffusion_pytorch_model.bin", "transformer/flux.gguf",
                 "vae/README.md", "vae/sample.png", "text_encoder/model.fp16.safetensors",
                 "text_encoder/pytorch_model.pth"):
        (folder / junk).write_bytes(b"x" * 1000)
    return folder


EXPECTED = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json",
            "text_encoder/config.json", "text_encoder/model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors"}
NF4 = {"text_encoder_2/config.json", "text_encoder_2/model.safetensors", "transformer/config.json",
       "transformer/diffusion_pytorch_model.safetensors"}


def test_plan_of_a_local_stand_in_sums_what_from_pretrained_reads(tiny_with_extras, pkg):
    plan = download_plan(str(tiny_with_extras), None)
    assert {item.path for item in plan} == EXPECTED | NF4
    assert all(item.cached and item.size == (tiny_with_extras / item.path).stat().st_size for item in plan)
    assert download_gb(plan) == 0
    assert download_gb(plan, include_cached=True) == sum(item.size for item in plan) / 1e9 > 0

    with_pkg = download_plan(str(tiny_with_extras), pkg)
    assert {(item.source, item.path) for item in with_pkg} == (
        {(str(tiny_with_extras), path) for path in EXPECTED} | {(pkg, path) for path in NF4})


def test_a_source_without_a_part_is_refused(tiny_with_extras):
    shutil.rmtree(tiny_with_extras / "vae")
    with pytest.raises(FileNotFoundError, match="has no vae"):
        download_plan(str(tiny_with_extras), None)


def _fake_hub_cache(monkeypatch, root, repo, files):
    """A Hugging Face cache holding ``files`` (path -> bytes) of ``repo``'s main branch."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    for path, data in files.items():
        (repo_dir / "snapshots" / ("0" * 40) / path).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "snapshots" / ("0" * 40) / path).write_bytes(data)


ORIGINAL_TREE = {"model_index.json": 500, "flux1-dev.safetensors": 23_800_000_000, "ae.safetensors": 335_000_000,
                 "README.md": 5_000, "dev_grid.jpg": 1_200_000, "scheduler/scheduler_config.json": 300,
                 "tokenizer/vocab.json": 1_000_000, "tokenizer/merges.txt": 500_000,
                 "tokenizer_2/spiece.model": 800_000,
                 "tokenizer_2/tokenizer.json": 2_400_000, "text_encoder/config.json": 600,
                 "text_encoder/model.safetensors": 246_000_000, "text_encoder_2/config.json": 700,
                 "text_encoder_2/model-00001-of-00002.safetensors": 4_990_000_000,
                 "text_encoder_2/model-00002-of-00002.safetensors": 4_530_000_000,
                 "text_encoder_2/model.safetensors.index.json": 20_000, "transformer/config.json": 400,
                 "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": 9_980_000_000,
                 "transformer/diffusion_pytorch_model-00002-of-00003.safetensors": 9_950_000_000,
                 "transformer/diffusion_pytorch_model-00003-of-00003.safetensors": 3_870_000_000,
                 "transformer/diffusion_pytorch_model.safetensors.index.json": 120_000,
                 "vae/config.json": 800, "vae/diffusion_pytorch_model.safetensors": 168_000_000,
                 "vae/diffusion_pytorch_model.bin": 335_000_000, "text_encoder/flax_model.msgpack": 246_000_000}
PKG_TREE = {"README.md": 1_000, "text_encoder_2/config.json": 1_200,
            "text_encoder_2/model.safetensors": 6_330_000_000,
            "transformer/config.json": 900, "transformer/diffusion_pytorch_model.safetensors": 6_700_000_000,
            "transformer/flux1-dev-nf4.gguf": 6_800_000_000, "transformer/README.md": 800}


@pytest.fixture
def fake_hub(monkeypatch):
    trees = {DEV: ORIGINAL_TREE, HUB_PKG: PKG_TREE}

    def list_repo_tree(self, repo_id, path_in_repo=None, *, recursive=False, **kwargs):
        assert recursive
        return [RepoFile(path=path, size=size, oid="0") for path, size in trees[repo_id].items()]

    monkeypatch.setattr(HfApi, "list_repo_tree", list_repo_tree)


def test_hub_plan_counts_the_nf4_package_and_subtracts_the_cache(fake_hub, monkeypatch, tmp_path):
    _fake_hub_cache(monkeypatch, tmp_path, DEV, {})
    plan = download_plan(DEV, HUB_PKG)
    assert {item.path for item in plan if item.source == HUB_PKG} == {
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors"}
    assert {item.path for item in plan if item.source == DEV} == {
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert 13.4 < download_gb(plan) < 13.5  # not 34 GB
    assert 33.7 < download_gb(download_plan(DEV, None)) < 33.8  # the original's T5 and transformer instead

    _fake_hub_cache(monkeypatch, tmp_path, HUB_PKG, {"transformer/diffusion_pytorch_model.safetensors": b"cached"})
    again = download_plan(DEV, HUB_PKG)
    assert [item.path for item in again if item.cached] == ["transformer/diffusion_pytorch_model.safetensors"]
    assert 6.7 < download_gb(again) < 6.8


def test_offline_without_a_cache_says_what_to_do(monkeypatch, tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match=f"{DEV} is not in its cache.*FLUXNB_CHECKPOINT=tiny"):
        download_plan(DEV, HUB_PKG)


def test_offline_with_a_cache_plans_from_it(monkeypatch, tmp_path):
    files = {path: b"w" * 10 for path in PKG_TREE}
    _fake_hub_cache(monkeypatch, tmp_path, HUB_PKG, files)
    parts = {path: b"w" * 10 for path in ORIGINAL_TREE if "/" in path or path == "model_index.json"}
    _fake_hub_cache(monkeypatch, tmp_path, DEV, parts)
    plan = download_plan(DEV, HUB_PKG)
    assert download_gb(plan) == 0 and all(item.cached for item in plan)
    assert {item.path for item in plan if item.source == HUB_PKG} == NF4
    _fake_hub_cache(monkeypatch, tmp_path / "other", DEV, {"model_index.json": b"{}"})  # no CLIP, VAE, ...
    with pytest.raises(ConnectionError, match="not in its cache"):
        download_plan(DEV, HUB_PKG)
