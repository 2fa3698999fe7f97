"""A slice of a Hub checkpoint downloads only its own tensors (fluxnb.slices), through the stand-in Hub.

The repositories are served by :class:`fluxnb.hub.StandInHub`, which counts every byte it sends; the client is
huggingface_hub's own, pointed at it with ``endpoint=`` (this process is offline otherwise: conftest.py).
The main one is a transformer of FLUX.1's layout with 3 double and 6 single blocks in 4 shards and an index,
so that a slice leaves most of its bytes on the server; the tiny stand-in covers a transformer in one file.
"""

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from safetensors import safe_open

import fluxnb
from fluxnb import hub, slices
from fluxnb.prequantized import size_text

DEV = "black-forest-labs/FLUX.1-dev"
BLOCKS = (1, 2)  # of 3 and 6


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A FLUX.1-layout transformer (bf16, 27 MB) in 4 shards with an index, as save_pretrained cuts the Hub's."""
    from diffusers import FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=3, num_single_layers=6,
                                   attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    model.to(torch.bfloat16).save_pretrained(folder / "transformer", max_shard_size="8MB")
    assert len(list((folder / "transformer").glob("*.safetensors"))) == 4
    return folder


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """An empty fluxnb cache and Hugging Face cache for the test, and the client online (for the stand-in Hub only)."""
    from huggingface_hub import constants

    monkeypatch.setenv("FLUXNB_CACHE", str(tmp_path / "fluxnb"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def _serve(folder, gated=False, tokens=()):
    return hub.StandInHub([hub.Repository(DEV, lambda: folder, gated=gated)], tokens=tokens).start()


@pytest.fixture
def served(sharded, caches):
    server = _serve(sharded)
    yield server
    server.stop()


def _tensors(folder):
    with safe_open(str(Path(folder) / "transformer" / slices.SLICE_FILE), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _weights_bytes(folder):
    return sum(p.stat().st_size for p in (Path(folder) / "transformer").glob("*.safetensors"))


def _assert_same_slice(a, b):
    mine, theirs = _tensors(a), _tensors(b)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    assert json.loads((Path(a) / "transformer" / "config.json").read_text()) == json.loads(
        (Path(b) / "transformer" / "config.json").read_text())


def test_a_slice_of_a_hub_id_downloads_only_its_tensors(served, sharded):
    hub_args = dict(endpoint=served.url, token=False)
    text = slices.slice_download_text(DEV, BLOCKS, **hub_args)  # the headers are read for it, and counted in
    headers = served.bytes_sent()
    assert all(t["bytes"] <= slices.HEADER_PROBE for t in served.transfers)  # the config, the index, the headers
    planned = headers + slices.slice_download_bytes(DEV, BLOCKS, **hub_args)  # read already + what is left
    assert slices.slice_download_bytes(DEV, BLOCKS, **hub_args) < planned and served.bytes_sent() == headers
    assert f"{size_text(planned)} to download" in text
    assert "the first 1 of its 3 double-stream and 2 of its 6 single-stream blocks" in text
    assert size_text(_weights_bytes(sharded)) in text  # the whole transformer's size, beside the slice's
    folder = slices.slice_for(DEV, BLOCKS, **hub_args)

    local = slices.slice_for(str(sharded), BLOCKS)  # the same slice, from the folder on disk
    assert folder != local
    _assert_same_slice(folder, local)
    assert (Path(folder) / "transformer" / slices.SLICE_FILE).read_bytes() == (
        Path(local) / "transformer" / slices.SLICE_FILE).read_bytes()

    kept = sum(t.numel() * t.element_size() for t in _tensors(local).values())
    sent = served.bytes_sent()
    whole = _weights_bytes(sharded)
    assert kept <= sent < 1.1 * kept  # the kept tensors' bytes, the headers and the config
    assert sent < 0.5 * whole  # far from the whole transformer (the old slice_for downloaded it all)
    assert abs(sent - planned) <= 0.03 * sent  # what was said beforehand is what came
    weights = [t for t in served.transfers if t["path"].endswith(".safetensors")]
    assert weights and all(t["range"] for t in weights)  # byte ranges only, never a whole weight file
    assert len([t for t in weights if t["bytes"] > slices.HEADER_PROBE]) < len(_tensors(local)) / 5  # ranges joined

    before = len(served.transfers)
    assert slices.slice_for(DEV, BLOCKS, **hub_args) == folder  # made once
    assert slices.slice_download_bytes(DEV, BLOCKS, **hub_args) == 0
    assert "nothing to download" in slices.slice_download_text(DEV, BLOCKS, **hub_args)
    assert len(served.transfers) == before  # asked about (HEAD), nothing sent again


def test_config_and_parameter_count_of_a_hub_id_read_no_weights(served, sharded):
    hub_args = dict(endpoint=served.url, token=False)
    assert vars(slices.transformer_config(DEV, **hub_args)) == vars(slices.transformer_config(str(sharded)))
    count = slices.parameter_count(DEV, **hub_args)
    assert count == slices.parameter_count(str(sharded)) > 0
    assert served.bytes_sent() < 0.05 * _weights_bytes(sharded)  # the config, the index and the headers


def test_a_transformer_in_one_file_is_sliced_too(caches):
    tiny = fluxnb.build_tiny("dev")  # 1 double and 1 single block, one file, no index
    server = _serve(tiny)
    try:
        hub_args = dict(endpoint=server.url, token=False)
        planned = slices.slice_download_bytes(DEV, (1, 0), **hub_args)
        folder = slices.slice_for(DEV, (1, 0), **hub_args)
        _assert_same_slice(folder, slices.slice_for(str(tiny), (1, 0)))
        assert abs(server.bytes_sent() - planned) <= 0.03 * server.bytes_sent()
        whole = slices.slice_for(DEV, (2, 4), **hub_args)  # more blocks than it has: all of them
        text = slices.slice_download_text(DEV, (2, 4), **hub_args)
        assert "all its 1 double-stream and 1 single-stream blocks" in text and "nothing to download" in text
        reference = _tensors(whole)
        with safe_open(str(tiny / "transformer" / slices.SLICE_FILE), framework="pt") as f:
            assert sorted(f.keys()) == sorted(reference)
            assert all(torch.equal(f.get_tensor(k), reference[k]) for k in f.keys())
    finally:
        server.stop()


def _finished_slices(cache):
    return sorted(p.parent.parent.name for p in (Path(cache) / "fluxnb" / "slices").rglob(slices._DONE))


def test_an_interrupted_download_leaves_no_finished_slice(served, sharded, caches, monkeypatch):
    hub_args = dict(endpoint=served.url, token=False)
    read = slices._RangeReader.read
    calls = []

    def interrupted(self, tensor):
        calls.append(tensor.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the learner stops the cell, or the VM goes, mid-way
        return read(self, tensor)

    monkeypatch.setattr(slices._RangeReader, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slices.slice_for(DEV, BLOCKS, **hub_args)
    assert _finished_slices(caches) == []
    assert not list((caches / "fluxnb" / "slices").glob(f"*-{BLOCKS[0]}-{BLOCKS[1]}"))  # only the .partial folder
    assert slices.slice_download_bytes(DEV, BLOCKS, **hub_args) > 0  # still to download

    monkeypatch.setattr(slices._RangeReader, "read", read)
    folder = slices.slice_for(DEV, BLOCKS, **hub_args)  # the next run starts again and finishes
    _assert_same_slice(folder, slices.slice_for(str(sharded), BLOCKS))
    assert not list((caches / "fluxnb" / "slices").glob("*.partial"))


def test_a_server_that_fails_mid_way_leaves_no_finished_slice(sharded, caches):
    folder = caches / "repo"
    shutil.copytree(sharded, folder)
    server = _serve(folder)
    try:
        hub_args = dict(endpoint=server.url, token=False)
        assert slices.slice_download_bytes(DEV, BLOCKS, **hub_args) > 0  # the headers are read
        last = sorted((folder / "transformer").glob("*.safetensors"))[-1]
        last.unlink()  # the server answers 206, then breaks off the body: the file is gone
        with pytest.raises((httpx.TransportError, slices.SliceDownloadError)):
            slices.slice_for(DEV, BLOCKS, **hub_args)
        assert _finished_slices(caches) == []
    finally:
        server.stop()


def test_a_gated_repository_needs_its_token_before_anything_is_planned(sharded, caches):
    server = _serve(sharded, gated=True, tokens=("hf_good",))
    try:
        with pytest.raises(GatedRepoError):
            slices.slice_download_bytes(DEV, BLOCKS, endpoint=server.url, token=False)
        with pytest.raises(HfHubHTTPError):
            slices.slice_for(DEV, BLOCKS, endpoint=server.url, token="hf_someone_else")
        assert server.bytes_sent() < 1000  # error answers only
        assert slices.slice_download_bytes(DEV, BLOCKS, endpoint=server.url, token="hf_good") > 0
    finally:
        server.stop()


def test_offline_a_made_slice_is_found_in_the_cache(served, monkeypatch):
    from huggingface_hub import constants

    hub_args = dict(endpoint=served.url, token=False)
    folder = slices.slice_for(DEV, BLOCKS, **hub_args)
    count = slices.parameter_count(DEV, **hub_args)
    sent = served.bytes_sent()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert slices.slice_for(DEV, BLOCKS, **hub_args) == folder
    assert slices.parameter_count(DEV, **hub_args) == count  # the headers were kept
    assert "nothing to download" in slices.slice_download_text(DEV, BLOCKS, **hub_args)
    assert served.bytes_sent() == sent
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises((OfflineModeIsEnabled, FileNotFoundError)):  # a slice not made: offline says so
        slices.slice_for(DEV, (2, 1), **hub_args)


def test_in_a_notebook_the_real_id_is_sliced_through_the_clients_own_endpoint(tmp_path):
    """As notebooks 05-07 run on the tiny stand-in: resolve_checkpoint first, then fluxnb.slices with no endpoint or
    token given (huggingface_hub's own, pointed at the stand-in Hub); the whole transformer says its size first."""
    import os
    import subprocess
    import sys
    import textwrap

    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "downloads.jsonl"
    env = {**os.environ, "HOME": str(home), "FLUXNB_CHECKPOINT": "tiny", "HF_HUB_OFFLINE": "1",
           "FLUXNB_HUB_CACHE": str(tmp_path / "hub-cache"), "FLUXNB_HUB_LOG": str(log),
           "FLUXNB_CACHE": str(tmp_path / "fluxnb"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = f"""
        import json, fluxnb
        from fluxnb import slices as S
        checkpoint = fluxnb.resolve_checkpoint("{DEV}")
        print("TEXT", S.slice_download_text(checkpoint, (1, 0)))
        folder = S.slice_for(checkpoint, (1, 0))
        print("SLICE", folder)
        print("PARAMETERS", S.parameter_count(checkpoint), S.parameter_count(folder))
        print("WHOLE", S.slice_download_text(checkpoint, None))
        S.local_folder(checkpoint)
        """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=home)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines() if " " in line}
    assert "to download" in lines["TEXT"] and "FLUX.1-dev's" in lines["TEXT"]
    assert Path(lines["SLICE"]).parent == tmp_path / "fluxnb" / "slices"  # in fluxnb's cache, not the Hub's
    total, sliced = map(int, lines["PARAMETERS"].split())
    assert 0 < sliced < total
    assert lines["WHOLE"].startswith(f"the whole transformer of {DEV}: ") and "to download" in lines["WHOLE"]
    assert f"{DEV}'s whole transformer: " in done.stdout  # local_folder says the size before its download
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    weights = [e for e in logged if e["path"].endswith(".safetensors")]
    whole = [e for e in weights if not e["range"]]  # only local_folder's snapshot_download, at the end
    assert len(whole) == 1 and all(e["range"] for e in weights[:weights.index(whole[0])])


def test_a_server_that_ignores_ranges_is_refused_not_downloaded_whole(caches, monkeypatch):
    """An answer of 200 (the whole file) to a range request is closed unread, with a message: never taken as a slice."""
    tiny = fluxnb.build_tiny("dev")
    resolve = hub._Handler._resolve

    def ignoring_ranges(self, *args):
        del self.headers["Range"]  # as a proxy that drops the header would
        return resolve(self, *args)

    monkeypatch.setattr(hub._Handler, "_resolve", ignoring_ranges)
    server = _serve(tiny)
    try:
        with pytest.raises(slices.SliceDownloadError, match="did not answer the byte range"):
            slices.slice_for(DEV, (1, 0), endpoint=server.url, token=False)
        assert _finished_slices(caches) == []
    finally:
        server.stop()
