"""A throw-away copy of this qpipe project, for benchmarks that run its stages on another
model or other params without touching the real workspace's artifacts or dvc.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    result = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
    return result.stdout.split()


def create(params_changes: dict, root: Path | None = None) -> Path:
    """Copy the tracked files (not artifacts/ outputs, not tests/) to `root` (a new temporary
    directory by default), apply `params_changes` to params.yaml (top-level sections are
    merged key by key), and make it a git + DVC repository of its own."""
    root = Path(root or tempfile.mkdtemp(prefix="qpipe-bench-"))
    for name in tracked_files():
        if name.startswith(("tests/", "artifacts/gates/", "artifacts/runs/")) or name == "dvc.lock":
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in params_changes.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key].update(value)
        else:
            params[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-C", str(root), "-c", "user.name=qpipe-bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "benchmark project"], check=True)
    return root


def env() -> dict[str, str]:
    """This interpreter's qpipe, dvc and llama.cpp tools first on PATH."""
    environment = dict(os.environ)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment
