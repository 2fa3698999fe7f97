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


# --- runtimes: this process as a Kaggle or a Colab notebook sees it ------------------------------------


class _KaggleSecretsModule:
    """A stand-in for Kaggle's ``kaggle_secrets`` (Kaggle/docker-python, ``patches/kaggle_secrets.py``), as
    its client behaves: ``UserSecretsClient()`` raises ``CredentialError`` without the variable
    ``KAGGLE_USER_SECRETS_TOKEN`` (a session with no access to secrets); ``get_secret(label)`` raises
    ``BackendError`` when no secret of that label is attached to the notebook (the service answers
    ``wasSuccessful: false``), and ``ConnectionError`` when Internet is off."""

    class CredentialError(Exception):
        pass

    class BackendError(Exception):
        pass

    class ValidationError(Exception):
        pass

    def __init__(self):
        self.__name__ = "kaggle_secrets"
        self.secrets: dict[str, str] = {}  # label -> value of the secrets attached to this notebook
        self.asked: list[str] = []
        self.online = True
        module = self

        class UserSecretsClient:
            def __init__(self):
                import os

                if os.getenv("KAGGLE_USER_SECRETS_TOKEN") is None:
                    raise module.CredentialError("A JWT Token is required to use the UserSecretsClient, but none "
                                                 "found in environment variable KAGGLE_USER_SECRETS_TOKEN")

            def get_secret(self, label):
                module.asked.append(label)
                if not module.online:
                    raise ConnectionError("Timeout error trying to communicate with service. Please ensure internet is on.")
                if label not in module.secrets:
                    raise module.BackendError("Unexpected response from the service. Response: {'wasSuccessful': False}.")
                return module.secrets[label]

        self.UserSecretsClient = UserSecretsClient


def unset(monkeypatch, *names: str) -> None:
    """Unset environment variables for one test, and undo whatever the code under test sets them to:
    ``monkeypatch.delenv`` of a variable that is not set records nothing, so it would not undo that."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    """This process as a Kaggle notebook: ``KAGGLE_KERNEL_RUN_TYPE`` set (no Colab), ``tmp_path/kaggle/working``
    as ``/kaggle/working``, and the stand-in ``kaggle_secrets`` above with no secret attached yet (add
    some to ``.secrets``). No ``HF_TOKEN`` and no earlier login, so a token can only come from a secret."""
    import sys

    from fluxnb import environment

    unset(monkeypatch, "COLAB_RELEASE_TAG", "HF_TOKEN")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", "a-session-jwt")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    working = tmp_path / "kaggle" / "working"
    working.mkdir(parents=True)
    monkeypatch.setattr(environment, "KAGGLE_WORKING", working)
    monkeypatch.setattr(environment, "_token_from_secret", None)  # no token put in HF_TOKEN by an earlier test
    secrets = _KaggleSecretsModule()
    secrets.working = working
    monkeypatch.setitem(sys.modules, "kaggle_secrets", secrets)
    return secrets
