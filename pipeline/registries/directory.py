"""A plain directory registry: <root>/<model>/<recipe>/<version>/ plus <root>/index.json.

A version is copied into a hidden sibling and renamed into place when complete, so an
interrupted publish leaves no version; index.json is rewritten atomically after the rename.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import BadInput
from pipeline.registries import SUMS_FILE, read_sums, verify_files

INDEX = "index.json"


class DirectoryRegistry:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def __str__(self) -> str:
        return f"dir://{self.root}"

    def location(self, release) -> str:
        return str(self.root / release.model / release.recipe / release.version)

    def has(self, release, sums: dict[str, str]) -> bool:
        published = Path(self.location(release)) / SUMS_FILE
        return published.is_file() and read_sums(published.read_text()) == sums

    def push(self, release) -> str:
        final = Path(self.location(release))
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot write to the registry directory ({exc.strerror})", where=str(self),
                           fix="use a directory you can write to") from None
        staging = final.parent / f".{final.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(release.folder, staging)
            if final.exists():  # a damaged copy of this version (has() said it differs)
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._index(release)
        return str(final)

    def verify(self, release, sums: dict[str, str]) -> None:
        folder = Path(self.location(release))
        files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
        verify_files(files, sums, where=str(folder))

    def _index(self, release) -> None:
        from pipeline.files import read_json, write_json

        path = self.root / INDEX
        index = read_json(path) if path.is_file() else {"versions": []}
        entry = {"model": release.model, "recipe": release.recipe, "version": release.version,
                 "format": release.format, "path": f"{release.model}/{release.recipe}/{release.version}",
                 "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        index["versions"] = [v for v in index["versions"]
                             if (v["model"], v["recipe"], v["version"]) != (release.model, release.recipe, release.version)]
        index["versions"].append(entry)
        write_json(path, index)
