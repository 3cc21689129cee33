"""Checks of gate figures against recipe limits, and the overall verdict.

A check whose figure was not measured is `not_run`, never a pass. The verdict is
- `fail` if any check failed;
- `incomplete` if a gate named in `require` did not run, or one of its checks is `not_run`;
- `not_judged` if a relative limit (``config.RelativeLimit``) could not be judged: the recipe it
  is relative to has no result, did not pass, did not measure the figure, or the limits form a
  cycle. The user set that limit, so it never drops out of the verdict, whatever `require` says;
- `pending` if a relative limit still waits for the recipe it is relative to; ``resolve``
  settles it once every gate result of the run is at hand;
- `pass` otherwise.
A build refused for the model (``errors.RecipeNotApplicable``) gets `refused` from the gate
stage without any check (``gates._write_refused``); like `fail` and `incomplete`, `check` fails on it.

The gate stage writes the checks it can settle alone. The report, `check`, `publish` and
`compare` read gate results through ``resolve``, so a relative limit is judged the same way
everywhere: limit = factor x the other recipe's figure, provided that recipe passed.
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.config import LIMIT_BY_KEY, LIMITS, GateLimits, RelativeLimit

SECTIONS = ("accuracy", "speed", "tasks")


def evaluate(limits: GateLimits, sections: dict[str, dict[str, Any]],
             set_in: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One check per limit set; `set_in` maps a limit key to where the user sets it."""
    checks = []
    for key, name, section_name, figure, comparison, limit in _limits_set(limits):
        section = sections.get(section_name) or {}
        value = figure_value(section, figure)
        check = {"name": name, "gate": section_name, "figure": figure, "limit": None, "value": value}
        if isinstance(limit, RelativeLimit):
            check.update(relative_to=limit.relative_to, factor=limit.factor)
        else:
            check["limit"] = limit
        if set_in and key in set_in:
            check["set_in"] = set_in[key]
        if value is None:
            check["verdict"] = "not_run"
            check["reason"] = (section.get("reason") or section.get(f"{figure}_reason")
                               or f"{figure} was not measured")
        elif isinstance(limit, RelativeLimit):
            check["verdict"] = "pending"
        else:
            check["verdict"] = _compare(value, comparison, limit)
        checks.append(check)
    return checks


def _limits_set(limits: GateLimits):
    """(limit key, check name, section, figure, comparison, limit) of each limit set, in
    ``config.LIMITS``' order; a dotted figure is a path into the section. A keyed limit given as
    {key: number} (a task, or a position bucket) makes one check per key, named <limit>.<key>, on
    the limit's keyed figure (recovery.<task>, by_position.<bucket>.mean_kld, ...)."""
    for spec in LIMITS:
        limit = getattr(limits, spec.key)
        if isinstance(limit, dict):
            for key, key_limit in limit.items():
                yield (spec.key, f"{spec.key}.{key}", spec.gate, spec.keyed_figure.format(key=key), spec.comparison,
                       key_limit)
        elif limit is not None:
            yield spec.key, spec.key, spec.gate, spec.figure, spec.comparison, limit


def comparison_of(check: dict[str, Any]) -> str:
    """"<=" or ">=": how a check's value is held against its limit."""
    return LIMIT_BY_KEY[check["name"].split(".")[0]].comparison


def figure_value(section: dict[str, Any], figure: str) -> float | None:
    """A measured figure of a gate section (None unless the section ran); `figure` may be a
    dotted path such as ``ci95.mean_kld.high``."""
    if section.get("status") != "ok":
        return None
    value: Any = section
    for part in figure.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _compare(value: float, comparison: str, limit: float) -> str:
    ok = value <= limit if comparison == "<=" else value >= limit
    return "pass" if ok else "fail"


