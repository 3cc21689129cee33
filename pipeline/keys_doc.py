"""docs/recipes.md, generated from the pydantic models' ``Field`` descriptions.

`python -m pipeline.keys_doc > docs/recipes.md` (or `make docs`) writes it; a test checks
that the committed file is current.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Recipe and params keys

Generated from the `Field` descriptions in pipeline/config.py and pipeline/formats/*.py by
`make docs`; a test fails when this file is out of date. Unknown keys are refused with exit 2,
naming the file, the key and the keys allowed there.
"""


def type_name(annotation: Any) -> str:
    from pipeline.config import RelativeLimit

    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(parts)
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is RelativeLimit:
        return "`{relative_to, factor}`"
    if _is_model(annotation):
        return "mapping (below)"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(annotation, str(annotation))


def bounds(field) -> str:
    from pipeline.config import Limit

    found = []
    for constraint in field.metadata:
        if isinstance(constraint, Limit):  # a gate limit: its bounds are the table's (config.LIMITS)
            found.append(constraint.allowed())
            continue
        for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def checked_as(field) -> str:
    """For a gate limit, the check the verdict makes with it (config.LIMITS)."""
    from pipeline.config import Limit

    limit = next((item for item in field.metadata if isinstance(item, Limit)), None)
    if limit is None:
        return ""
    keyed = f"`{limit.keyed_figure.format(key=f'<{limit.keyed_by}>')}`" if limit.keyed else ""
    figure = (f"`{limit.figure}`" + (f" (per {limit.keyed_by}: {keyed})" if keyed else "")) if limit.figure \
        else f"{keyed} per {limit.keyed_by}"
    return f"; checks {limit.gate} {figure} {limit.comparison.replace('<=', '≤').replace('>=', '≥')} limit"


def default_of(field) -> str:
    import yaml

    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{yaml.safe_dump(value, default_flow_style=True).strip()}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return ""
    text = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("\n...").strip()
    return f"`{text}`"


def rows(fields: dict[str, Any], prefix: str = "") -> list[str]:
    """One table row per field, then the rows of each nested model's fields under its key."""
    lines, nested = [], []
    for name, field in fields.items():
        key = f"{prefix}{name}"
        lines.append(f"| `{key}` | {type_name(field.annotation)} | {default_of(field)} | {bounds(field)} | "
                     f"{field.description or ''}{checked_as(field)} |")
        optional = [arg for arg in typing.get_args(field.annotation) if arg is not type(None)]
        if _is_model(field.annotation) or (len(optional) == 1 and _is_model(optional[0])):
            nested.append((f"{key}.", field.annotation if _is_model(field.annotation) else optional[0]))
        elif typing.get_origin(field.annotation) is list and _is_model(typing.get_args(field.annotation)[0]):
            nested.append((f"{key}[].", typing.get_args(field.annotation)[0]))  # each entry of the list
    for key, submodel in nested:
        lines += rows(submodel.model_fields, key)
    return lines


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


TABLE_HEAD = ["| key | type | default | bounds | what it is |", "|---|---|---|---|---|"]


def render() -> str:
    from pipeline import formats
    from pipeline.config import GateLimitOverrides, Params, RecipeBase

    out = [HEADER, "## params.yaml", "", *TABLE_HEAD, *rows(Params.model_fields), "",
           f"`limits.<recipe>` takes the keys of a recipe's `gates` ({', '.join(GateLimitOverrides.model_fields)}); "
           "only the keys given replace the recipe's.", "",
           "## Every recipe (recipes/NAME.yaml)", "", *TABLE_HEAD, *rows(RecipeBase.model_fields), ""]
    for name in formats.FORMATS:
        recipe = formats.recipe_class(name)
        own = {key: field for key, field in recipe.model_fields.items() if key not in RecipeBase.model_fields}
        out += [f"## `format: {name}`", "", f"Details: [formats/{name}.md](formats/{name}.md).", "",
                *TABLE_HEAD, *rows(own), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
