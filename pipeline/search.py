"""Per-group precision under a budget, from the sensitivity stage's measurement.

The choice is a multiple-choice knapsack: each group takes exactly one of its options
(type, bytes, damage), total bytes within a budget, total damage (the sum of the groups'
measured mean KLDs, which assumes their errors add) as low as possible. It is solved the
way the LP relaxation is: each group's options reduced to their lower convex hull in
(bytes, damage), then upgrades taken in order of damage removed per byte while they fit,
and finally any remaining upgrade that still fits, best first. With a KLD budget instead,
the same upgrade path is walked from the smallest choice until the predicted damage is
within it. docs/sensitivity.md says what this assumes and how the gates check it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, model_validator

from pipeline.config import Strict


class SearchSpec(Strict):
    """A recipe's `search:` key: choose each group's type from the sensitivity measurement."""

    bits_per_weight: float | None = Field(None, gt=0, description="size budget: the file's tensor bytes x 8 / "
                                          "weights, as build.json's tensor_types.bits_per_weight counts them")
    max_mean_kld: float | None = Field(None, gt=0, description="damage budget: the smallest choice whose "
                                       "predicted mean KLD (the sum of its groups' measured ones) is within this")
    types: list[str] | None = Field(None, min_length=1, description="the candidate types the search may use "
                                    "(None: every type the sensitivity stage measured)")

    @model_validator(mode="after")
    def _one_budget(self) -> "SearchSpec":
        if (self.bits_per_weight is None) == (self.max_mean_kld is None):
            raise ValueError("set exactly one budget: bits_per_weight or max_mean_kld")
        return self


def checked_patterns(patterns: dict[str, str], allowed, key: str) -> dict[str, str]:
    """A recipe's per-tensor key (``{regular expression: type}``) with its types upper-cased;
    ValueError naming `key` for a pattern that does not compile or a type not in `allowed`."""
    for pattern, type_name in patterns.items():
        try:
            re.compile(pattern)
        except re.error as problem:
            raise ValueError(f"{key}: {pattern!r} is not a regular expression ({problem})") from None
        if type_name.upper() not in allowed:
            raise ValueError(f"{key}: unknown type {type_name!r} for {pattern!r}; valid: {', '.join(allowed)}")
    return {pattern: type_name.upper() for pattern, type_name in patterns.items()}


def check_search_keys(search: SearchSpec | None, patterns: dict[str, str], key: str, search_types) -> None:
    """A recipe sets its per-tensor `key` or `search`, not both, and searches only measured types."""
    if search and patterns:
        raise ValueError(f"set {key} or search, not both: the search writes {key}")
    unknown = [t for t in (search.types or []) if t.upper() not in search_types] if search else []
    if unknown:
        raise ValueError(f"search.types: {', '.join(unknown)} not among the types the sensitivity stage "
                         f"measures for this format ({', '.join(search_types)})")


def first_match(patterns: dict[str, str], names) -> dict[str, str]:
    """{name: the type of the first pattern matching from the start of it}, for the names one matches."""
    chosen = {}
    for name in names:
        type_name = next((type_name for pattern, type_name in patterns.items() if re.match(pattern, name)), None)
        if type_name is not None:
            chosen[name] = type_name
    return chosen


def linear_entries(chosen) -> dict[str, str]:
    """A solved search as a per-module recipe key: one exact-name pattern per Linear of each
    decoder-layer group -> its group's type (for formats that quantize Linears only)."""
    return {re.escape(parameter.removesuffix(".weight")) + "$": option.type for group, option in chosen
            if group["kind"] not in ("embedding", "output") for parameter in group["parameters"]}


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    damage: float


def hull(options: list[Option]) -> list[Option]:
    """The options no mix of two others beats: sorted by bytes, damage falling, convex."""
    frontier: list[Option] = []
    for option in sorted(options, key=lambda o: (o.bytes, o.damage)):
        if frontier and option.damage >= frontier[-1].damage:
            continue
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b lies on or above the segment from a to option: drop it
            if (b.damage - a.damage) * (option.bytes - a.bytes) >= (option.damage - a.damage) * (b.bytes - a.bytes):
                frontier.pop()
            else:
                break
        frontier.append(option)
    return frontier


def upgrade_path(groups: dict[str, list[Option]]) -> tuple[dict[str, Option], list[tuple[str, Option]]]:
    """The smallest choice of each group, and the upgrades (group, next option) in the order
    of damage removed per extra byte (the LP relaxation's order)."""
    import heapq

    hulls = {name: hull(options) for name, options in groups.items()}
    start = {name: frontier[0] for name, frontier in hulls.items()}
    steps: list[tuple[float, int, str, int]] = []
    for order, (name, frontier) in enumerate(hulls.items()):
        if len(frontier) > 1:
            heapq.heappush(steps, (_cost(frontier[0], frontier[1]), order, name, 1))
    path = []
    while steps:
        _, order, name, index = heapq.heappop(steps)
        frontier = hulls[name]
        path.append((name, frontier[index]))
        if index + 1 < len(frontier):
            heapq.heappush(steps, (_cost(frontier[index], frontier[index + 1]), order, name, index + 1))
    return start, path


