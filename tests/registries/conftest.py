"""A real OCI registry on loopback: Debian's `docker-registry` (CNCF distribution 2.8),
started with its own config on a free port, with or without htpasswd authentication."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARY = "docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_registry(root: Path, htpasswd: Path | None = None):
    import requests

    if shutil.which(BINARY) is None:
        pytest.fail(f"{BINARY} is not installed: `apt-get install docker-registry` (`make test` does)")
    port = free_port()
    auth = (f"auth:\n  htpasswd:\n    realm: qpipe-test\n    path: {htpasswd}\n" if htpasswd else "")
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}")
    process = subprocess.Popen([BINARY, "serve", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(root / "registry.log", "w"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return process, f"127.0.0.1:{port}"
        except requests.exceptions.ConnectionError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    pytest.fail(f"the registry did not start: {(root / 'registry.log').read_text()[-2000:]}")


@pytest.fixture
def oci_registry(tmp_path):
    process, address = start_registry(tmp_path)
    yield address
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def oci_registry_with_auth(tmp_path):
    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"pusher:{bcrypt.hashpw(b'right-password', bcrypt.gensalt(rounds=4)).decode()}\n")
    process, address = start_registry(tmp_path, htpasswd)
    yield address
    process.terminate()
    process.wait(timeout=10)
