"""The stand-ins served the way the Hugging Face Hub serves a model: under the real repository id.

With ``FLUXNB_CHECKPOINT=tiny`` (or ``random-dev``/``-schnell``/``-klein``), a notebook still names
``black-forest-labs/FLUX.1-dev`` and loads it with ``from_pretrained``: :func:`serve` starts, once per
process, a small HTTP server on ``127.0.0.1`` that answers the part of the Hub's API that
huggingface_hub's unchanged client uses to download a model, and points the client at it through the
Hub's own switch, ``HF_ENDPOINT``. (:mod:`fluxnb.switch` says which repositories it holds.) So a rehearsal runs the learner's path: ``model_info``, the file
tree, ``HEAD`` for each file's commit, ETag and size, the download into a Hugging Face cache, byte
ranges for a safetensors header (``get_safetensors_metadata``), and a gated repository that refuses a
request without a token (``GatedRepoError``) or with a revoked one.

What it answers, as the Hub does (huggingface_hub 1.x's ``file_download``, ``hf_api`` and
``utils._http`` read these):

* ``GET /api/models/{repo}[/revision/{rev}]``: the model's info (``sha``, ``siblings``, ``gated``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file list (``oid``, ``size``, ``lfs`` for weights);
* ``GET /api/models/{repo}/auth-check``: 200, or the gated answer;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` and
  ``X-Linked-Size`` for large files), ``Accept-Ranges``, and ``Range`` requests (206);
* errors with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``, ``RevisionNotFound``,
  ``GatedRepo``) and ``X-Error-Message``, which huggingface_hub turns into its own exceptions.

It serves stand-ins only, never anything else: an id it does not hold is ``RepoNotFound``, as on the
Hub, so nothing reaches the internet. The client downloads into a Hugging Face cache of the stand-ins'
own (``FLUXNB_HUB_CACHE``, default ``~/.cache/fluxnb/hub-tiny``), never the learner's: a random FLUX.1-dev
must never be mistaken for the real one. The token is a stand-in's too (:data:`STAND_IN_TOKEN`).

Every byte a response body carries is counted (:meth:`StandInHub.bytes_sent`); with
``FLUXNB_HUB_LOG`` set, each finished transfer is appended there as one JSON line, which is how the
course runner measures what each notebook downloads.

Why not an existing server: olah (the self-hosted Hub mirror on PyPI, ``python -m olah.server``) is a
mirror of an upstream Hub that caches what it proxies, in blocks; a repository of its own must be a git
repository under its ``mirrors-path`` (read with GitPython), and its offline mode serves only what its
cache holds. The stand-ins are folders fluxnb builds (34 GB of random weights for ``random-dev``), which
would have to be committed to git or written in olah's cache format first, and olah runs as a server
process of its own, which a learner on Binder or a workshop laptop would have to start by hand. The
server here is the part of the Hub's answers the client reads, in the standard library, started inside
the kernel by the parameters cell.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is first
imported, so :func:`serve` must run before that: the notebooks' parameters cell calls
:func:`fluxnb.resolve_checkpoint` before anything imports diffusers or transformers. Called later, it
says so (:class:`HubTooLateError`) instead of downloading from the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fluxnb.exceptions import FluxnbError

LOG_VAR = "FLUXNB_HUB_LOG"  # a file: one JSON line per finished transfer (the course runner sets it)
CACHE_VAR = "FLUXNB_HUB_CACHE"  # the stand-ins' own Hugging Face cache
STAND_IN_TOKEN = "hf_fluxnb_stand_in_token"
"""The token the stand-in Hub accepts for its gated repositories; :func:`serve` sets ``HF_TOKEN`` to it,
so a learner's real token is never sent anywhere in a rehearsal."""
KINDS = ("tiny", "random")
LFS_SUFFIXES = (".safetensors", ".gguf", ".model")
"""Files of the stand-ins that the Hub stores in LFS (its default ``.gitattributes`` lists these among others):
answered with ``X-Linked-Etag``/``-Size``. The stand-ins hold no other binary formats."""
_HASHED_BYTES = 64 * 2**20  # files up to this size get their content's hash as ETag (see _etag)
_CHUNK = 2**20


