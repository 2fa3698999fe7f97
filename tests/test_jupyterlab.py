"""README step 4: JupyterLab, as installed by requirements.txt, starts and serves the course's notebooks."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_opens_the_course(tmp_path):
    port, token = _free_port(), "fluxnb-test"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"JUPYTER_RUNTIME_DIR": str(tmp_path),
                                                                   "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, listing = time.time() + 60, None
        while time.time() < deadline and listing is None:
            try:
                with urllib.request.urlopen(f"{base}/api/contents/notebooks?token={token}", timeout=5) as r:
                    listing = json.load(r)
            except OSError:
                time.sleep(0.5)
        assert listing is not None, "JupyterLab did not answer within 60 s"
        names = {item["name"] for item in listing["content"]}
        assert {"00_setup.ipynb", "04_memory_profiling.ipynb"} <= names
        with urllib.request.urlopen(f"{base}/lab/tree/notebooks/00_setup.ipynb?token={token}", timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
    finally:
        server.terminate()
        server.wait(timeout=30)
