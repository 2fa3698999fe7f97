"""A FLUX.1 transformer checkpoint, and a slice of it that a small machine can hold (notebooks 05-07).

A full bf16 FLUX.1 transformer is 24 GB: it fits neither a T4 nor Colab's RAM. A *slice* is its first
few blocks written as a small checkpoint of their own (real shapes, real weights, with the embedders
and the output layer), so a small machine can compare every quantization scheme per block, while
full-model numbers come from the benchmark. :func:`slice_for` makes one once in fluxnb's cache.

From a Hub id the slice downloads only its own tensors. A safetensors file starts with a header that
gives every tensor's dtype, shape and byte offsets; huggingface_hub reads it with HTTP range requests
(``HfApi.parse_safetensors_file_metadata``), and the slice then asks the Hub for just the kept
tensors' bytes, with range requests on each file's ``resolve`` URL through huggingface_hub's own
session, headers and errors (so a token, a gated repository and offline mode behave as in any other
download). Nearby ranges go in one request. The slice is written one tensor at a time
(:func:`fluxnb.checkpoints.save_file_streamed`), into a ``.partial`` folder renamed when complete,
and is keyed by the repository id and its commit. :func:`slice_plan` / :func:`slice_download_bytes` /
:func:`slice_download_text` say what it will download before it does.

The rest reads a checkpoint without loading it: :func:`transformer_config` and :func:`parameter_count`
(of a Hub id: the config and the safetensors headers only), and :func:`local_folder` (a folder as it
is; a Hub id becomes the downloaded snapshot of its whole transformer, its size said first).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxnb.exceptions import FluxnbError

TRANSFORMER = "transformer"
CONFIG = f"{TRANSFORMER}/config.json"
INDEX = f"{TRANSFORMER}/diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = f"{TRANSFORMER}/diffusion_pytorch_model.safetensors"
SLICE_FILE = "diffusion_pytorch_model.safetensors"  # a slice is one file, in its folder's transformer/
_DONE = "fluxnb_slice.json"  # written last, in transformer/: a slice folder with it is complete
HEADERS_FORM = 1  # the form of the cached headers (slices/headers/*.json); another form is read again
MAX_GAP = 2**20  # unkept bytes one request reads through rather than start another (about a request's latency)
HEADER_PROBE = 100_001  # the bytes parse_safetensors_file_metadata asks for first (bytes=0-100000)
_CHUNK = 2**20
_RETRIES = 3  # a connection lost mid-way is asked again from where it stopped, this many times
_COMMIT = re.compile(r"[0-9a-f]{40}")


class SliceDownloadError(FluxnbError, OSError):
    """The Hub did not answer a byte range as asked (no 206, another range), or a file is not the safetensors
    its header says."""


# --- what a checkpoint holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint's transformer: where its bytes are (absolute offsets in its file)."""

    name: str
    file: str  # in the repository ("transformer/diffusion_pytorch_model-00001-of-00003.safetensors"), or a path
    dtype: str  # safetensors' name: "BF16", "F32" ...
    shape: tuple[int, ...]
    begin: int  # first byte, from the start of the file
    end: int  # one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """What a safetensors file's header says, and what reading it cost."""

    file: str
    size: int  # bytes of the whole file
    tensors: tuple[TensorEntry, ...]
    header_bytes: int  # bytes the header's reading downloads (parse_safetensors_file_metadata's and the length's)



SLICES_VAR = "FLUXNB_SLICES"  # where slices are kept; the course runner gives each notebook its own, as a fresh VM


def slices_dir() -> Path:
    """Where slices and the headers they were planned from are kept: ``$FLUXNB_SLICES``, else the fluxnb cache's
    ``slices/``. Like the Hugging Face cache they come from, they go with the machine: on a fresh Colab VM a
    notebook fetches its slice again (the course runner's per-notebook folder counts that)."""
    from fluxnb.checkpoints import cache_dir

    return Path(os.environ.get(SLICES_VAR) or cache_dir() / "slices").expanduser()

def _keep(name: str, num_layers: int, num_single_layers: int) -> bool:
    """Whether tensor ``name`` belongs to a slice of the first blocks (the embedders and output layer always do)."""
    for prefix, limit in (("transformer_blocks.", num_layers), ("single_transformer_blocks.", num_single_layers)):
        if name.startswith(prefix):
            return int(name.split(".")[1]) < limit
    return True


