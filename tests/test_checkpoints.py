import hashlib
import json
import os

import pytest
import torch

import fluxnb
from fluxnb import checkpoints


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unset_variable_keeps_the_real_model_id(monkeypatch):
    monkeypatch.delenv("FLUXNB_CHECKPOINT", raising=False)
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "  ")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-schnell") == "black-forest-labs/FLUX.1-schnell"


def test_other_values_are_a_hub_id_or_path(monkeypatch):
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "/models/my-flux")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev") == "/models/my-flux"


def test_random_values_build_the_named_variant(monkeypatch):
    calls = []
    monkeypatch.setattr(checkpoints, "build_random", lambda variant: calls.append(variant) or f"/r/{variant}")
    assert checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", "random-schnell") == "/r/schnell"
    assert checkpoints.stand_in_folder("black-forest-labs/FLUX.1-schnell", "random-dev") == "/r/dev"
    assert calls == ["schnell", "dev"]


def test_tiny_follows_the_notebooks_variant(monkeypatch, fresh_cache):
    dev = checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", "tiny")
    schnell = checkpoints.stand_in_folder("black-forest-labs/FLUX.1-schnell", "tiny")
    assert dev.endswith("tiny-flux.1-dev") and schnell.endswith("tiny-flux.1-schnell")
    assert json.loads((fresh_cache / "tiny-flux.1-dev/transformer/config.json").read_text())["guidance_embeds"]
    assert not json.loads((fresh_cache / "tiny-flux.1-schnell/transformer/config.json").read_text())["guidance_embeds"]
    assert json.loads((fresh_cache / "tiny-flux.1-schnell/scheduler/scheduler_config.json").read_text())["shift"] == 1.0
    assert fluxnb.is_stand_in(dev) == "tiny" and fluxnb.is_stand_in(fresh_cache) is None


def test_tiny_is_deterministic(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "a"))
    first = fluxnb.build_tiny("dev")
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "b"))
    second = fluxnb.build_tiny("dev")
    assert first != second and _digest(first) == _digest(second)


