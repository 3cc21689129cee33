"""GTO versions of published artifacts (`qpipe publish --gto-tag`, docs/publishing.md).

A registry version is the artifact's sha256 (``sha256-<12 hex>``); a team also wants a version
it can read and order. For each release, GTO registers the next patch version of the recipe
at HEAD: an annotated git tag ``RECIPE@vX.Y.Z`` (GTO's convention; the first is v0.0.1) whose
message names the registry version and where it went. A release whose registry version some
tag already names gets no new version, so rerunning publish on an unchanged artifact, or on a
later commit that rebuilt it byte-identically, tags nothing. `gto show` lists the versions and
`dvc artifacts get . RECIPE --rev RECIPE@vX.Y.Z` fetches one.
"""

from __future__ import annotations

import subprocess
from typing import Any


def tag_pattern(recipe: str) -> str:
    """The version tags of `recipe` that GTO writes and this module reads (a git ref glob)."""
    return f"{recipe}@v*"


def tagged(recipe: str) -> dict[str, str]:
    """Each existing tag of `recipe` -> its message."""
    listed = subprocess.run(["git", "for-each-ref", f"refs/tags/{tag_pattern(recipe)}",
                             "--format=%(refname:short)%00%(contents)%00"],
                            capture_output=True, text=True, check=True).stdout
    fields = listed.split("\0")
    return {name.strip(): message for name, message in zip(fields[0::2], fields[1::2]) if name.strip()}


def register(published: list[dict[str, Any]], log=print) -> list[str]:
    """Tag each release's registry version that no tag names yet; return the new tags."""
    import gto.api

    created = []
    for release in published:
        existing = tagged(release["recipe"])
        named = [tag for tag, message in existing.items() if release["version"] in message]
        if named:
            log(f"{release['recipe']} {release['version']}: already versioned as {named[0]}")
            continue
        gto.api.register(repo=".", name=release["recipe"], ref="HEAD", bump_patch=bool(existing),
                         message=f"qpipe publish: {release['version']} at {release['location']}")
        tag = max(tagged(release["recipe"]), key=_semver)
        log(f"{release['recipe']} {release['version']}: registered {tag} (push it with `git push origin {tag}`)")
        created.append(tag)
    return created


def _semver(tag: str) -> tuple[int, ...]:
    import re

    return tuple(int(part) for part in re.findall(r"\d+", tag.rsplit("@v", 1)[1])[:3])
