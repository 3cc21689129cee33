"""Where a recipe is listed beside its own file, and `qpipe add-recipe`, which lists one there.

A recipe is recipes/NAME.yaml. Three more files name it: params.yaml `recipes:` (what `dvc
repro` builds and gates), dvc.yaml `artifacts:` (its entry for `dvc artifacts get` and GTO:
DVC's `artifacts` section takes no `foreach`, so each recipe has its own) and the CI workflows
`qpipe ci init` wrote, if any (their job matrix). ``add`` lists a recipe in all of them at once,
editing params.yaml and dvc.yaml as text so that every other line and comment stays as it was;
``artifact_problems`` says where dvc.yaml's entries and params.yaml's recipes are out of step
(`qpipe ci init --check` runs it beside its own check of the workflow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline import layout
from pipeline.ci import DVC_FILE
from pipeline.config import PARAMS_FILE, RECIPES_DIR
from pipeline.errors import BadInput

ARTIFACTS_KEY = "artifacts"
RECIPES_KEY = "recipes"
# a GTO artifact name (gto.constants.name) without its `/`, since the name is a file's too
NAME_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?")


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise BadInput(f"{name!r} cannot name a recipe: it is a file name, a DVC stage item and a GTO artifact name",
                       where="qpipe add-recipe NAME",
                       fix="use letters, digits, '-' and '_', starting and ending with a letter or digit")


def artifact_entry(name: str, recipe) -> dict[str, Any]:
    """Recipe `name`'s dvc.yaml `artifacts:` entry as `add` writes it: its build directory, its
    description and its format's tags as labels (edit them freely; only path and type are checked)."""
    from pipeline import formats

    entry: dict[str, Any] = {"path": str(layout.build_dir(name)), "type": "model"}
    if recipe.description:
        entry["desc"] = recipe.description
    entry["labels"] = list(dict.fromkeys([recipe.format, *formats.module(recipe.format).INFO.tags]))
    return entry


def artifact_problems(recipes: list[str], dvc_file: Path = DVC_FILE) -> list[str]:
    """Where dvc.yaml `artifacts:` and params.yaml's recipes differ: a recipe without its entry,
    an entry that is not a model at the recipe's build directory, a build directory's entry for
    a recipe params.yaml does not list. Empty: they agree."""
    import yaml

    artifacts = yaml.safe_load(Path(dvc_file).read_text()).get(ARTIFACTS_KEY) or {}
    problems = []
    for name in recipes:
        entry = artifacts.get(name)
        path = str(layout.build_dir(name))
        if entry is None:
            problems.append(f"{dvc_file} `{ARTIFACTS_KEY}:` lacks {name}")
        elif entry.get("path") != path or entry.get("type") != "model" or not entry.get("labels"):
            problems.append(f"{dvc_file} {ARTIFACTS_KEY}.{name} is not `path: {path}`, "
                            "`type: model` with labels")
    builds = f"{layout.BUILDS_DIR}/"
    unlisted = [name for name, entry in artifacts.items()
                if name not in recipes and str((entry or {}).get("path", "")).startswith(builds)]
    if unlisted:
        problems.append(f"{dvc_file} `{ARTIFACTS_KEY}:` lists {', '.join(unlisted)} that params.yaml does not")
    return problems


def add(name: str, copy_of: str | None = None, description: str | None = None) -> list[Path]:
    """List recipe `name` wherever it is not yet: params.yaml, dvc.yaml and the CI workflows
    `qpipe ci init` wrote. With `copy_of`, recipes/NAME.yaml is first written as a copy of that
    recipe's file with `description`. Everything is checked before anything is written; returns
    the files written."""
    import yaml

    from pipeline import ci, formats
    from pipeline.config import Params, load_params, read_text, refuse_relative_cycle, validate
    from pipeline.files import write_text

    check_name(name)
    recipe_file = Path(RECIPES_DIR) / f"{name}.yaml"
    writes: dict[Path, str] = {}
    if copy_of is None:
        if description is not None:
            raise BadInput("--description goes with --from", where="qpipe add-recipe --description",
                           fix=f"write the description into {recipe_file}")
        recipe = formats.load_recipe(name)
    else:
        if recipe_file.exists():
            raise BadInput(f"{recipe_file} exists", where=str(recipe_file),
                           fix=f"choose another name, or `qpipe add-recipe {name}` without --from lists that file")
        if not description:
            raise BadInput("a copy needs its own description", where="qpipe add-recipe --from",
                           fix='add --description "what this choice is" (the report, the model card and dvc.yaml '
                               "show it)")
        source = formats.load_recipe(copy_of)
        text = with_description(read_text(source._path), description, source._path)
        recipe = formats.recipe_of(yaml.safe_load(text), recipe_file)
        writes[recipe_file] = text

    recipes = list(load_params().recipes)
    if name not in recipes:
        recipes.append(name)
        text = with_list_item(read_text(PARAMS_FILE), RECIPES_KEY, name, PARAMS_FILE)
        refuse_relative_cycle(validate(Params, yaml.safe_load(text), PARAMS_FILE))
        writes[PARAMS_FILE] = text
    dvc_text = read_text(DVC_FILE)
    if name not in (yaml.safe_load(dvc_text).get(ARTIFACTS_KEY) or {}):
        writes[DVC_FILE] = with_mapping_entry(dvc_text, ARTIFACTS_KEY, name, artifact_entry(name, recipe), DVC_FILE)
    matrix = [ci.job(listed, recipe if listed == name else formats.load_recipe(listed)) for listed in recipes]
    for workflow in ci.rewritten(matrix):
        if read_text(workflow.path) != workflow.text:
            writes[workflow.path] = workflow.text
    if not writes:
        raise BadInput(f"recipe {name} is already listed in params.yaml, dvc.yaml and every CI workflow",
                       where=str(recipe_file), fix="choose another name (--from starts a recipe as a copy of another)")
    for path, text in writes.items():
        write_text(path, text)
    return list(writes)


