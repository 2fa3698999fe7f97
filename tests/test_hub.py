"""The stand-in Hub (fluxnb.hub) answers huggingface_hub's unchanged client as the Hub does.

In this process huggingface_hub is imported already and offline (conftest.py), so these tests name the
endpoint explicitly (``endpoint=``, ``HfApi(endpoint=...)``: the client's public arguments); what a
notebook does (``resolve_checkpoint`` first, then ``from_pretrained`` of the real id) runs in a fresh
interpreter, as a kernel would.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from safetensors.torch import save_file

from fluxnb import hub

ROOT = Path(__file__).resolve().parents[1]
DEV = "black-forest-labs/FLUX.1-dev"


@pytest.fixture
def repo_folder(tmp_path):
    """A small repository: a config, a safetensors file (two tensors), a tokenizer file in a subfolder."""
    folder = tmp_path / "repo"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 64}\n')
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 0}\n')
    save_file({"a.weight": torch.arange(2**20, dtype=torch.float32), "b.weight": torch.ones(8, 8)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "fluxnb_done.json").write_text("{}\n")  # fluxnb's marker: not part of the repository
    return folder


@pytest.fixture
def served(repo_folder, tmp_path, monkeypatch):
    """That folder served twice, as an open repository and as a gated one; the client online for the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = hub.StandInHub([hub.Repository("someone/open", lambda: repo_folder),
                             hub.Repository("someone/gated", lambda: repo_folder, gated=True)],
                            tokens=("hf_good",), revoked=("hf_revoked",), log=tmp_path / "log.jsonl").start()
    yield server
    server.stop()


def test_downloads_go_into_the_cache_and_are_counted(served, repo_folder, tmp_path):
    cache = tmp_path / "cache"
    path = hf_hub_download("someone/open", "model.safetensors", endpoint=served.url, cache_dir=cache, token=False)
    assert Path(path).read_bytes() == (repo_folder / "model.safetensors").read_bytes()
    assert Path(path).is_relative_to(cache)  # the Hub's cache layout: models--someone--open/snapshots/<sha>/...
    size = (repo_folder / "model.safetensors").stat().st_size
    assert served.bytes_sent("someone/open") == size
    hf_hub_download("someone/open", "model.safetensors", endpoint=served.url, cache_dir=cache, token=False)
    assert served.bytes_sent() == size  # cached: asked about (HEAD), not sent again
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged and logged[0]["repo"] == "someone/open" and logged[0]["bytes"] == size


def test_a_safetensors_header_is_read_with_ranges_not_the_whole_file(served, repo_folder):
    meta = HfApi(endpoint=served.url).get_safetensors_metadata("someone/open", token=False)
    assert set(meta.files_metadata["model.safetensors"].tensors) == {"a.weight", "b.weight"}
    size = (repo_folder / "model.safetensors").stat().st_size
    assert 0 < served.bytes_sent() < size / 10  # the header (and the first 100 kB the client asks for) of 4 MB
    assert all(t["range"] for t in served.transfers)


def test_range_requests_answer_as_the_hub(served, repo_folder):
    url = f"{served.url}/someone/open/resolve/main/model.safetensors"
    data = (repo_folder / "model.safetensors").read_bytes()
    part = httpx.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == data[8:16]
    assert part.headers["Content-Range"] == f"bytes 8-15/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=-4"}).content == data[-4:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    head = httpx.head(url)
    assert head.headers["X-Linked-Size"] == str(len(data)) and len(head.headers["X-Repo-Commit"]) == 40
    assert head.headers["X-Linked-Etag"].strip('"') == __import__("hashlib").sha256(data).hexdigest()


def test_the_file_list_and_snapshot_match_the_folder(served, repo_folder, tmp_path):
    api = HfApi(endpoint=served.url)
    info = api.model_info("someone/open", files_metadata=True)
    assert sorted(s.rfilename for s in info.siblings) == ["config.json", "model.safetensors", "tokenizer/vocab.json"]
    assert len(info.sha) == 40 and info.gated is False
    assert api.model_info("someone/gated").gated == "manual"  # the card is public; the files are not
    tree = {f.path: f for f in api.list_repo_tree("someone/open", recursive=True)}
    assert tree["model.safetensors"].lfs.size == (repo_folder / "model.safetensors").stat().st_size
    assert tree["tokenizer"].__class__.__name__ == "RepoFolder"
    local = Path(snapshot_download("someone/open", endpoint=served.url, cache_dir=tmp_path / "c", token=False))
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == sorted(
        s.rfilename for s in info.siblings)


def test_a_gated_repository_refuses_a_missing_wrong_or_revoked_token(served, tmp_path):
    def fetch(token):
        return hf_hub_download("someone/gated", "config.json", endpoint=served.url, cache_dir=tmp_path / "c",
                               token=token)

    with pytest.raises(GatedRepoError) as missing:
        fetch(False)
    assert missing.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as wrong:
        fetch("hf_someone_else")
    assert wrong.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError, match="Invalid credentials"):
        fetch("hf_revoked")
    assert Path(fetch("hf_good")).read_text() == '{"hidden_size": 64}\n'
    api = HfApi(endpoint=served.url)
    api.auth_check("someone/gated", token="hf_good")
    with pytest.raises(GatedRepoError):
        api.auth_check("someone/gated", token=False)


