"""README and docs/: every relative link resolves, to a file and to a heading in it, and the
README stays short."""

import re

from tests.conftest import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def pages():
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_slug_is_githubs():
    assert slug(" `format: gguf`") == "format-gguf"
    assert slug(" Limits for your model") == "limits-for-your-model"


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.is_file() and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_readme_is_at_most_200_lines_and_every_format_has_a_page():
    from pipeline import formats

    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    for name in formats.FORMATS:
        assert (REPO / "docs" / "formats" / f"{name}.md").is_file(), name


def test_docstrings_point_to_pages_that_exist():
    cited = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        cited |= set(re.findall(r"docs/[\w/\-]+\.md", path.read_text()))
    assert cited and all((REPO / page).is_file() for page in cited), sorted(cited)
    assert not any("DESIGN.md" in path.read_text() for path in (REPO / "pipeline").rglob("*.py"))
