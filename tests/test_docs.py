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


# `dvc exp run ... -S <override>` as the docs, params.yaml and the generated keys page show it
SET_OVERRIDE = re.compile(r"dvc exp run\b[^`\n]*?-S '?([^'\s`]+)'?")
ARTIFACTS_GET = re.compile(r"dvc artifacts get\s+(\S+)\s+(\S+)\s+--rev\s+([^\s`]+)")


def example_sources():
    return [*pages(), REPO / "params.yaml"]


def test_every_dvc_exp_run_set_example_applies_to_params_yaml_and_validates(tmp_path):
    """Each `-S` override the docs show, applied by DVC's own override code to the shipped
    params.yaml (where `limits: {}` needs `+limits...`), gives params that load."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from pipeline.config import load_params

    examples = sorted({(page.name, override) for page in example_sources()
                       for override in SET_OVERRIDE.findall(page.read_text()) if override != "key=value"})
    assert ("params.yaml", "+limits.gguf-q4_k_m.max_mean_kld=0.01") in examples
    assert any(page == "recipes.md" for page, _ in examples)
    for page, override in examples:
        shutil.rmtree(tmp_path / "project", ignore_errors=True)
        shutil.copytree(REPO / "recipes", tmp_path / "project" / "recipes")
        params = shutil.copy(REPO / "params.yaml", tmp_path / "project" / "params.yaml")
        try:
            apply_overrides(params, [override])
        except Exception as error:  # DVC's own message, e.g. a key `limits: {}` lacks without `+`
            raise AssertionError(f"{page}: dvc exp run -S {override!r}: {error}") from None
        load_params(params)


def test_every_quoted_version_tag_is_one_publish_writes():
    from fnmatch import fnmatch

    from pipeline import versions

    quoted = [(page.name, *found) for page in example_sources() for found in ARTIFACTS_GET.findall(page.read_text())]
    assert quoted
    for page, _, name, rev in quoted:
        assert fnmatch(rev, versions.tag_pattern(name)) and re.fullmatch(r"\S+@v\d+\.\d+\.\d+", rev), \
            f"{page}: --rev {rev} is no version tag of {name} that `qpipe publish --gto-tag` writes"


def assert_blocks_current(script) -> None:
    """Each generated block a benchmark script writes (its BLOCKS) is what it renders now."""
    for doc, name, render in script.BLOCKS:
        assert script.doc_blocks.current(doc, script.SCRIPT, name) == render(), \
            f"{doc.name}'s {name} table is out of date: run `python benchmarks/{script.SCRIPT} --write`"


def benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def memory_table_module():
    return benchmark_module("memory_table")


def test_the_memory_tables_in_the_docs_are_what_the_results_and_the_code_give():
    memory_table = memory_table_module()
    assert_blocks_current(memory_table)


def test_the_task_tables_in_the_docs_are_what_the_committed_task_benchmarks_give():
    task_table = benchmark_module("task_table")
    assert_blocks_current(task_table)


def test_the_kv_cache_table_in_the_readme_is_what_the_committed_benchmark_gives():
    kv_cache = benchmark_module("kv_cache")
    assert_blocks_current(kv_cache)


def test_every_current_estimate_sits_above_every_committed_peak():
    memory_table = memory_table_module()
    results = memory_table.measurements()
    assert {result["parameters"] > 1e9 for result in results} == {True, False}  # a 1B+ model and a smaller one
    below = [f"{row['stage']} {row['recipe']} at {result['model']}: {estimate:.2f} < {row['peak_gb']:.2f} GB"
             for result in results for row, estimate in memory_table.estimated_rows(result)
             if estimate < row["peak_gb"]]
    assert not below, "a memory factor no longer covers a measured peak: " + "; ".join(below)



def test_the_per_tensor_search_table_in_the_readme_is_what_the_committed_benchmark_gives():
    mixed = benchmark_module("mixed")
    assert_blocks_current(mixed)


def test_the_sensitivity_cost_table_is_what_the_committed_benchmark_gives():
    assert_blocks_current(benchmark_module("sensitivity_cost"))


def test_the_limit_forms_table_is_current_and_the_recipes_ship_the_form_it_chooses():
    from pipeline.config import RelativeLimit
    from pipeline.formats import load_recipe

    limit_forms = benchmark_module("limit_forms")
    assert_blocks_current(limit_forms)
    rows = limit_forms.forms()
    assert {row["ships"] for row in rows} == {"relative", "absolute", "neither"}
    for row in rows:
        shipped = load_recipe(row["recipe"]).gates.max_mean_kld
        if row["ships"] == "relative":
            assert isinstance(shipped, RelativeLimit) and shipped.relative_to == limit_forms.ANCHOR, row["recipe"]
            # the fitted factor, rounded up by at most 5 %
            assert row["factor"] <= shipped.factor <= 1.05 * row["factor"], row["recipe"]
        else:
            assert isinstance(shipped, float), row["recipe"]