def test_what_is_not_there_gets_the_hubs_errors(served, tmp_path):
    kwargs = dict(endpoint=served.url, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("someone/absent", "config.json", **kwargs)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("someone/open", "no-such-file.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("someone/open", "config.json", revision="v9", **kwargs)


def _python(code: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (as a notebook kernel starts), from outside the checkout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=env["HOME"])


@pytest.fixture
def kernel_env(tmp_path):
    """A kernel's environment: the tiny switch, an empty stand-in Hub cache, a download log, offline asked."""
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home), "FLUXNB_CHECKPOINT": "tiny", "HF_HUB_OFFLINE": "1",
            "FLUXNB_HUB_CACHE": str(tmp_path / "hub-cache"), "FLUXNB_HUB_LOG": str(tmp_path / "downloads.jsonl"),
            "PYTHONPATH": str(ROOT)}


def test_a_notebook_loads_the_real_id_through_the_stand_in_hub(kernel_env, tmp_path):
    """What every parameters cell does: resolve_checkpoint first, then the libraries' own calls with the real id."""
    done = _python(f"""
        import json, os, torch, fluxnb
        checkpoint = fluxnb.resolve_checkpoint("{DEV}")
        package = fluxnb.prequantized_checkpoint("{DEV}", torch.float32)
        from diffusers import FluxPipeline, FluxTransformer2DModel
        pipe = FluxPipeline.from_pretrained(checkpoint, transformer=None, dtype=torch.float32)
        nf4 = FluxTransformer2DModel.from_pretrained(package, subfolder="transformer", dtype=torch.float32)
        print(json.dumps(dict(checkpoint=checkpoint, package=package, stand_in=fluxnb.is_stand_in(checkpoint),
                              endpoint=os.environ["HF_ENDPOINT"], cache=os.environ["HF_HUB_CACHE"],
                              quantized=type(nf4.config.quantization_config).__name__)))
        """, kernel_env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["checkpoint"] == DEV and seen["package"] == "hf-internal-testing/flux.1-dev-nf4-pkg"
    assert seen["stand_in"] == "tiny" and seen["endpoint"].startswith("http://127.0.0.1:")
    assert seen["cache"] == kernel_env["FLUXNB_HUB_CACHE"] and seen["quantized"] == "BitsAndBytesConfig"
    snapshots = list(Path(kernel_env["FLUXNB_HUB_CACHE"]).glob("models--black-forest-labs--FLUX.1-dev/snapshots/*"))
    assert len(snapshots) == 1 and (snapshots[0] / "vae" / "config.json").is_file()
    logged = [json.loads(line) for line in Path(kernel_env["FLUXNB_HUB_LOG"]).read_text().splitlines()]
    fetched = {(e["repo"], e["path"]) for e in logged}
    assert (DEV, "text_encoder_2/model.safetensors") in fetched
    assert ("hf-internal-testing/flux.1-dev-nf4-pkg", "transformer/diffusion_pytorch_model.safetensors") in fetched
    assert not any(path.startswith("transformer/") for repo, path in fetched if repo == DEV)  # transformer=None
    assert not (Path(kernel_env["HOME"]) / ".cache" / "huggingface").exists()  # the learner's cache untouched


def test_without_a_token_the_gated_stand_in_says_what_to_do(kernel_env):
    done = _python(f"""
        import os, fluxnb
        checkpoint = fluxnb.resolve_checkpoint("{DEV}")
        del os.environ["HF_TOKEN"]  # as a learner without one
        try:
            fluxnb.check_checkpoint_access(checkpoint)
        except fluxnb.FluxnbError as error:
            print(type(error).__name__, error)
        fluxnb.check_checkpoint_access(fluxnb.resolve_checkpoint("black-forest-labs/FLUX.1-schnell"))  # open
        print("schnell: open")
        """, kernel_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HubAccessError" in done.stdout and "gated" in done.stdout and "schnell: open" in done.stdout


def test_the_stand_ins_come_before_huggingface_hub_or_not_at_all(kernel_env):
    done = _python(f"""
        import huggingface_hub, fluxnb
        fluxnb.resolve_checkpoint("{DEV}")
        """, kernel_env)
    assert done.returncode != 0 and "HubTooLateError" in done.stderr and "restart the kernel" in done.stderr
    unknown = _python("""
        import fluxnb
        fluxnb.resolve_checkpoint("someone/my-fine-tune")
        """, kernel_env)
    assert unknown.returncode != 0 and "BadSettingError" in unknown.stderr and "someone/my-fine-tune" in unknown.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_random_stand_ins_are_refused_without_a_gpu_before_anything_is_served(kernel_env):
    done = _python(f"""
        import fluxnb
        fluxnb.resolve_checkpoint("{DEV}")
        """, {**kernel_env, "FLUXNB_CHECKPOINT": "random-dev", "FLUXNB_BUILD_WITHOUT_GPU": "0"})
    assert done.returncode != 0 and "NeedsGPUError" in done.stderr and "FLUXNB_CHECKPOINT=tiny" in done.stderr
    assert not Path(kernel_env["FLUXNB_HUB_LOG"]).exists()