def _cost(low: Option, high: Option) -> float:
    """Negative damage removed per extra byte: heapq pops the best upgrade first."""
    return -(low.damage - high.damage) / max(high.bytes - low.bytes, 1)


def within_bytes(groups: dict[str, list[Option]], budget_bytes: float) -> dict[str, Option] | None:
    """The least-damage choice found within `budget_bytes`; None if even the smallest does not fit."""
    choice, path = upgrade_path(groups)
    used = sum(option.bytes for option in choice.values())
    if used > budget_bytes:
        return None
    for name, option in path:
        extra = option.bytes - choice[name].bytes
        if used + extra > budget_bytes:
            break
        choice[name], used = option, used + extra
    # fill what is left: any option of any group that still fits, most damage removed first
    while True:
        best = None
        for name, options in groups.items():
            for option in options:
                extra = option.bytes - choice[name].bytes
                gain = choice[name].damage - option.damage
                if gain > 0 and used + extra <= budget_bytes and (best is None or gain > best[0]):
                    best = (gain, name, option, extra)
        if best is None:
            return choice
        _, name, option, extra = best
        choice[name], used = option, used + extra


def within_damage(groups: dict[str, list[Option]], budget_damage: float) -> dict[str, Option] | None:
    """The first choice along the upgrade path whose predicted damage is within `budget_damage`;
    None if not even the largest is."""
    choice, path = upgrade_path(groups)
    damage = sum(option.damage for option in choice.values())
    for name, option in path:
        if damage <= budget_damage:
            break
        damage += option.damage - choice[name].damage
        choice[name] = option
    return choice if damage <= budget_damage else None


def solve(spec: SearchSpec, measured: dict, budget_bytes: float | None, *, where: str) -> dict[str, Option]:
    """Each group's option under the spec's budget (`budget_bytes`: the bytes the groups may
    take, for a size budget), from a format's sensitivity record; the unquantized type is
    always a candidate. Exit 2 when no choice meets the budget."""
    from pipeline.errors import BadInput

    allowed = {t.upper() for t in spec.types} | {measured["unquantized_type"]} if spec.types else None
    groups = {group["name"]: [Option(type_name, option["bytes"], option["mean_kld"])
                              for type_name, option in group["options"].items()
                              if allowed is None or type_name in allowed]
              for group in measured["groups"]}
    if budget_bytes is not None:
        choice = within_bytes(groups, budget_bytes)
        if choice is None:
            smallest = sum(min(option.bytes for option in options) for options in groups.values())
            raise BadInput(f"no choice of types fits {spec.bits_per_weight} bits per weight: the smallest takes "
                           f"{8 * (smallest - budget_bytes) / measured['weights'] + spec.bits_per_weight:.2f}",
                           where=f"{where}.bits_per_weight", fix="raise the budget, or allow smaller types")
        return choice
    choice = within_damage(groups, spec.max_mean_kld)
    if choice is None:
        best = sum(min(option.damage for option in options) for options in groups.values())
        raise BadInput(f"no choice of types is predicted within mean KLD {spec.max_mean_kld}: the best is "
                       f"{best:.4g}", where=f"{where}.max_mean_kld", fix="raise the budget")
    return choice


def resolve(spec: SearchSpec, sensitivity: dict, format_name: str, *, other_weight_bytes: float,
            where: str) -> tuple[list[tuple[dict, Option]], dict]:
    """A recipe's search solved on the sensitivity record: each group's record with its chosen
    option, and what build.json records of the search. `other_weight_bytes`: what the format
    stores a weight in that no group takes (norms, biases) in."""
    from collections import Counter

    from pipeline.errors import BadInput

    measured = sensitivity["formats"].get(format_name)
    if measured is None:
        raise BadInput(f"the recipe searches its types but the sensitivity stage measured none for {format_name}",
                       where="params.yaml: sensitivity.formats", fix=f"add {format_name} to sensitivity.formats")
    fixed_bytes = other_weight_bytes * measured["other_weights"]
    budget = None if spec.bits_per_weight is None else spec.bits_per_weight * measured["weights"] / 8 - fixed_bytes
    choice = solve(spec, measured, budget, where=where)
    chosen_bytes = fixed_bytes + sum(option.bytes for option in choice.values())
    return [(group, choice[group["name"]]) for group in measured["groups"]], {
        "predicted_mean_kld": sum(option.damage for option in choice.values()),
        "predicted_bits_per_weight": 8 * chosen_bytes / measured["weights"],
        "types": dict(Counter(option.type for option in choice.values()).most_common()),
        "budget": spec.model_dump(exclude_none=True),
    }