def _torch_dtype(name: str) -> Any:
    from fluxnb.checkpoints import _SAFETENSORS_DTYPES

    for dtype, label in _SAFETENSORS_DTYPES.items():
        if label == name:
            return dtype
    known = ", ".join(_SAFETENSORS_DTYPES.values())
    raise SliceDownloadError(f"tensors of dtype {name} cannot be sliced here (only {known})")


def is_hub_id(checkpoint: str | os.PathLike[str]) -> bool:
    """True for a Hub repository id, False for a folder on this machine."""
    return not Path(checkpoint).is_dir()


def _clamp(config: dict[str, Any], blocks: tuple[int, int]) -> tuple[int, int]:
    return min(blocks[0], config["num_layers"]), min(blocks[1], config["num_single_layers"])


class _Local:
    """A checkpoint folder on this machine (diffusers layout)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = json.loads((folder / CONFIG).read_text())

    def name(self) -> str:
        return str(self.folder)

    def tag(self, n: int, m: int) -> str:
        return f"{zlib.crc32(str(self.folder.resolve()).encode()):08x}-{n}-{m}"

    def marker(self, n: int, m: int) -> dict[str, Any]:
        return dict(source=str(self.folder), num_layers=n, num_single_layers=m)

    def shards(self) -> list[ShardHeader]:
        out = []
        for shard in sorted((self.folder / TRANSFORMER).glob("*.safetensors")):
            with open(shard, "rb") as f:  # safetensors' layout: 8 bytes of header length, the JSON header, the data
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
            start = 8 + length
            tensors = tuple(TensorEntry(name, str(shard), info["dtype"], tuple(info["shape"]),
                                        start + info["data_offsets"][0], start + info["data_offsets"][1])
                            for name, info in header.items() if name != "__metadata__")
            out.append(ShardHeader(str(shard), shard.stat().st_size, tensors, 0))
        return out

    @contextlib.contextmanager
    def reader(self, tensors: list[TensorEntry]) -> Iterator[Callable[[str], Any]]:
        from safetensors import safe_open

        by_name = {t.name: t for t in tensors}
        with contextlib.ExitStack() as stack:
            files: dict[str, Any] = {}

            def make(name: str) -> Any:
                file = by_name[name].file
                if file not in files:
                    files[file] = stack.enter_context(safe_open(file, framework="pt"))
                return files[file].get_tensor(name)

            yield make


class _Hub:
    """A Hub repository's transformer at one commit: its config and its files' headers, read without its weights."""

    def __init__(self, repo_id: str, revision: str | None, token: bool | str | None, endpoint: str | None) -> None:
        from huggingface_hub import hf_hub_download

        self.repo_id, self.token, self.endpoint = str(repo_id).strip("/"), token, endpoint
        config = Path(hf_hub_download(self.repo_id, CONFIG, revision=revision, token=token, endpoint=endpoint))
        # The commit it came from (the answer's X-Repo-Commit; offline, the cached one): the cache keeps each file
        # in snapshots/<commit>/<its path>. Every later request names this commit, so all of it is of one version.
        self.commit = config.parents[1].name
        if not _COMMIT.fullmatch(self.commit):
            self.commit = hf_hub_download(self.repo_id, CONFIG, revision=revision, token=token, endpoint=endpoint,
                                          dry_run=True).commit_hash
        self.config = json.loads(config.read_text())
        self.small_files = {CONFIG: config.stat().st_size}
        self._shards: list[ShardHeader] | None = None
        self.headers_on_disk = False  # the headers came from fluxnb's cache (an earlier plan or slice): no new fetch

    def _download(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.repo_id, filename, revision=self.commit, token=self.token, endpoint=self.endpoint)

    def name(self) -> str:
        return self.repo_id

    def _slug(self) -> str:
        return f"{self.repo_id.replace('/', '--')}-{self.commit[:12]}"

    def tag(self, n: int, m: int) -> str:
        return f"{self._slug()}-{n}-{m}"

    def marker(self, n: int, m: int) -> dict[str, Any]:
        return dict(source=self.repo_id, commit=self.commit, num_layers=n, num_single_layers=m)

    def _headers_file(self) -> Path:
            return slices_dir() / "headers" / f"{self.repo_id.replace('/', '--')}-{self.commit}.json"

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.endpoint)

    def http_headers(self) -> dict[str, str]:
        """huggingface_hub's own headers (the token, its user agent), asking for the bytes as stored: a compressed
        answer would not be the byte range asked for."""
        from huggingface_hub.utils import build_hf_headers

        return {**build_hf_headers(token=self.token), "Accept-Encoding": "identity"}

    def shards(self) -> list[ShardHeader]:
        """Every weight file's header: read once (a few hundred kB), then kept beside fluxnb's slices."""
        if self._shards is not None:
            return self._shards
        cached = self._headers_file()
        if cached.is_file():
            data = json.loads(cached.read_text())
            if data.get("form") == HEADERS_FORM:
                self.small_files.update(data["small_files"])
                self.headers_on_disk = True
                self._shards = [ShardHeader(s["file"], s["size"], tuple(
                    TensorEntry(t[0], s["file"], t[1], tuple(t[2]), t[3], t[4]) for t in s["tensors"]), s["header_bytes"])
                    for s in data["shards"]]
                return self._shards
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            index = Path(self._download(INDEX))
            self.small_files[INDEX] = index.stat().st_size
            files = sorted({f"{TRANSFORMER}/{name}" for name in json.loads(index.read_text())["weight_map"].values()})
        except RemoteEntryNotFoundError:  # one file, no index (a small transformer)
            files = [SINGLE_FILE]
        api = HfApi(endpoint=self.endpoint)
        shards = []
        for file in files:
            meta = api.parse_safetensors_file_metadata(self.repo_id, file, revision=self.commit, token=self.token)
            first, size = _get_range(self.url(file), self.http_headers(), 0, 7)  # the header's length: data start
            length = int.from_bytes(first, "little")
            start = 8 + length
            probe = min(HEADER_PROBE, size)
            header_bytes = probe + (length if length > probe - 8 else 0) + 8
            tensors = tuple(sorted((TensorEntry(name, file, info.dtype, tuple(info.shape), start + info.data_offsets[0],
                                                start + info.data_offsets[1]) for name, info in meta.tensors.items()),
                                   key=lambda t: t.begin))
            if max((t.end for t in tensors), default=start) != size:
                raise SliceDownloadError(f"{self.repo_id}/{file}: its header does not cover the file's {size} bytes")
            shards.append(ShardHeader(file, size, tensors, header_bytes))
        self._shards = shards
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".partial")
        kept = [dict(file=s.file, size=s.size, header_bytes=s.header_bytes,
                     tensors=[[t.name, t.dtype, list(t.shape), t.begin, t.end] for t in s.tensors]) for s in shards]
        tmp.write_text(json.dumps(dict(form=HEADERS_FORM, small_files=self.small_files, shards=kept)) + "\n")
        os.replace(tmp, cached)
        return shards

    @contextlib.contextmanager
    def reader(self, tensors: list[TensorEntry]) -> Iterator[Callable[[str], Any]]:
        import torch
        from huggingface_hub.utils import tqdm

        by_name = {t.name: t for t in tensors}
        requests = _requests(tensors)
        urls = {file: self.url(file) for file, _, _ in requests}
        with tqdm(total=sum(end - start for _, start, end in requests), unit="B", unit_scale=True,
                  desc=f"slice of {self.repo_id}") as progress:
            reader = _RangeReader(urls, self.http_headers(), requests, progress)
            try:
                def make(name: str) -> Any:
                    t = by_name[name]
                    dtype = _torch_dtype(t.dtype)
                    if t.nbytes == 0:
                        return torch.empty(t.shape, dtype=dtype)
                    return torch.frombuffer(reader.read(t), dtype=dtype).reshape(t.shape)

                yield make
            finally:
                reader.close()


def _source(checkpoint: str | os.PathLike[str], token: bool | str | None = None, endpoint: str | None = None,
            revision: str | None = None) -> _Local | _Hub:
    if not is_hub_id(checkpoint):
        return _Local(Path(checkpoint))
    return _Hub(str(checkpoint), revision, token, endpoint)


# --- byte ranges ----------------------------------------------------------------------------------


def _requests(tensors: list[TensorEntry]) -> list[tuple[str, int, int]]:
    """The byte ranges the slice asks for, ``[(file, start, end), ...]`` (end excluded), in the order its own file is
    written (safetensors' order, :func:`fluxnb.checkpoints.safetensors_header`): a tensor joins the request before
    it if it is in the same file and starts at most :data:`MAX_GAP` bytes after it, so each request is read to its
    end before the next one starts, and no answer waits half-read."""
    from fluxnb.checkpoints import safetensors_header

    by_name = {t.name: t for t in tensors}
    _, order = safetensors_header({t.name: (t.shape, _torch_dtype(t.dtype)) for t in tensors})
    requests: list[list[Any]] = []
    for name in order:
        t = by_name[name]
        if t.nbytes == 0:
            continue
        if requests and requests[-1][0] == t.file and 0 <= t.begin - requests[-1][2] <= MAX_GAP:
            requests[-1][2] = t.end
        else:
            requests.append([t.file, t.begin, t.end])
    return [(file, begin, end) for file, begin, end in requests]


def _check_range(response: Any, start: int) -> int:
    """The file's size, from a 206 answer to a range that starts at ``start``; anything else is refused."""
    from huggingface_hub.utils import hf_raise_for_status

    hf_raise_for_status(response)
    answered = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
    if response.status_code != 206 or answered is None or int(answered[1]) != start:
        raise SliceDownloadError(f"{response.url}: asked for bytes from {start}, got HTTP {response.status_code} "
                                 f"({response.headers.get('Content-Range') or 'no Content-Range'}): the server did not "
                                 "answer the byte range. Run the cell again; nothing half-made is kept")
    return int(answered[3])


def _get_range(url: str, headers: dict[str, str], start: int, end: int) -> tuple[bytes, int]:
    """Bytes ``start`` to ``end`` (included) of a file on the Hub, and the file's size."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"},
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        size = _check_range(response, start)
        return response.read(), size


class _RangeReader:
    """Reads the slice's tensors from the Hub in the order its file is written, over the requests of :func:`_requests`.

    Holds one answer open at a time and at most one chunk of it; a connection lost mid-way is asked
    again from the byte where it stopped (:data:`_RETRIES` times).
    """

    def __init__(self, urls: dict[str, str], headers: dict[str, str], requests: list[tuple[str, int, int]],
                 progress: Any) -> None:
        self.urls, self.headers, self.requests, self.progress = urls, headers, requests, progress
        self._response: Any = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""  # received and not yet used: the bytes from self._pos on
        self._file, self._pos, self._end = "", -1, -1

    def _open(self, file: str, at: int) -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        self.close()
        end = next((e for f, s, e in self.requests if f == file and s <= at < e), None)
        if end is None:
            raise SliceDownloadError(f"{file}: byte {at} is in no range this slice asks for")
        session = get_session()
        request = session.build_request("GET", self.urls[file], timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                        headers={**self.headers, "Range": f"bytes={at}-{end - 1}"})
        response = session.send(request, stream=True)
        try:
            _check_range(response, at)
        except BaseException:
            response.close()
            raise
        self._response, self._chunks = response, response.iter_bytes(_CHUNK)
        self._file, self._pos, self._end, self._pending = file, at, end, b""

    def read(self, tensor: TensorEntry) -> bytearray:
        """The tensor's bytes."""
        import httpx

        out = bytearray(tensor.nbytes)
        got = failures = 0
        while got < tensor.nbytes:
            at = tensor.begin + got
            if self._response is None or self._file != tensor.file or not self._pos <= at < self._end:
                self._open(tensor.file, at)
            if not self._pending:
                try:
                    self._pending = next(self._chunks)  # type: ignore[arg-type]
                except StopIteration:
                    self.close()
                    raise SliceDownloadError(f"{tensor.file}: the answer ended before byte {at}. Run the cell "
                                             "again; nothing half-made is kept") from None
                except httpx.TransportError:  # the connection went (reset, cut off, timed out): ask again from here
                    failures += 1
                    self.close()
                    if failures > _RETRIES:
                        raise
                    continue
                self.progress.update(len(self._pending))
            if self._pos < at:  # unkept bytes between two tensors of one request
                skip = min(at - self._pos, len(self._pending))
                self._pending, self._pos = self._pending[skip:], self._pos + skip
                continue
            take = min(tensor.nbytes - got, len(self._pending))
            out[got:got + take] = self._pending[:take]
            self._pending, self._pos, got = self._pending[take:], self._pos + take, got + take
        return out

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._chunks, self._pending = None, None, b""
        self._file, self._pos, self._end = "", -1, -1


# --- the slice ------------------------------------------------------------------------------------


def _kept(shards: list[ShardHeader], n: int, m: int) -> list[TensorEntry]:
    return [t for s in shards for t in s.tensors if _keep(t.name, n, m)]


def _write_slice(source: _Local | _Hub, folder: Path, n: int, m: int) -> Path:
    """Write the first ``n`` double and ``m`` single blocks of ``source`` as a checkpoint in ``folder`` (kept if
    made already)."""
    from fluxnb.checkpoints import save_file_streamed
    from fluxnb.environment import check_free_disk

    config = source.config
    if n > config["num_layers"] or m > config["num_single_layers"]:
        raise ValueError(f"{source.name()} has {config['num_layers']} double and {config['num_single_layers']} single "
                         f"blocks; asked for {n} and {m}")
    done = folder / TRANSFORMER / _DONE
    want = source.marker(n, m)
    if done.is_file() and json.loads(done.read_text()) == want:
        return folder
    if folder.exists() and not done.is_file() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a slice made by fluxnb: choose another folder")
    tensors = _kept(source.shards(), n, m)
    specs = {t.name: (t.shape, _torch_dtype(t.dtype)) for t in tensors}
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_free_disk(folder.parent, sum(t.nbytes for t in tensors) / 1e9 + 0.1, what="The slice")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # ours: a slice that was interrupted
    (staging / TRANSFORMER).mkdir(parents=True)
    with source.reader(tensors) as make:
        save_file_streamed(staging / TRANSFORMER / SLICE_FILE, specs, make)
    (staging / TRANSFORMER / "config.json").write_text(json.dumps(
        dict(config, num_layers=n, num_single_layers=m), indent=2) + "\n")
    (staging / TRANSFORMER / _DONE).write_text(json.dumps(want) + "\n")
    if folder.exists():  # ours, of another source or size, or empty
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def slice_for(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None, *, token: bool | str | None = None,
              endpoint: str | None = None) -> str:
    """The checkpoint the notebooks compare quantization schemes on: ``checkpoint`` itself if ``blocks`` is None, else a
    slice of its first ``blocks = (double, single)`` blocks (at most as many as it has), made once in fluxnb's cache
    (``slices/<tag>``; for a Hub id the tag names the repository and its commit).

    From a Hub id only the slice's tensors are downloaded (byte ranges; see the module docstring); from a folder
    they are read from it. ``token`` and ``endpoint`` are huggingface_hub's (default: the client's own).
    """
    if blocks is None:
        return str(checkpoint)
    source = _source(checkpoint, token, endpoint)
    n, m = _clamp(source.config, blocks)
    return str(_write_slice(source, slices_dir() / source.tag(n, m), n, m))


def slice_checkpoint(checkpoint: str | os.PathLike[str], folder: str | os.PathLike[str],
                     num_layers: int, num_single_layers: int) -> Path:
    """Write the first ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks of
    ``checkpoint``'s transformer (with its embedders and output layer) as a checkpoint of its own.

    The blocks keep their real shapes and weights, so every backend quantizes exactly what it would in
    the full model; only their number shrinks. Writes one tensor at a time (little RAM); from a Hub id,
    downloads only those tensors' bytes. Returns ``folder``, which has a ``transformer/`` subfolder in
    the diffusers layout; kept if already made. Built in ``<folder>.partial`` and renamed when complete.
    """
    return _write_slice(_source(checkpoint), Path(folder), num_layers, num_single_layers)


def _is_made(source: _Local | _Hub, n: int, m: int) -> bool:
    done = slices_dir() / source.tag(n, m) / TRANSFORMER / _DONE
    return done.is_file() and json.loads(done.read_text()) == source.marker(n, m)


# --- what it downloads ----------------------------------------------------------------------------


def slice_plan(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None, *, token: bool | str | None = None,
               endpoint: str | None = None) -> list[Any]:
    """What :func:`slice_for` downloads, before it does, as :class:`fluxnb.prequantized.DownloadItem` rows.

    For a slice of a Hub id: its config, the index, each weight file's header (read now to make the plan: a
    few hundred kB for FLUX.1) and the kept tensors' bytes of each file (the ranges asked for, small gaps
    joined in included); all marked ``cached`` if the slice is made already. ``blocks = None``: the whole
    transformer's files, as ``from_pretrained`` fetches them (cached where the Hugging Face cache has them).
    A folder on this machine: nothing to download (its kept tensors, marked cached).
    """
    from fluxnb.prequantized import files_plan

    if blocks is None:
        return files_plan(str(checkpoint), (TRANSFORMER,))
    source = _source(checkpoint, token, endpoint)
    return _slice_plan(source, *_clamp(source.config, blocks))


def _slice_plan(source: _Local | _Hub, n: int, m: int) -> list[Any]:
    from fluxnb.prequantized import DownloadItem

    tensors = _kept(source.shards(), n, m)
    if isinstance(source, _Local):
        return [DownloadItem(source.name(), t.file, t.nbytes, cached=True) for t in tensors]
    requests = _requests(tensors)
    made = _is_made(source, n, m)
    read = made or source.headers_on_disk  # the headers are read once, then kept; fetched now, they count
    items = [DownloadItem(source.repo_id, path, size, cached=read) for path, size in source.small_files.items()]
    for shard in source.shards():
        items.append(DownloadItem(source.repo_id, f"{shard.file} (header)", shard.header_bytes, cached=read))
        asked = sum(end - start for file, start, end in requests if file == shard.file)
        if asked:
            items.append(DownloadItem(source.repo_id, shard.file, asked, cached=made))
    return items


def slice_download_bytes(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None, **hub: Any) -> int:
    """Bytes :func:`slice_for` will download (headers and config included; 0 if the slice is made already)."""
    return sum(item.size for item in slice_plan(checkpoint, blocks, **hub) if not item.cached)


def slice_download_text(checkpoint: str | os.PathLike[str], blocks: tuple[int, int] | None, **hub: Any) -> str:
    """What :func:`slice_for` will download, in one sentence a learner reads before it does, e.g. ``"the slice:
    2.62 GB to download: 2.62 GB of FLUX.1-dev's 23.80 GB transformer (the first 2 of its 19 double-stream and 4 of
    its 38 single-stream blocks, with the embedders and the output layer), and 421.7 kB of the config, the index
    and the file headers that say where each tensor's bytes are"``. ``hub``: ``token``, ``endpoint``, as
    :func:`slice_for` takes them."""
    from fluxnb.prequantized import download_text, size_text

    if blocks is None:
        return f"the whole transformer of {checkpoint}: {download_text(slice_plan(checkpoint, None, **hub))}"
    source = _source(checkpoint, **hub)
    c = source.config
    n, m = _clamp(c, blocks)
    which = (f"the first {n} of its {c['num_layers']} double-stream and {m} of its {c['num_single_layers']} "
             "single-stream blocks, with the embedders and the output layer")
    if (n, m) == (c["num_layers"], c["num_single_layers"]):
        which = f"all its {n} double-stream and {m} single-stream blocks: the whole transformer"
    if isinstance(source, _Local):
        return f"the slice ({which}): read from {checkpoint} on this disk, nothing to download"
    plan = _slice_plan(source, n, m)
    tensors = sum(item.size for item in plan if not item.path.endswith((" (header)", ".json")))
    whole = sum(shard.size for shard in source.shards())
    of = f"{size_text(tensors)} of {source.repo_id.split('/')[-1]}'s {size_text(whole)} transformer ({which})"
    if all(item.cached for item in plan):
        return f"the slice: made already, in fluxnb's cache, nothing to download: {of}"
    total = sum(item.size for item in plan if not item.cached)
    if total == tensors:  # the headers were read before
        return f"the slice: {size_text(total)} to download: {of}"
    said = "the config, the index and the file headers" if INDEX in source.small_files else "the config and the header"
    return (f"the slice: {size_text(total)} to download: {of}, and {size_text(total - tensors)} of {said} that say "
            "where each tensor's bytes are")


# --- reading a checkpoint without its weights -----------------------------------------------------


def local_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """``checkpoint`` as a local folder: itself if it is one, else the Hub snapshot of its whole transformer,
    downloaded once into the Hugging Face cache (23.8 GB for FLUX.1-dev: its size is printed first).
    A slice needs none of this: :func:`slice_for` downloads only its own tensors."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    from fluxnb.prequantized import download_text, files_plan

    print(f"{checkpoint}'s whole transformer: {download_text(files_plan(str(checkpoint), (TRANSFORMER,)))}")
    return Path(snapshot_download(str(checkpoint), allow_patterns=[f"{TRANSFORMER}/*"]))


def transformer_config(checkpoint: str | os.PathLike[str], **hub: Any) -> Any:
    """The transformer's config of a checkpoint folder (or Hub id: its ``config.json`` alone), with attribute access
    like ``model.config``."""
    from types import SimpleNamespace

    if not is_hub_id(checkpoint):
        return SimpleNamespace(**json.loads((Path(checkpoint) / CONFIG).read_text()))
    from huggingface_hub import hf_hub_download

    return SimpleNamespace(**json.loads(Path(hf_hub_download(str(checkpoint), CONFIG, **hub)).read_text()))


def parameter_count(checkpoint: str | os.PathLike[str], **hub: Any) -> int:
    """Number of weights in the checkpoint's transformer, read from the safetensors headers (no loading; of a Hub
    id, the headers alone are downloaded, once)."""
    return sum(math.prod(t.shape) for s in _source(checkpoint, **hub).shards() for t in s.tensors)