class HubTooLateError(FluxnbError, RuntimeError):
    """The stand-in Hub was asked for after huggingface_hub had been imported with another endpoint."""


@dataclass
class Repository:
    """One repository the stand-in Hub serves: its id, where its files are (built on first use), gated or not."""

    repo_id: str
    build: Callable[[], Path]  # returns the folder that holds the files, building it the first time
    gated: bool = False
    _folder: Path | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _files: dict[str, tuple[Path, int]] | None = field(default=None, repr=False)
    _sha: str | None = field(default=None, repr=False)
    _etags: dict[str, str] = field(default_factory=dict, repr=False)

    def folder(self) -> Path:
        """The folder of files, built (once) on first use."""
        with self._lock:
            if self._folder is None:
                self._folder = Path(self.build())
            return self._folder

    def files(self) -> dict[str, tuple[Path, int]]:
        """Every file of the repository by its path in the repository (``transformer/config.json``): file, size.
        fluxnb's own markers (``fluxnb_*.json``) are not part of it."""
        if self._files is None:
            root = self.folder()
            found = {}
            for file in sorted(root.rglob("*")):
                relative = file.relative_to(root).as_posix()
                if file.is_file() and not file.name.startswith("fluxnb_") and ".partial" not in relative:
                    found[relative] = (file, file.stat().st_size)
            self._files = found
        return self._files

    def sha(self) -> str:
        """The repository's commit: a hash of its file list and sizes (40 hex digits, as the Hub's commits)."""
        if self._sha is None:
            listing = "\n".join(f"{path} {size}" for path, (_, size) in self.files().items())
            self._sha = hashlib.sha1(f"{self.repo_id}\n{listing}".encode()).hexdigest()
        return self._sha

    def etag(self, path: str) -> str:
        """A file's ETag: the git blob hash of a small file, the sha256 of a large one (as the Hub's).

        Files over 64 MiB get the sha256 of their path, size and the commit instead of their content's:
        hashing the random stand-ins' 34 GB would take minutes, and huggingface_hub uses an ETag as the
        cached blob's name without hashing the blob again.
        """
        if path not in self._etags:
            file, size = self.files()[path]
            if not is_lfs(path):
                data = file.read_bytes()
                self._etags[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            elif size <= _HASHED_BYTES:
                self._etags[path] = hashlib.sha256(file.read_bytes()).hexdigest()
            else:
                self._etags[path] = hashlib.sha256(f"{self.sha()} {path} {size}".encode()).hexdigest()
        return self._etags[path]


def is_lfs(path: str) -> bool:
    """Whether the Hub keeps this file in LFS (weights and other large binaries)."""
    return path.lower().endswith(LFS_SUFFIXES)


class StandInHub:
    """An HTTP server on 127.0.0.1 that answers as the Hub does for the repositories it holds.

    ``tokens``: the tokens that may read a gated repository (the licence accepted); ``revoked``: tokens
    refused as invalid, for any repository. Start it with :meth:`start`; :attr:`url` is its endpoint.
    """

    def __init__(self, repositories: list[Repository], tokens: tuple[str, ...] = (STAND_IN_TOKEN,),
                 revoked: tuple[str, ...] = (), log: str | os.PathLike[str] | None = None) -> None:
        self.repositories = {repo.repo_id: repo for repo in repositories}
        self.tokens = set(tokens)
        self.revoked = set(revoked)
        self.log = Path(log) if log else None
        self.transfers: list[dict[str, Any]] = []  # one per response body sent: repo, path, bytes
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The endpoint, e.g. ``http://127.0.0.1:41234``: what ``HF_ENDPOINT`` is set to."""
        if self._server is None:
            raise RuntimeError("the stand-in Hub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StandInHub:
        """Listen on a free port of 127.0.0.1, in a daemon thread (it ends with the process)."""
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fluxnb-stand-in-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening (tests; in a notebook it lives as long as the kernel)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bytes_sent(self, repo_id: str | None = None) -> int:
        """Bytes of response bodies sent so far (of one repository, or all): what the client downloaded."""
        with self._lock:
            return sum(t["bytes"] for t in self.transfers if repo_id is None or t["repo"] == repo_id)

    def record(self, repo_id: str, path: str, sent: int, ranged: bool) -> None:
        """Count one finished transfer, and append it to the log file if there is one."""
        entry = {"repo": repo_id, "path": path, "bytes": sent, "range": ranged, "time": round(time.time(), 3)}
        with self._lock:
            self.transfers.append(entry)
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(json.dumps(entry) + "\n")


class _Handler(BaseHTTPRequestHandler):
    """One request to the stand-in Hub. Routes by the Hub's URL forms (see the module docstring)."""

    hub: StandInHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the Hub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # a notebook's output is the learner's: no access log there

    # --- answers --------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _token(self) -> str | None:
        value = self.headers.get("Authorization") or ""
        return value.removeprefix("Bearer ").strip() or None

    def _revoked(self) -> bool:
        """Answer a revoked token as the Hub does, for any repository and any request."""
        if self._token() in self.hub.revoked:
            self._error(401, None, "Invalid credentials in Authorization header")
            return True
        return False

    def _refused(self, repo: Repository) -> bool:
        """Answer a revoked token, or a gated repository without an accepted token, as the Hub does."""
        if self._revoked():
            return True
        token = self._token()
        if repo.gated and token not in self.hub.tokens:
            if token is None:
                self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                            "authorized list. Visit its page to ask for access.")
            return True
        return False

    def _repository(self, repo_id: str) -> Repository | None:
        repo = self.hub.repositories.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _revision(self, repo: Repository, revision: str) -> bool:
        if revision in ("main", repo.sha()):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # --- routes ---------------------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        try:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/auth-check", path):
                self._auth_check(m[1])
            elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                self._tree(m[1], m[2], (m[3] or "").strip("/"), query.get("recursive", ["false"])[0].lower() == "true")
            elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path):
                self._model_info(m[1], m[2] or "main")
            elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                self._resolve(m[1], m[2], m[3])
            else:
                self._error(404, None, f"The stand-in Hub does not answer {parts.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (an interrupted download): nothing to answer

    def _auth_check(self, repo_id: str) -> None:
        repo = self._repository(repo_id)
        if repo is not None and not self._refused(repo):
            self._json({})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repository(repo_id)
        if repo is None or not self._revision(repo, revision):
            return
        if self._revoked():  # the card of a gated repository is public; a revoked token is refused everywhere
            return
        siblings = [{"rfilename": path, "size": size, "blobId": repo.etag(path) if not is_lfs(path) else None,
                     **({"lfs": {"sha256": repo.etag(path), "size": size, "pointerSize": 134}} if is_lfs(path) else {})}
                    for path, (_, size) in repo.files().items()]
        self._json({"_id": repo.sha()[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                    "sha": repo.sha(), "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                    "downloads": 0, "likes": 0, "library_name": "diffusers", "tags": ["fluxnb-stand-in"],
                    "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z"})

    def _tree(self, repo_id: str, revision: str, under: str, recursive: bool) -> None:
        repo = self._repository(repo_id)
        if repo is None or not self._revision(repo, revision):
            return
        entries, folders = [], set()
        prefix = f"{under}/" if under else ""
        for path, (_, size) in repo.files().items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                pieces = rest.split("/")[:-1]
                folders.update(prefix + "/".join(pieces[:i + 1]) for i in range(len(pieces)))
            entry: dict[str, Any] = {"type": "file", "oid": repo.etag(path) if not is_lfs(path) else
                                     hashlib.sha1(path.encode()).hexdigest(), "size": size, "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": repo.etag(path), "size": size, "pointerSize": 134}
            entries.append(entry)
        if under and not entries and not folders:
            self._error(404, "EntryNotFound", f"{under} does not exist on main")
            return
        dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(folders)]
        self._json(dirs + entries)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repository(repo_id)
        if repo is None or self._refused(repo) or not self._revision(repo, revision):
            return
        commit = {"X-Repo-Commit": repo.sha()}
        if path not in repo.files():
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", commit)
            return
        file, size = repo.files()[path]
        etag = repo.etag(path)
        headers = {**commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if is_lfs(path):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        if (asked := self.headers.get("Range")) and size:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", asked.strip())
            if m is None or (m[1] == "" and m[2] == ""):
                self._error(416, None, f"Unsupported Range: {asked}", {"Content-Range": f"bytes */{size}"})
                return
            if m[1] == "":  # the last N bytes
                start, end = max(size - int(m[2]), 0), size - 1
            else:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            if start > end or start >= size:
                self._error(416, None, f"Range not satisfiable: {asked}", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = 0
        try:
            with open(file, "rb") as f:
                f.seek(start)
                while sent < length:
                    chunk = f.read(min(_CHUNK, length - sent))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
        finally:
            self.hub.record(repo_id, path, sent, status == 206)


# --- the one Hub of this process ----------------------------------------------------------------

_SERVING: dict[str, Any] = {}  # kind, hub: the stand-in Hub this process started (at most one)


def serving() -> str | None:
    """``"tiny"`` or ``"random"`` if this process serves stand-ins (:func:`serve` ran), else None."""
    return _SERVING.get("kind")


def current() -> StandInHub | None:
    """The stand-in Hub of this process, if :func:`serve` started one."""
    return _SERVING.get("hub")


def serve(kind: str, repositories: Callable[[], list[Repository]], cache: str | os.PathLike[str]) -> StandInHub:
    """Serve ``kind``'s stand-ins (``repositories()``, asked for once) under their real repository ids, once per
    process, and point huggingface_hub at them: ``HF_ENDPOINT`` (this server), ``HF_HUB_CACHE`` (the stand-ins'
    own cache: ``$FLUXNB_HUB_CACHE``, else ``cache``), ``HF_TOKEN`` (:data:`STAND_IN_TOKEN`) and
    ``HF_HUB_OFFLINE=0`` (the server is on this machine: nothing is downloaded from the internet). Returns the
    running server. :func:`fluxnb.switch.resolve_checkpoint` calls it, with fluxnb's stand-ins.

    Must run before huggingface_hub is imported (it reads these once, at import). If it was imported
    already, raises :class:`HubTooLateError`, which says to restart the kernel. A second call with the
    same kind returns the same server; with the other kind it is refused too.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'tiny' or 'random', not {kind!r}")
    if _SERVING:
        if _SERVING["kind"] != kind:
            raise HubTooLateError(f"This process serves the {_SERVING['kind']} stand-ins already, not {kind}: "
                                  "restart the kernel (Kernel -> Restart) to switch FLUXNB_CHECKPOINT.")
        return _SERVING["hub"]
    if "huggingface_hub" in sys.modules:
        raise HubTooLateError(
            f"FLUXNB_CHECKPOINT={kind} came after huggingface_hub was imported (by diffusers or transformers), "
            "which reads its Hub address once, at import: restart the kernel (Kernel -> Restart) and run the "
            "notebook from the top, where the parameters cell sets FLUXNB_CHECKPOINT before anything loads.")
    hub = StandInHub(repositories(), log=os.environ.get(LOG_VAR) or None).start()
    os.environ["HF_ENDPOINT"] = hub.url
    os.environ["HF_HUB_CACHE"] = str(Path(os.environ.get(CACHE_VAR) or cache).expanduser())
    os.environ["HF_TOKEN"] = STAND_IN_TOKEN
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.pop("TRANSFORMERS_OFFLINE", None)
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    _SERVING.update(kind=kind, hub=hub)
    return hub


def served_repository(repo_id: str) -> Repository | None:
    """The stand-in this process serves under ``repo_id``, if any."""
    hub = current()
    return None if hub is None else hub.repositories.get(str(repo_id).strip("/"))


def stand_in_gb(repo_id: str) -> float:
    """GB (10^9 bytes) of all the files the stand-in Hub holds under ``repo_id`` (0 if it holds none)."""
    repository = served_repository(repo_id)
    return 0.0 if repository is None else sum(size for _, size in repository.files().values()) / 1e9