# ---------------------------------------------------------------- text edits that keep the rest


def with_description(text: str, description: str, path: Path) -> str:
    """A recipe file's text with its top-level `description` replaced (or added after `format`)."""
    lines = text.splitlines(keepends=True)
    line = f"description: {json.dumps(description)}\n"  # a JSON string is a double-quoted YAML scalar
    start = next((i for i, old in enumerate(lines) if re.match(r"description:(\s|$)", old)), None)
    if start is None:
        at = next((i + 1 for i, old in enumerate(lines) if re.match(r"format:(\s|$)", old)), 0)
        lines.insert(at, line)
    else:
        end = start + 1
        while end < len(lines) and lines[end][:1].isspace() and lines[end].strip():  # a block scalar's lines
            end += 1
        lines[start:end] = [line]
    return _checked(text, "".join(lines), "description", description, path)


def with_list_item(text: str, key: str, item: str, path: Path) -> str:
    """The YAML `text` with `item` appended to its top-level list `key`."""
    import yaml

    lines = text.splitlines(keepends=True)
    block = _top_level_block(lines, key)
    if block is None:
        new = text + ("" if text.endswith("\n") or not text else "\n") + f"{key}:\n  - {item}\n"
    else:
        start, end = block
        flow = re.match(rf"({re.escape(key)}:\s*\[)(.*)(\].*)$", lines[start], re.S)
        if flow and end == start + 1:
            inner = flow.group(2).strip()
            lines[start] = f"{flow.group(1)}{inner + ', ' if inner else ''}{item}{flow.group(3)}"
        else:
            items = [line for line in lines[start + 1:end] if re.match(r"\s+- ", line)]
            indent = re.match(r"(\s+)- ", items[0]).group(1) if items else "  "
            lines.insert(end, f"{indent}- {item}\n")
        new = "".join(lines)
    expected = (yaml.safe_load(text) or {}).get(key) or []
    return _checked(text, new, key, [*expected, item], path)


def with_mapping_entry(text: str, key: str, name: str, entry: dict[str, Any], path: Path) -> str:
    """The YAML `text` with `name: entry` added at the end of its top-level mapping `key`, in
    block style (the entry's lists in flow style)."""
    import yaml

    lines = text.splitlines(keepends=True)
    block = _top_level_block(lines, key)
    body = [line for line in lines[block[0] + 1:block[1]] if line.strip() and not line.lstrip().startswith("#")] \
        if block else []
    indent = re.match(r"\s+", body[0]).group(0) if body else "  "
    entry_lines = [f"{indent}{name}:\n", *(f"{indent * 2}{field}: {_flow(value)}\n" for field, value in entry.items())]
    if block is None:
        new = text + ("" if text.endswith("\n") or not text else "\n") + f"{key}:\n" + "".join(entry_lines)
    else:
        start, end = block
        if re.match(rf"{re.escape(key)}:\s*\{{\s*\}}\s*(#.*)?$", lines[start]):
            lines[start] = f"{key}:\n"
        lines[end:end] = entry_lines
        new = "".join(lines)
    expected = {**((yaml.safe_load(text) or {}).get(key) or {}), name: entry}
    return _checked(text, new, key, expected, path)


def _flow(value: Any) -> str:
    """`value` as YAML on one line: plain where it can be, else quoted; a list as [a, b]."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()


def _top_level_block(lines: list[str], key: str) -> tuple[int, int] | None:
    """(the line of top-level `key:`, the line after its last indented one), or None without it.
    A comment at column 0 after the block belongs to what follows it, as params.yaml writes them."""
    start = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}:(\s|$)", line)), None)
    if start is None:
        return None
    end = start + 1
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.strip() and not line[0].isspace():
            break
        if line.strip() and not line.lstrip().startswith("#"):
            end = i + 1
    return start, end


def _checked(old: str, new: str, key: str, value: Any, path: Path) -> str:
    """`new`, once YAML reads it as `old` with `key` set to `value` and nothing else changed."""
    import yaml

    expected = {**(yaml.safe_load(old) or {}), key: value}
    try:
        after = yaml.safe_load(new)
    except yaml.YAMLError:
        after = None
    if after != expected:
        raise BadInput(f"cannot add to `{key}:` without rewriting the file's other lines", where=f"{path}: {key}",
                       fix=f"write `{key}:` in block style, one entry a line, or add the entry by hand")
    return new