def overall(require: list[str], sections: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The verdict and the reasons behind it (empty for a pass)."""
    failed = [_failure(c) for c in checks if c["verdict"] == "fail"]
    if failed:
        return "fail", failed
    missing = []
    for gate in require:
        section = sections.get(gate) or {}
        if section.get("status") != "ok":
            missing.append(f"required gate {gate} did not run: {section.get('reason', 'no result')}")
    missing += [f"{c['name']}: {c['reason']}" for c in checks
                if c["verdict"] == "not_run" and c["gate"] in require]
    unjudged = [f"{c['name']}: {c['reason']}" for c in checks if c["verdict"] == "not_judged"]
    if missing:
        return "incomplete", missing + unjudged
    if unjudged:
        return "not_judged", unjudged
    pending = [f"{c['name']}: {c['factor']:g} x {c['relative_to']}'s {c['figure']}, "
               "judged once every recipe is gated" for c in checks if c["verdict"] == "pending"]
    if pending:
        return "pending", pending
    return "pass", []


def _failure(check: dict[str, Any]) -> str:
    sign = ">" if comparison_of(check) == "<=" else "<"
    limit = f"{check['limit']:.4g}"
    if "relative_to" in check:
        limit += f" = {check['factor']:g} x {check['relative_to']}'s {check['anchor_value']:.4g}"
    where = f" (set in {check['set_in']})" if check.get("set_in") else ""
    return f"{check['name']}: {check['figure']} {check['value']:.4g} {sign} limit {limit}{where}"


def resolve(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate results of one run with every relative limit judged against the recipe it names.

    A relative check passes or fails once that recipe has passed; it is `not_judged` when that
    recipe has no result here, did not pass, did not measure the figure, or when relative
    limits form a cycle (``config.load_params`` refuses a cycle in params and recipes; one
    here comes from results gated under other params). Results without relative limits come
    back unchanged (as copies).
    """
    resolved = {r["recipe"]: copy.deepcopy(r) for r in results}
    progress = True
    while progress:
        progress = False
        for result in resolved.values():
            if not _unsettled(result):
                continue
            waiting = False
            for check in result["checks"]:
                if check["verdict"] == "pending":
                    waiting |= not _judge_relative(check, resolved.get(check["relative_to"]))
            if not waiting:
                _recompute(result)
                progress = True
    for result in resolved.values():
        if _unsettled(result):
            for check in result["checks"]:
                if check["verdict"] == "pending":
                    check.update(verdict="not_judged",
                                 reason=f"relative limits form a cycle through {check['relative_to']}")
            _recompute(result)
    return [resolved[r["recipe"]] for r in results]


def _unsettled(result: dict[str, Any]) -> bool:
    """Whether a result still has a relative check to judge (its verdict may yet change)."""
    return any(check["verdict"] == "pending" for check in result.get("checks", []))


def _judge_relative(check: dict[str, Any], anchor: dict[str, Any] | None) -> bool:
    """Settle one pending check against its anchor's result; False while the anchor is unsettled."""
    name = check["relative_to"]
    if anchor is None:
        check.update(verdict="not_judged", reason=f"relative to {name}, which has no gate result in this run "
                                                 f"(add it to params.yaml recipes)")
        return True
    if _unsettled(anchor):
        return False
    if anchor["verdict"] != "pass":
        check.update(verdict="not_judged", reason=f"relative to {name}, whose verdict is {anchor['verdict']}")
        return True
    anchor_value = figure_value(anchor.get(check["gate"]) or {}, check["figure"])
    if anchor_value is None:
        check.update(verdict="not_judged", reason=f"relative to {name}, which did not measure {check['figure']}")
        return True
    limit = check["factor"] * anchor_value
    check.update(limit=limit, anchor_value=anchor_value,
                 verdict=_compare(check["value"], comparison_of(check), limit))
    return True


def _recompute(result: dict[str, Any]) -> None:
    sections = {name: result.get(name) for name in SECTIONS}
    result["verdict"], result["reasons"] = overall(result["require"], sections, result["checks"])