def test_tiny_is_built_once_and_an_interrupted_build_is_replaced(fresh_cache):
    partial = fresh_cache / "tiny-flux.1-dev.partial"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("left by a crash")
    path = fluxnb.build_tiny("dev")
    assert not partial.exists() and (path / "model_index.json").is_file()
    stamp = (path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert fluxnb.build_tiny("dev") == path
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_loads_offline_with_real_classes(fresh_cache):
    from diffusers import FluxPipeline

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = FluxPipeline.from_pretrained(fluxnb.build_tiny("dev"))
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.vae_scale_factor == 8  # as FLUX.1's VAE: sizes must be multiples of 16
    ids = pipe.tokenizer_2("a cat", return_tensors="pt").input_ids
    assert ids[0, -1].item() == pipe.tokenizer_2.eos_token_id
    assert int(ids.max()) < pipe.text_encoder_2.config.vocab_size
    # every Linear that bitsandbytes will quantize has widths that its 4-bit CPU kernels accept
    for model in (pipe.transformer, pipe.text_encoder_2):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


def test_full_size_configs_have_flux_dev_parameter_counts():
    """The counts of FLUX.1-dev's published safetensors; schnell lacks only the guidance embedder."""
    counts = fluxnb.parameter_counts("dev")
    assert counts == {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656,
                      "text_encoder": 123_060_480, "vae": 83_819_683}
    schnell = fluxnb.parameter_counts("schnell")
    with torch.device("meta"):
        guidance = checkpoints._make_part("transformer", "dev", tiny=False).time_text_embed.guidance_embedder
    assert counts["transformer"] - schnell["transformer"] == sum(p.numel() for p in guidance.parameters())
    with pytest.raises(ValueError, match="variant must be 'dev', 'schnell' or 'klein'"):
        fluxnb.parameter_counts("pro")


def test_random_build_checks_disk_first(monkeypatch, fresh_cache):
    def no_room(path, need_gb, what):
        raise OSError(f"{what} needs about {need_gb:.0f} GB")

    monkeypatch.setattr(checkpoints, "check_free_disk", no_room)
    with pytest.raises(OSError, match="the random FLUX.1-dev stand-in needs about 36 GB"):
        fluxnb.build_random("dev", device="cpu", without_gpu=True)
    assert not any(fresh_cache.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
@pytest.mark.parametrize("how", ["build_random", "FLUXNB_CHECKPOINT"])
def test_random_stand_in_is_refused_without_a_gpu_before_anything_is_written(monkeypatch, fresh_cache, how):
    """Finding 5 of issue 16: random-dev on a CPU used to write 32 GB for minutes before anything said
    that nothing would run. Now it stops first, with the size, the time and what to use instead."""
    def no_writing(*args, **kwargs):
        raise AssertionError("the random stand-in was about to be written on a machine without a GPU")

    monkeypatch.setattr(checkpoints, "_write_pipeline", no_writing)
    monkeypatch.delenv(checkpoints.WITHOUT_GPU_VAR, raising=False)
    with pytest.raises(fluxnb.errors.NeedsGPUError) as refusal:
        if how == "build_random":
            fluxnb.build_random("dev")
        else:
            checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", "random-dev")
    message = str(refusal.value)
    gb = checkpoints.random_stand_in_gb("dev")
    assert 33 < gb < 34.5 and f"{gb:.1f} GB" in message and " min here" in message
    assert "FLUXNB_CHECKPOINT=tiny" in message and f"{checkpoints.WITHOUT_GPU_VAR}=1" in message
    assert isinstance(refusal.value, fluxnb.errors.FluxnbError)
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())


def test_the_opt_in_builds_the_random_stand_in_without_a_gpu(monkeypatch, fresh_cache):
    """FLUXNB_BUILD_WITHOUT_GPU=1 (or without_gpu=True) still builds it: to rehearse the disk."""
    written = []
    monkeypatch.setattr(checkpoints, "_write_pipeline", lambda folder, variant, **kw: written.append(variant))
    monkeypatch.setattr(checkpoints, "check_free_disk", lambda path, need_gb, what: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(checkpoints.WITHOUT_GPU_VAR, "1")
    assert fluxnb.build_random("schnell") == fresh_cache / "random-flux.1-schnell"
    assert written == ["schnell"]
    monkeypatch.delenv(checkpoints.WITHOUT_GPU_VAR)
    assert fluxnb.build_random("schnell") == fresh_cache / "random-flux.1-schnell"  # built: no refusal, no rebuild
    assert written == ["schnell"]


def test_a_random_stand_in_of_the_old_layout_is_rebuilt(monkeypatch, fresh_cache):
    """Stand-ins built before the Hub's layout (2 GB shards) carry no layout number: they are fluxnb's
    own cache, so they are rebuilt rather than used with the wrong files."""
    old = checkpoints.stand_in_dir("random", "dev")
    old.mkdir(parents=True)
    (old / checkpoints._DONE).write_text(json.dumps({"kind": "random", "variant": "dev"}))
    (old / "transformer").mkdir()
    rebuilt = []
    monkeypatch.setattr(checkpoints, "_write_pipeline", lambda folder, variant, **kw: rebuilt.append(folder))
    monkeypatch.setattr(checkpoints, "check_free_disk", lambda path, need_gb, what: None)
    assert fluxnb.build_random("dev", device="cpu", without_gpu=True) == old
    assert len(rebuilt) == 1 and not (old / "transformer").exists()
    assert json.loads((old / checkpoints._DONE).read_text())["layout"] == checkpoints.RANDOM_LAYOUT


def test_unknown_variant_is_refused(fresh_cache):
    with pytest.raises(ValueError, match="variant must be 'dev', 'schnell' or 'klein'"):
        fluxnb.build_tiny("pro")


def test_an_explicit_choice_overrides_the_variable(monkeypatch):
    monkeypatch.setenv("FLUXNB_CHECKPOINT", "tiny")
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev", choice="/models/mine") == "/models/mine"
    assert fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-dev", choice="") == "black-forest-labs/FLUX.1-dev"


# --- the streamed full-size build -----------------------------------------------------------------
# MEDIUM: the full-size classes with few layers and small widths, cheap on a CPU. Its T5 vocabulary is
# small so that every tensor fits the tiny shard budget used below (a larger one gets its own shard).
MEDIUM_TRANSFORMER = dict(checkpoints.FULL_TRANSFORMER, num_layers=2, num_single_layers=2, attention_head_dim=64,
                          num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=128,
                          axes_dims_rope=(16, 24, 24))
MEDIUM_T5 = dict(checkpoints.FULL_T5, vocab_size=1024, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4)
SHARD = 2**20  # 1 MiB: the medium models (2.5 and 3 MiB of weights once tied ones are dropped) need 3-4 shards


def _medium(name, device):
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            if name == "transformer":
                return FluxTransformer2DModel(**MEDIUM_TRANSFORMER)
            return T5EncoderModel(T5Config(**MEDIUM_T5))
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The medium transformer and T5, each streamed twice (determinism) into folders of their own."""
    root = tmp_path_factory.mktemp("streamed")
    for name in ("transformer", "t5"):
        for copy in ("a", "b"):
            checkpoints.write_streamed(_medium(name, "meta"), root / copy / name, seed=3, max_shard_bytes=SHARD)
    return root


@pytest.mark.parametrize("name, weights", [("transformer", "diffusion_pytorch_model"), ("t5", "model")])
def test_streamed_files_are_what_save_pretrained_writes(streamed, tmp_path, name, weights):
    """Byte for byte: the same model, made whole with the streamed weights copied in, saved by its own
    save_pretrained with the same shard size, gives the same config, index and shards."""
    from safetensors.torch import load_file

    folder = streamed / "a" / name
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"{weights}-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / f"{weights}.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    whole = _medium(name, "cpu")
    with torch.no_grad():
        for shard in shards:
            for key, value in load_file(folder / shard).items():
                whole.get_parameter(key).copy_(value)
    whole.save_pretrained(tmp_path / name, max_shard_size=SHARD)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in folder.iterdir())
    for path in sorted((tmp_path / name).iterdir()):  # the same bytes, but for the index's metadata
        if path.name.endswith(".index.json"):
            theirs, ours = json.loads(path.read_text()), json.loads((folder / path.name).read_text())
            assert ours["weight_map"] == theirs["weight_map"]
            assert ours["metadata"] == {"total_size": theirs["metadata"]["total_size"]}  # as the Hub's FLUX.1 indexes
        else:
            assert path.read_bytes() == (folder / path.name).read_bytes(), path.name


def test_streaming_is_deterministic(streamed, tmp_path):
    for name in ("transformer", "t5"):
        assert _digest(streamed / "a" / name) == _digest(streamed / "b" / name)
    checkpoints.write_streamed(_medium("t5", "meta"), tmp_path / "t5", seed=4, max_shard_bytes=SHARD)
    assert _digest(tmp_path / "t5") != _digest(streamed / "a" / "t5")  # the seed matters


def test_streamed_models_load_with_plain_from_pretrained_and_run(streamed):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    transformer, info = FluxTransformer2DModel.from_pretrained(
        streamed / "a" / "transformer", torch_dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    t5, info = T5EncoderModel.from_pretrained(streamed / "a" / "t5", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert t5.dtype == torch.bfloat16  # from its config's dtype, as save_pretrained writes it
    for model, name in ((transformer, "transformer"), (t5, "t5")):
        reference = _medium(name, "meta")
        assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == \
            {k: (v.shape, v.dtype) for k, v in reference.state_dict().items()}
        for key, value in model.state_dict().items():
            rule = checkpoints.init_rule(model, key)
            if rule == "normal":
                assert 0.015 < value.float().std().item() < 0.025 and abs(value.float().mean().item()) < 0.005, key
            else:
                assert torch.equal(value, torch.full_like(value, 1.0 if rule == "ones" else 0.0)), key
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tied embedding came back tied

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            out = transformer.to(dtype)(
                hidden_states=torch.randn(1, 16, 64, generator=generator).to(dtype),
                encoder_hidden_states=torch.randn(1, 8, 256, generator=generator).to(dtype),
                pooled_projections=torch.randn(1, 128, generator=generator).to(dtype),
                timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]
            hidden = t5.to(dtype)(input_ids=torch.randint(0, 1024, (1, 12), generator=generator)).last_hidden_state
        for tensor in (out, hidden):
            assert torch.isfinite(tensor).all() and tensor.float().std() > 0, dtype


def test_streaming_holds_one_tensor_at_a_time(monkeypatch, tmp_path):
    """The weights that exist at once never exceed the largest tensor, for a model several shards large."""
    import weakref

    live, peak, made, largest = [0], [0], [0], [0]
    real = checkpoints.random_tensor

    def counted(*args, **kwargs):
        tensor = real(*args, **kwargs)
        size = tensor.numel() * tensor.element_size()
        live[0] += size
        made[0] += size
        largest[0] = max(largest[0], size)
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - size))
        return tensor

    monkeypatch.setattr(checkpoints, "random_tensor", counted)
    checkpoints.write_streamed(_medium("transformer", "meta"), tmp_path / "transformer", seed=0, max_shard_bytes=SHARD)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert made[0] >= 2 * SHARD and on_disk >= made[0]
    assert 0 < peak[0] <= largest[0] < SHARD and live[0] == 0


def test_save_file_streamed_writes_what_safetensors_writes(tmp_path):
    """Byte for byte, with the dtypes the stand-ins and NF4 packages hold, in an order that is neither
    by name nor by dtype: safetensors sorts by dtype, then name, and pads its header to 8 bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a.absmax": torch.rand(7, generator=g),
               "c.weight": torch.randint(0, 255, (11, 1), generator=g, dtype=torch.uint8),
               "a.half": torch.randn(2, generator=g).half(), "d.steps": torch.arange(3), "e": torch.ones(1, dtype=torch.bool)}
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    checkpoints.save_file_streamed(tmp_path / "ours.safetensors", specs, tensors.__getitem__, metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    assert checkpoints.safetensors_size(specs, {"format": "pt"}) == (tmp_path / "theirs.safetensors").stat().st_size
    with pytest.raises(ValueError, match="the header says"):
        checkpoints.save_file_streamed(tmp_path / "bad.safetensors", specs, lambda name: torch.zeros(1), {"format": "pt"})


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_random_stand_in_has_the_hub_repositorys_files_to_the_byte(variant):
    """Finding 6 of issue 16: random-dev was 13 shards of 2 GB, FLUX.1-dev is three files of about 10,
    10 and 4 GB and a T5 of two. On the meta device (no weights, a second): the stand-in's weight files
    have the Hub's names and the Hub's sizes (fluxnb/configs/*.files.json), and its index the Hub's total."""
    real = checkpoints.real_files(variant)
    planned = {}
    for part in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                model = checkpoints._make_part(part, variant, tiny=False)
        finally:
            torch.set_default_dtype(torch.float32)
        files, index = checkpoints.shard_layout(model, checkpoints.REAL_MAX_SHARD_BYTES.get(part, 10 * 10**9))
        assert (index is not None) == (part in checkpoints.STREAMED_PARTS)
        for name, specs in files.items():
            planned[f"{part}/{name}"] = checkpoints.safetensors_size(specs, {"format": "pt"})
        if part in checkpoints.STREAMED_PARTS:
            rules = {checkpoints.init_rule(model, key) for specs in files.values() for key in specs}
            assert rules == ({"normal", "zeros", "ones"} if part == "transformer" else {"normal", "ones"})
    weights = {path: size for path, size in real.items() if path.endswith(".safetensors")}
    assert sorted(planned) == sorted(weights)
    for path, size in weights.items():
        # exact, but for CLIP (2,160 of its 246 MB: the Hub's CLIP file was written by transformers 4.43)
        assert abs(planned[path] - size) <= (2200 if path.startswith("text_encoder/") else 0), (path, planned[path], size)
    largest = max(weights.values())
    assert largest > 9 * 10**9 and max(checkpoints.REAL_MAX_SHARD_BYTES.values()) == 10 * 10**9


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_models_are_built_from_the_repositorys_own_configs(variant):
    """FULL_* (what builds each model) say what the Hub's config files say (fluxnb/configs)."""
    transformer = checkpoints.real_config(variant, "transformer")
    assert {k: v for k, v in transformer.items() if not k.startswith("_")} == {
        k: v for k, v in dict(checkpoints.FULL_TRANSFORMER, guidance_embeds=variant == "dev").items()
        if k != "axes_dims_rope"}  # not in the 0.30 file: diffusers' default, (16, 56, 56), is FLUX's
    assert tuple(checkpoints.FULL_TRANSFORMER["axes_dims_rope"]) == (16, 56, 56)
    vae = checkpoints.real_config(variant, "vae")
    for key, value in checkpoints.FULL_VAE.items():
        assert vae[key] == (list(value) if isinstance(value, tuple) else value), key
    t5 = checkpoints.real_config(variant, "text_encoder_2")
    for key, value in checkpoints.FULL_T5.items():  # the encoder-only flags aside: T5EncoderModel sets them itself
        assert key in ("is_encoder_decoder", "use_cache") or t5[key] == value, key
    clip = checkpoints.real_config(variant, "text_encoder")
    for key, value in checkpoints.FULL_CLIP.items():
        assert clip[key] == value, key
    scheduler = checkpoints.real_config(variant, "scheduler")
    expected = checkpoints.SCHEDULER_DEV if variant == "dev" else checkpoints.SCHEDULER_SCHNELL
    assert {k: scheduler[k] for k in expected} == expected
    index = checkpoints.real_config(variant, "model_index")
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    small = {p: s for p, s in checkpoints.real_files(variant).items() if p.endswith(".json") and "index" not in p}
    for path, size in small.items():  # schnell's list has the small files' sizes: ours are those bytes
        name = path.removesuffix("/config.json").removesuffix("/scheduler_config.json").removesuffix(".json")
        part = {"scheduler": "scheduler", "model_index": "model_index"}.get(name, name)
        text = json.dumps(checkpoints.real_config(variant, part), indent=2, sort_keys=True) + "\n"
        assert len(text.encode()) == size, path


def test_the_full_size_build_streams_the_big_parts(monkeypatch, fresh_cache):
    """build_random's wiring, without its 34 GB: the transformer and T5 reach write_streamed on the meta
    device with their own seeds, the small parts are saved whole, the stand-in is complete."""
    streamed_parts = {}

    def record(model, folder, seed, device="cpu", max_shard_bytes=checkpoints.SHARD_BYTES, config=None):
        assert all(p.device.type == "meta" for p in model.parameters()) and model.dtype == torch.bfloat16
        streamed_parts[folder.name] = (type(model).__name__, seed, device, max_shard_bytes, config)
        folder.mkdir(parents=True)

    monkeypatch.setattr(checkpoints, "write_streamed", record)
    monkeypatch.setattr(checkpoints, "check_free_disk", lambda path, need_gb, what: None)
    path = fluxnb.build_random("schnell", device="cpu", without_gpu=True)
    assert path == checkpoints.stand_in_dir("random", "schnell") == fresh_cache / "random-flux.1-schnell"
    assert streamed_parts == {
        "text_encoder_2": ("T5EncoderModel", 4, "cpu", 5 * 10**9, checkpoints.real_config("schnell", "text_encoder_2")),
        "transformer": ("FluxTransformer2DModel", 6, "cpu", 10**10, checkpoints.real_config("schnell", "transformer"))}
    assert (path / "text_encoder" / "model.safetensors").is_file() and (path / "vae" / "config.json").is_file()
    for part, name in (("text_encoder", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        assert json.loads((path / part / name).read_text()) == checkpoints.real_config("schnell", part)  # the Hub's
    assert json.loads((path / "model_index.json").read_text()) == checkpoints.real_config("schnell", "model_index")
    assert fluxnb.is_stand_in(path) == "random"


def test_streaming_refuses_what_it_cannot_initialise(tmp_path):
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(4.0))

    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(NotImplementedError, match="persistent buffers"):
        checkpoints.write_streamed(model, tmp_path / "m", seed=0)
    model.proj.scale = torch.nn.Parameter(torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="no initialisation rule for 'proj.scale'"):
        checkpoints.init_rule(model, "proj.scale")


# --- FLUX.2 [klein] 4B -----------------------------------------------------------------------------
KLEIN = "black-forest-labs/FLUX.2-klein-4B"


def test_the_family_and_variant_of_a_model_id():
    assert checkpoints.family_of(KLEIN) == "klein" and checkpoints.variant_of(KLEIN) == "klein"
    assert checkpoints.family_of("black-forest-labs/FLUX.1-schnell") == "flux1"
    assert checkpoints.variant_of("black-forest-labs/FLUX.1-schnell") == "schnell"
    assert checkpoints.variant_of("black-forest-labs/FLUX.1-dev") == "dev"
    assert fluxnb.generation_settings(KLEIN) == dict(steps=4, guidance=1.0, max_sequence_length=512)
    assert checkpoints.stand_in_dir("random", "klein").name == "random-flux.2-klein-4b"
    assert "random-klein" in checkpoints.STAND_INS


def test_a_random_stand_in_always_has_the_notebooks_family(monkeypatch):
    """One FLUXNB_CHECKPOINT for the whole course: random-dev on the klein notebook is random-klein, and
    random-klein on a FLUX.1 notebook is that notebook's own variant."""
    calls = []
    monkeypatch.setattr(checkpoints, "build_random", lambda variant: calls.append(variant) or f"/r/{variant}")
    for choice in ("random-dev", "random-schnell", "random-klein"):
        assert checkpoints.stand_in_folder(KLEIN, choice) == "/r/klein"
    assert checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", "random-klein") == "/r/dev"
    assert checkpoints.stand_in_folder("black-forest-labs/FLUX.1-schnell", "random-klein") == "/r/schnell"
    assert checkpoints.stand_in_folder("black-forest-labs/FLUX.1-dev", "random-schnell") == "/r/schnell"
    assert calls == ["klein"] * 3 + ["dev", "schnell", "schnell"]


def test_the_klein_models_are_built_from_the_repositorys_own_configs():
    def listed(value):
        return list(value) if isinstance(value, tuple) else value

    transformer = checkpoints.real_config("klein", "transformer")
    assert {k: v for k, v in transformer.items() if not k.startswith("_")} == {
        k: listed(v) for k, v in checkpoints.FULL_KLEIN_TRANSFORMER.items()}
    assert transformer["_class_name"] == "Flux2Transformer2DModel"
    vae = checkpoints.real_config("klein", "vae")
    assert {k: v for k, v in vae.items() if not k.startswith("_") and k != "force_upcast"} == {
        k: listed(v) for k, v in checkpoints.FULL_KLEIN_VAE.items()}  # force_upcast: not an argument in 0.42.1
    qwen = checkpoints.real_config("klein", "text_encoder")
    for key, value in checkpoints.FULL_QWEN3.items():
        assert qwen[key] == value, key
    assert qwen["architectures"] == ["Qwen3ForCausalLM"] and qwen["num_hidden_layers"] > max(checkpoints.KLEIN_TEXT_LAYERS)
    scheduler = checkpoints.real_config("klein", "scheduler")
    assert {k: scheduler[k] for k in checkpoints.SCHEDULER_KLEIN} == checkpoints.SCHEDULER_KLEIN
    index = checkpoints.real_config("klein", "model_index")
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert {name: index[name] for name in checkpoints.KLEIN_PARTS} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "vae": ["diffusers", "AutoencoderKLFlux2"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"]}
    # the Hub's byte sizes (FLUX.2-klein-4B.files.json): equal, but for 74 and 51 bytes of the transformer's
    # and the VAE's files that no public copy shows (fluxnb/configs/README.md)
    unknown = {"transformer/config.json": 74, "vae/config.json": 51}
    for path, size in checkpoints.real_files("klein").items():
        if path.endswith(".json") and not path.startswith("tokenizer/"):
            ours = (checkpoints.CONFIGS / "FLUX.2-klein-4B" / path).stat().st_size
            assert ours + unknown.get(path, 0) == size, path
    assert fluxnb.parameter_counts("klein") == {"transformer": 3_875_544_576, "text_encoder": 4_022_468_096,
                                                "vae": 84_046_115}


def test_the_random_klein_stand_in_has_the_hub_layout():
    """On the meta device (no weights): the file names, shard sizes and index of random-klein are those of
    FLUX.2-klein-4B.files.json (derived there from the same shapes and caps: this keeps the two in step)."""
    real = checkpoints.real_files("klein")
    derived = set(json.loads((checkpoints.CONFIGS / "FLUX.2-klein-4B.files.json").read_text())["derived"])
    planned, indexes = {}, {}
    for part in ("transformer", "text_encoder", "vae"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                model = checkpoints._make_part(part, "klein", tiny=False)
        finally:
            torch.set_default_dtype(torch.float32)
        if part in checkpoints.KLEIN_STREAMED_PARTS:
            files, indexes[part] = checkpoints.shard_layout(model, checkpoints.KLEIN_MAX_SHARD_BYTES[part])
            rules = {checkpoints.init_rule(model, key) for specs in files.values() for key in specs}
            assert rules <= {"normal", "zeros", "ones"}
        else:  # saved whole, by save_pretrained (its BatchNorm's int64 counter included)
            files = {"diffusion_pytorch_model.safetensors": {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}}
        for name, specs in files.items():
            planned[f"{part}/{name}"] = checkpoints.safetensors_size(specs, {"format": "pt"})
    weights = {path: size for path, size in real.items() if path.endswith(".safetensors")}
    assert planned == weights and set(weights) == derived
    assert indexes == {"transformer": None, "text_encoder": "model.safetensors.index.json"}
    assert 15.9 < checkpoints.random_stand_in_gb("klein") < 16.1


@pytest.fixture
def tiny_klein(fresh_cache):
    return fluxnb.build_tiny("klein")


def test_tiny_klein_generates_on_the_cpu(tiny_klein, fresh_cache):
    from diffusers import Flux2KleinPipeline

    assert tiny_klein == fresh_cache / "tiny-flux.2-klein-4b" and fluxnb.is_stand_in(tiny_klein) == "tiny"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "Qwen3ForCausalLM" and type(pipe.vae).__name__ == "AutoencoderKLFlux2"
    assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel" and pipe.config.is_distilled
    assert type(pipe.tokenizer).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")  # one class in transformers 5
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name
    settings = fluxnb.generation_settings(KLEIN)
    image = pipe(prompt="a cat", height=64, width=64, num_inference_steps=2, guidance_scale=settings["guidance"],
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all() and image.std() > 0
    # the staged recipe: encode alone, then denoise from the embeddings
    embeds, _ = pipe.encode_prompt("a cat", device="cpu", max_sequence_length=64)
    assert embeds.shape == (1, 64, 3 * pipe.text_encoder.config.hidden_size)
    staged = pipe(prompt_embeds=embeds, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(staged).all()


def test_tiny_klein_is_deterministic(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "a"))
    first = fluxnb.build_tiny("klein")
    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "b"))
    second = fluxnb.build_tiny("klein")
    assert _digest(first) == _digest(second)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_random_klein_is_refused_without_a_gpu_before_anything_is_written(monkeypatch, fresh_cache):
    def no_writing(*args, **kwargs):
        raise AssertionError("the random stand-in was about to be written on a machine without a GPU")

    monkeypatch.setattr(checkpoints, "_write_pipeline", no_writing)
    monkeypatch.delenv(checkpoints.WITHOUT_GPU_VAR, raising=False)
    with pytest.raises(fluxnb.errors.NeedsGPUError) as refusal:  # the course runner's one setting, on klein
        checkpoints.stand_in_folder(KLEIN, "random-dev")
    message = str(refusal.value)
    assert "random-klein" in message and "FLUX.2-klein-4B" in message and "16.0 GB" in message
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())


def test_the_random_klein_build_streams_the_big_parts(monkeypatch, fresh_cache):
    """build_random("klein")'s wiring without its 16 GB: the transformer and Qwen3 reach write_streamed on
    the meta device with the Hub's caps and configs, the VAE is saved whole, the configs are the Hub's."""
    streamed_parts = {}

    def record(model, folder, seed, device="cpu", max_shard_bytes=checkpoints.SHARD_BYTES, config=None):
        assert all(p.device.type == "meta" for p in model.parameters()) and model.dtype == torch.bfloat16
        streamed_parts[folder.name] = (type(model).__name__, seed, max_shard_bytes, config)
        folder.mkdir(parents=True)

    monkeypatch.setattr(checkpoints, "write_streamed", record)
    monkeypatch.setattr(checkpoints, "check_free_disk", lambda path, need_gb, what: None)
    path = fluxnb.build_random("klein", device="cpu", without_gpu=True)
    assert path == fresh_cache / "random-flux.2-klein-4b" and fluxnb.is_stand_in(path) == "random"
    assert streamed_parts == {
        "text_encoder": ("Qwen3ForCausalLM", 2, 5 * 10**9, checkpoints.real_config("klein", "text_encoder")),
        "transformer": ("Flux2Transformer2DModel", 4, 10**10, checkpoints.real_config("klein", "transformer"))}
    assert json.loads((path / "text_encoder" / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    assert (path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    for part in ("vae", "scheduler", "model_index"):
        assert json.loads((path / checkpoints.config_path(part)).read_text()) == checkpoints.real_config("klein", part)
