"""Fixtures shared by the unit tests: a stand-in for the Hugging Face Hub on localhost."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

GOOD_TOKEN, NO_LICENCE_TOKEN, BAD_TOKEN = "hf_fake_good", "hf_fake_no_licence", "hf_fake_revoked"
GATED = "black-forest-labs/FLUX.1-dev"


class _Hub(BaseHTTPRequestHandler):
    """Answers ``/api/models/<repo>/auth-check`` as the Hub does (status and ``X-Error-Code``)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        repo = self.path.removeprefix("/api/models/").removesuffix("/auth-check")
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if token == BAD_TOKEN:
            status, headers = 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
        elif not self.path.endswith("/auth-check") or repo.endswith("does-not-exist"):
            status, headers = 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        elif repo == GATED and token != GOOD_TOKEN:
            status, headers = 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"}
        else:
            status, headers = 200, {}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub API on localhost, online mode on: yields its URL. Nothing leaves the machine."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield url
    server.shutdown()
    server.server_close()
