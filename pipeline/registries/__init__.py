"""Registries qpipe publishes to, one module each: directory.py, oci.py, hub.py.

This package owns the contract between ``publish`` and the registries: the ``Release`` a
registry receives, the ``Registry`` operations it implements, and the SHA256SUMS format both
sides read. ``publish`` imports from here; a registry never imports ``publish``. How
publishing works end to end: docs/publishing.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.errors import QpipeError

SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class Release:
    """One artifact as it will be published."""

    model: str    # the source model's name, e.g. SmolLM2-135M-Instruct
    recipe: str
    version: str  # "sha256-" + the first 12 hex digits of the artifact's sha256
    format: str
    folder: Path  # the staged files


class Registry(Protocol):
    def has(self, release: Release, sums: dict[str, str]) -> bool:
        """The same version with the same SHA256SUMS is already there."""

    def push(self, release: Release) -> str:
        """Publish every file of the release, all or nothing; return where it went."""

    def verify(self, release: Release, sums: dict[str, str]) -> None:
        """Read the published files back and check them against SHA256SUMS."""

    def location(self, release: Release) -> str:
        """Where the release is (or would be) published."""


def read_sums(text: str) -> dict[str, str]:
    """`sha256sum` lines -> {file name: sha256}."""
    return {name: digest for digest, name in (line.split("  ", 1) for line in text.splitlines() if line)}


def verify_files(files: dict[str, Path], sums: dict[str, str], where: str) -> None:
    """Every file named in SHA256SUMS is present with that sha256."""
    from pipeline.files import sha256_file

    missing = sorted(set(sums) - set(files))
    wrong = sorted(name for name in sums if name in files and sha256_file(files[name]) != sums[name])
    if missing or wrong:
        raise QpipeError(f"published files do not match SHA256SUMS: missing {missing}, different {wrong}",
                         where=where, fix="publish again; the registry holds a damaged copy")


def env_secret(name: str) -> str | None:
    """A credential from the environment (CI secrets), None when unset or empty."""
    value = os.environ.get(name)
    return value or None
