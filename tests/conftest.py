"""Shared fixtures. tests/data is for small fixtures the tests make themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if (REPO / line).is_file()]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the repository's source files (no artifacts), as the working directory."""
    root = tmp_path / "project"
    for name in tracked_files():
        if name.startswith("tests/"):
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    monkeypatch.chdir(root)
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def qpipe_env() -> dict[str, str]:
    """Environment for running the qpipe and dvc executables of this interpreter."""
    import sys

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
