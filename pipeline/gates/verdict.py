"""Checks of gate figures against recipe limits, and the overall verdict.

A check whose figure was not measured is `not_run`, never a pass. The verdict is
- `fail` if any check failed;
- `incomplete` if a gate named in `require` did not run, or one of its checks is `not_run`;
- `pass` otherwise.
A build refused for the model (``errors.RecipeNotApplicable``) gets `refused` from the gate
stage without any check (``gates._write_refused``); like `fail` and `incomplete`, `check` fails on it.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import GateLimits

# limit key -> (gate section, figure, comparison)
CHECKS: dict[str, tuple[str, str, str]] = {
    "max_ppl_ratio": ("accuracy", "ppl_ratio", "<="),
    "max_mean_kld": ("accuracy", "mean_kld", "<="),
    "min_top1_agreement": ("accuracy", "top1_agreement", ">="),
    "max_tokenizer_mismatch": ("accuracy", "tokenizer_mismatch", "<="),
    "min_decode_speedup": ("speed", "decode_speedup", ">="),
    "min_roofline_fraction": ("speed", "roofline_fraction", ">="),
}


def evaluate(limits: GateLimits, sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for key, (section_name, figure, comparison) in CHECKS.items():
        limit = getattr(limits, key)
        if limit is None:
            continue
        section = sections.get(section_name) or {}
        value = section.get(figure) if section.get("status") == "ok" else None
        if value is None:
            verdict = "not_run"
        elif comparison == "<=":
            verdict = "pass" if value <= limit else "fail"
        else:
            verdict = "pass" if value >= limit else "fail"
        check = {"name": key, "gate": section_name, "figure": figure, "limit": limit,
                 "value": value, "verdict": verdict}
        if verdict == "not_run":
            check["reason"] = (section.get("reason") or section.get(f"{figure}_reason")
                               or f"{figure} was not measured")
        checks.append(check)
    return checks


def overall(limits: GateLimits, sections: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The verdict and the reasons behind it (empty for a pass)."""
    failed = [f"{c['name']}: {c['figure']} {c['value']:.4g} vs limit {c['limit']}"
              for c in checks if c["verdict"] == "fail"]
    if failed:
        return "fail", failed
    missing = []
    for gate in limits.require:
        section = sections.get(gate) or {}
        if section.get("status") != "ok":
            missing.append(f"required gate {gate} did not run: {section.get('reason', 'no result')}")
    missing += [f"{c['name']}: {c['reason']}" for c in checks
                if c["verdict"] == "not_run" and c["gate"] in limits.require]
    if missing:
        return "incomplete", missing
    return "pass", []
