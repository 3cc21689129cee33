"""Whether a gate result was judged against the params and limits that hold now.

The gate stage records in each result what it was judged against (`judged_against`): a hash of
each part of its inputs that params.yaml and the recipe file set, namely the recipe's limits
with params `limits.R` applied, the recipe's other keys, and params `model`, `corpus`,
`reference`, `speed` and `tasks`. `dvc repro` re-runs a gate whenever one of them changes, so
its results always match; a command run without it (`qpipe check`, `report`, `compare` after an
edit of params.yaml or a recipe) would judge old figures against nothing new, so those name
each stale result, the parts that changed, and the fix. A result written before results
recorded this is stale too: what it was judged against is unknown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# params sections a gate result depends on, directly or through the stages before it
PARAMS_PARTS = ("model", "corpus", "reference", "speed", "tasks")
FIX = "run `dvc repro` (it re-runs what changed)"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def judged_against(recipe, limits, params) -> dict[str, str]:
    """What a gate of `recipe` under `limits` (``config.effective_limits``) and `params` is
    judged against: one hash per part (module docstring)."""
    parts = {"limits": limits.model_dump(mode="json"),
             "recipe": recipe.model_dump(mode="json", exclude={"gates", "description"})}
    parts.update({name: _plain(getattr(params, name)) for name in PARAMS_PARTS})
    return {name: _digest(value) for name, value in parts.items()}


def _plain(value: Any) -> Any:
    """A params section as JSON values (`tasks` is a list of models)."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def current(name: str, params) -> dict[str, str]:
    """What recipe `name`'s gate would be judged against now."""
    from pipeline import formats
    from pipeline.config import effective_limits

    recipe = formats.load_recipe(name)
    limits, _ = effective_limits(recipe, name, params)
    return judged_against(recipe, limits, params)


def stale_reason(result: dict[str, Any], params) -> str | None:
    """Why `result` does not hold for the params and recipe files now, or None when it does."""
    from pipeline.errors import BadInput

    name = result["recipe"]
    if name not in params.recipes:
        return f"recipe {name} is no longer in params.yaml `recipes`"
    recorded = result.get("judged_against")
    if not recorded:
        return "it records no hash of the params and limits it was judged against (written by an older qpipe)"
    try:
        now = current(name, params)
    except BadInput as error:
        return f"its recipe no longer reads ({error.what})"
    changed = [part for part in now if recorded.get(part) != now[part]]
    if not changed:
        return None
    named = {"limits": f"limits (recipes/{name}.yaml gates, params.yaml limits.{name})",
             "recipe": f"recipes/{name}.yaml keys"}
    return f"it was judged against other {', '.join(named.get(part, f'params.yaml `{part}`') for part in changed)} than now"


def stale_results(results: list[dict[str, Any]], params) -> dict[str, str]:
    """recipe -> why its result is stale, for each stale one of `results`."""
    reasons = {result["recipe"]: stale_reason(result, params) for result in results}
    return {name: reason for name, reason in reasons.items() if reason}
