"""Formats, registered by name, one module each; and reading a recipe, which needs the registry.

What a format module provides is ``formats.contract``'s to define and check; how to add
one is docs/adding-a-format.md. Module import stays light: heavy packages are imported
inside the functions.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.config import RECIPES_DIR, RecipeBase, read_yaml_mapping, validate
from pipeline.errors import BadInput

FORMATS: dict[str, str] = {
    "gguf": "pipeline.formats.gguf",
    "awq": "pipeline.formats.awq",
    "modelopt": "pipeline.formats.modelopt",
}


def module(name: str) -> ModuleType:
    return importlib.import_module(FORMATS[name])


def recipe_class(name: str):
    return module(name).Recipe


def load_recipe(name: str, recipes_dir: Path = RECIPES_DIR) -> RecipeBase:
    """recipes/NAME.yaml, validated by its format's Recipe model (exit 2 naming file and key)."""
    path = Path(recipes_dir) / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(recipes_dir).glob("*.yaml"))
        raise BadInput(
            f"no recipe named {name!r}",
            where=str(path),
            fix=f"create {path} or use one of: {', '.join(available) or '(none)'}",
        )
    return recipe_of(read_yaml_mapping(path), path)


def recipe_of(raw: dict, path: Path) -> RecipeBase:
    """A recipe's keys as read from `path`, validated by its format's Recipe model (exit 2
    naming file and key)."""
    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise BadInput(
            f"unknown format {fmt!r}",
            where=f"{path}: format",
            fix=f"set format to one of: {', '.join(sorted(FORMATS))}",
        )
    recipe = validate(recipe_class(fmt), raw, path)
    recipe._path = path
    return recipe


ENGINE_KEY = "engine"  # a recipe's engine@R settings (modelopt's trtllm-build knobs), where its format has them


def build_spec(recipe) -> dict:
    """What a build depends on: the recipe without its gate limits, description and engine
    settings, so that tuning a limit re-runs the gate (an engine setting, the engine stage),
    not the build."""
    return {"format": recipe.format, **recipe.model_dump(exclude={"gates", "description", "format", ENGINE_KEY})}


def engine_spec(recipe) -> dict:
    """What the engine@R stage depends on beyond the build: the recipe's engine settings alone
    (none for a format without them), so that tuning a limit does not re-run it."""
    return {"format": recipe.format, **recipe.model_dump(include={ENGINE_KEY})}
