"""Writing outputs so that nothing half-written is ever left under artifacts/."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def tree_files(root: Path, exclude: frozenset[str] = frozenset()) -> list[Path]:
    """Every file below root, sorted, less those whose path relative to root is in `exclude`."""
    return [path for path in sorted(root.rglob("*"))
            if path.is_file() and str(path.relative_to(root)) not in exclude]


def sha256_tree(root: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file below root (less `exclude`), keyed by its path relative to root."""
    return {str(path.relative_to(root)): sha256_file(path) for path in tree_files(root, exclude)}


def sha256sum_lines(hashes: dict[str, str]) -> str:
    """`<sha256>  <path>` lines, as `sha256sum` prints them (and `sha256sum -c` reads them)."""
    return "".join(f"{digest}  {name}\n" for name, digest in hashes.items())


def sha256_artifact(path: Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 of a file; for a directory, sha256 of its manifest (sha256sum lines of every file,
    sorted by path, less `exclude`)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return hashlib.sha256(sha256sum_lines(sha256_tree(path, exclude)).encode()).hexdigest()


def artifact_bytes(path: Path, exclude: frozenset[str] = frozenset()) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else tree_bytes(path, exclude)


def tree_bytes(root: Path, exclude: frozenset[str] = frozenset()) -> int:
    return sum(path.stat().st_size for path in tree_files(root, exclude))


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove the staging directories of `final` that a killed run left (its process is gone),
    saying so in one line each; a live run's staging directory is left alone."""
    removed = []
    for stale in sorted(Path(final).parent.glob(f".{Path(final).name}.partial-*")):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        sys.stderr.write(f"removed {stale}, left by an interrupted run (process {pid})\n")
        removed.append(stale)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def verify_artifact(build_dir: Path, build: dict[str, Any]) -> Path:
    """The artifact a build.json describes, checked against that record before anything uses
    it: the size first (cheap: catches truncation), then the sha256. Exit 2 naming the file."""
    from pipeline.errors import BadInput

    recorded = build["artifact"]
    path = Path(build_dir) / recorded["file"]
    fix = f"rebuild it: `dvc repro build@{build['recipe']}` (or `qpipe build {build['recipe']}`)"
    if not path.exists():
        raise BadInput(f"the artifact that {Path(build_dir) / 'build.json'} records is missing", where=str(path),
                       fix=fix)
    # an artifact that is the build directory itself was measured before build.json was written into it
    exclude = frozenset({"build.json"}) if path.resolve() == Path(build_dir).resolve() else frozenset()
    size = artifact_bytes(path, exclude)
    if size != recorded["bytes"]:
        raise BadInput(f"the artifact is {size} bytes and build.json records {recorded['bytes']}: "
                       "it changed (or was cut short) after it was built", where=str(path), fix=fix)
    if sha256_artifact(path, exclude) != recorded["sha256"]:
        raise BadInput("the artifact's sha256 differs from the one build.json records: it was replaced "
                       "or edited after it was built", where=str(path), fix=fix)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only on success.

    A crash or an exception leaves `final` as it was (or absent) and removes the
    temporary directory, so a later run never finds a half-written artifact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    remove_stale_staging(final)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    staging.replace(path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_text(text)
    staging.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_table(directory: Path, read_in_full=lambda name: False) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bytes) of every tensor in a directory's safetensors files, from their
    headers; a tensor for which `read_in_full(name)` is true is read, and its values replace
    the shape (compressed-tensors stores a packed weight's logical shape as a tensor)."""
    import math

    from safetensors import safe_open

    table = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                shape = tuple(view.get_shape())
                size = SAFETENSORS_DTYPE_BYTES[view.get_dtype()] * math.prod(shape)
                if read_in_full(name):
                    shape = tuple(int(v) for v in handle.get_tensor(name).tolist())
                table.append((name, shape, size))
    return table
