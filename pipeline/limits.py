"""Limits fitted to a run, and which limits guard nothing (docs/checkpoints.md, "Limits for your model").

A limit is judged by its distance from what a lossless artifact would measure (``Limit.lossless``:
KLD 0, ppl ratio 1, top-1 1, recovery 1):

- ``suggest``: for each recipe of a finished run, each accuracy and task limit at `margin` times
  the distance of its figure's 95 % interval bound (the upper bound of a figure that must stay
  low, the lower bound of one that must stay high): max_mean_kld = margin x KLD's upper bound,
  max_ppl_ratio = 1 + margin x (upper bound - 1), min_top1_agreement = 1 - margin x (1 - lower
  bound). The same artifact measured again passes; one whose figure moves `margin` times as far
  from lossless as the bound fails. Speed limits are not suggested: a speed is the host's.
- ``loose``: a limit more than `factor` times as far from lossless as the measured figure (for
  a speed: a measured figure more than `factor` times its limit) lets that much regression pass.
- ``within_interval``: a limit inside the figure's own 95 % interval: pass or fail, the verdict
  rests on a difference the measurement cannot tell from noise.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.config import LIMIT_BY_KEY
from pipeline.gates.verdict import figure_value

DEFAULT_MARGIN = 1.5
LOOSE_FACTOR = 5.0
# the limits `suggest` fits: the accuracy figures with an interval, and per-task recovery
SUGGESTED = ("max_ppl_ratio", "max_mean_kld", "min_top1_agreement", "min_task_recovery")


def _spec_and_key(check: dict[str, Any]):
    key, _, keyed = check["name"].partition(".")
    return LIMIT_BY_KEY[key], keyed


def loose(check: dict[str, Any], factor: float = LOOSE_FACTOR) -> str | None:
    """Why a judged check's limit guards nothing within `factor`, or None."""
    if check.get("limit") is None or check.get("value") is None or check["verdict"] not in ("pass", "fail"):
        return None
    spec, _ = _spec_and_key(check)
    value, limit = check["value"], check["limit"]
    if spec.lossless is None:
        ratio = value / limit if spec.comparison == ">=" and limit > 0 else None
        if ratio is not None and ratio > factor:
            return f"{check['name']}: the limit {limit:.4g} is {ratio:.0f}x below the measured {value:.4g}"
        return None
    measured, allowed = abs(value - spec.lossless), abs(limit - spec.lossless)
    if measured > 0 and allowed > factor * measured:
        return (f"{check['name']}: the limit {limit:.4g} allows {allowed / measured:.0f}x the measured distance "
                f"from lossless ({value:.4g}; lossless {spec.lossless:g})")
    return None


def within_interval(check: dict[str, Any], result: dict[str, Any]) -> str | None:
    """Why a judged check's verdict rests on a difference inside its figure's 95 % interval, or None."""
    if check.get("limit") is None or check["verdict"] not in ("pass", "fail"):
        return None
    spec, keyed = _spec_and_key(check)
    if spec.interval is None:
        return None
    interval = figure_value(result.get(spec.gate) or {}, spec.interval.format(key=keyed))
    if not isinstance(interval, dict) or interval.get("low") is None:
        return None
    if interval["low"] <= check["limit"] <= interval["high"]:
        return (f"{check['name']}: {check['verdict']} on noise: the limit {check['limit']:.4g} lies inside the "
                f"measured figure's 95 % interval ({interval['low']:.4g}-{interval['high']:.4g})")
    return None


def notes(result: dict[str, Any], factor: float = LOOSE_FACTOR) -> list[str]:
    """What the report and `check` say of a result's limits: the loose ones and the noisy verdicts."""
    found = []
    for check in result.get("checks", []):
        found += [note for note in (loose(check, factor), within_interval(check, result)) if note]
    return found


def _suggested_limit(spec, bound: float, margin: float) -> float:
    """margin x the bound's distance from lossless, rounded away from it to 4 significant digits."""
    distance = abs(bound - spec.lossless)
    if distance == 0:
        return spec.lossless
    scaled = margin * distance
    digits = 3 - math.floor(math.log10(scaled))
    scaled = math.ceil(round(scaled * 10 ** digits, 6)) / 10 ** digits   # round() drops float dust first
    limit = spec.lossless + scaled if spec.comparison == "<=" else spec.lossless - scaled
    return max(limit, spec.low) if spec.comparison == ">=" else limit


def suggest(results: list[dict[str, Any]], margin: float = DEFAULT_MARGIN) -> tuple[dict[str, dict[str, Any]],
                                                                                   list[str]]:
    """({recipe: {limit key: limit}}, what could not be suggested and why) from gate results."""
    limits: dict[str, dict[str, Any]] = {}
    skipped = []
    for result in results:
        name = result["recipe"]
        suggested: dict[str, Any] = {}
        for key in SUGGESTED:
            spec = LIMIT_BY_KEY[key]
            section = result.get(spec.gate) or {}
            if section.get("status") != "ok":
                skipped.append(f"{name}: {key}: the {spec.gate} gate did not run ({section.get('reason', 'no result')})")
                continue
            side = "high" if spec.comparison == "<=" else "low"
            if spec.keyed:
                per_key = {}
                for task, interval in (figure_value(section, spec.interval.split(".")[0]) or {}).items():
                    if interval and interval.get(side) is not None:
                        per_key[task] = _suggested_limit(spec, interval[side], margin)
                if per_key:
                    suggested[key] = per_key
                continue
            interval = figure_value(section, spec.interval)
            if not interval or interval.get(side) is None:
                skipped.append(f"{name}: {key}: no 95 % interval of {spec.figure}")
                continue
            suggested[key] = _suggested_limit(spec, interval[side], margin)
        if suggested:
            limits[name] = suggested
    return limits, skipped


def with_limits(params_text: str, limits: dict[str, dict[str, Any]], suggested: str) -> str:
    """params.yaml's text with each recipe of `limits` given those limits under `limits:` (and
    `suggested`, which every check they set names), the other recipes' entries and every other
    line as they were."""
    import yaml

    lines = params_text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("limits:")), None)
    end = start + 1 if start is not None else len(lines)
    while start is not None and end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    while start is not None and end > start + 1 and not lines[end - 1].strip():
        end -= 1   # blank lines before the next key stay there
    current = (yaml.safe_load("".join(lines[start:end])) or {}).get("limits") or {} if start is not None else {}
    merged = {**current, **{name: {"suggested": suggested, **values} for name, values in limits.items()}}
    block = yaml.safe_dump({"limits": merged}, sort_keys=False, default_flow_style=False, width=120)
    if start is None:
        return params_text + ("" if params_text.endswith("\n") else "\n") + block
    return "".join(lines[:start]) + block + "".join(lines[end:])
