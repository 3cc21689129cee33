"""Each recipe's change against a base revision: `qpipe compare --against REV`, for a pull request.

The base side is the gate results recorded at REV, read through DVC (`dvc exp show --rev REV`):
from git at a revision that committed them (they were `cache: false` metrics then), else from
the DVC cache or the project's remote by the hashes in REV's dvc.lock. The head side is
the workspace's. For every recipe on either side it gives size, ppl ratio, mean KLD,
top-1, prefill and decode as head value and change, marks a change within the measured noise
as a tie (``report.differs``: speed against the repeats' spread, accuracy by a paired test over
the windows both scored), and names the checks that crossed their limit either way.
Relative limits are judged within each side (``gates.verdict.resolve``).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from pipeline import layout
from pipeline.errors import BadInput

# column -> (label, format of a value)
COLUMNS = {
    "size_mb": ("size MB", "{:.1f}"),
    "ppl_ratio": ("ppl ratio", "{:.4f}"),
    "mean_kld": ("mean KLD", "{:.4f}"),
    "top1_agreement": ("top-1", "{:.3f}"),
    "task_recovery": ("task recovery", "{:.3f}"),
    "prefill_tok_s": ("prefill tok/s", "{:.0f}"),
    "decode_tok_s": ("decode tok/s", "{:.1f}"),
}
OUTPUT_FORMATS = ("md", "json")


def results_at(revision: str) -> list[tuple[str, dict[str, Any]]]:
    """(revision, gate result) for every gate result recorded at `revision`. A result DVC cannot
    read there (its object is in neither the cache nor the remote) stops with its path."""
    from pipeline.compare import GATES_PREFIX, dvc_exp_show

    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True)
    if known.returncode != 0:
        raise BadInput(f"unknown revision {revision!r}", where="--against",
                       fix="name a commit, branch or tag git has here (in CI, fetch the base branch first)")
    commit = known.stdout.strip()
    shown = next((entry for entry in dvc_exp_show("--rev", commit, "-n", "1") if entry["rev"] == commit), None)
    metrics = ((shown or {}).get("data") or {}).get("metrics") or {}
    found = []
    for path, entry in sorted(metrics.items()):
        if not path.startswith(GATES_PREFIX):
            continue
        if "error" in entry:
            raise BadInput(f"the gate result {path} of {revision} cannot be read: {entry['error'].get('msg')}",
                           where="--against", fix="set up the project's DVC remote (docs/remote.md) or "
                                                  f"`dvc pull` at {revision}, where its results were pushed")
        if "verdict" in entry.get("data", {}):
            found.append((revision, entry["data"]))
    return found


def judged(entries: list[tuple[str, dict[str, Any]]], log) -> list[dict[str, Any]]:
    """The results of a schema this qpipe reads (``compare.readable``), relative limits judged."""
    from pipeline.compare import readable
    from pipeline.gates import verdict

    return verdict.resolve([result for _, result in readable(entries, log)])


def changes(base: list[dict[str, Any]], head: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per recipe: its status, each column's base and head values and whether they
    differ beyond the noise, the verdicts and the checks that crossed their limit."""
    from pipeline import report

    base_by = {r["recipe"]: r for r in base}
    head_by = {r["recipe"]: r for r in head}
    entries = []
    for recipe in [*head_by, *(name for name in base_by if name not in head_by)]:
        old, new = base_by.get(recipe), head_by.get(recipe)
        old_row = report.row(old, None) if old else None
        new_row = report.row(new, None) if new else None
        columns = {}
        for column in COLUMNS:
            before = old_row.get(column) if old_row else None
            after = new_row.get(column) if new_row else None
            changed = old_row is not None and new_row is not None and report.differs(old_row, new_row, column)
            columns[column] = {"base": before, "head": after, "differs": bool(changed)}
        entries.append({
            "recipe": recipe,
            "status": "added" if old is None else "removed" if new is None else
                      "same artifact" if old["artifact"].get("sha256") == new["artifact"].get("sha256") else "rebuilt",
            "columns": columns,
            "verdict": {"base": old["verdict"] if old else None, "head": new["verdict"] if new else None},
            "crossed": crossed(old, new),
        })
    return entries


def crossed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """Checks whose verdict went from pass to fail (`name failed`) or back (`name passes`)."""
    if old is None or new is None:
        return []
    before = {check["name"]: check["verdict"] for check in old.get("checks", [])}
    found = []
    for check in new.get("checks", []):
        was = before.get(check["name"])
        if check["verdict"] == "fail" and was != "fail":
            found.append(f"{check['name']} failed ({check['value']:.4g} vs {check['limit']})")
        elif check["verdict"] == "pass" and was == "fail":
            found.append(f"{check['name']} passes")
    return found


def _cell(value: dict[str, Any], template: str) -> str:
    before, after = value["base"], value["head"]
    if after is None:
        return "not run" if before is None else f"not run (was {template.format(before)})"
    shown = template.format(after)
    if before is None:
        return shown
    delta = after - before
    if delta == 0:
        return f"{shown} (=)"
    sign = "+" if delta > 0 else "−"
    return f"{shown} ({sign}{template.format(abs(delta))}{'' if value['differs'] else ', tie'})"


def render(entries: list[dict[str, Any]], revision: str, output: str) -> str:
    if output == "json":
        return json.dumps({"against": revision, "recipes": entries}, indent=2) + "\n"
    if output != "md":
        raise BadInput(f"unknown output format {output!r}", where="--format",
                       fix=f"use one of: {', '.join(OUTPUT_FORMATS)} with --against")
    header = ["recipe", "status", *(label for label, _ in COLUMNS.values()), "verdict", "crossed a limit"]
    lines = [f"Changes against `{revision}` (tie: within the measured noise)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        verdicts = entry["verdict"]
        verdict = (verdicts["head"] or "removed") if verdicts["base"] in (None, verdicts["head"]) \
            else f"{verdicts['base']} → {verdicts['head'] or 'removed'}"
        cells = [entry["recipe"], entry["status"],
                 *(_cell(entry["columns"][column], template) for column, (_, template) in COLUMNS.items()),
                 verdict, "; ".join(entry["crossed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def against(revision: str, output: str, log=print) -> str:
    """The whole `qpipe compare --against REV` output."""
    from pipeline.compare import workspace_results

    from pipeline.compare import stale_workspace

    head_entries = workspace_results()
    head = judged(head_entries, log)
    if not head:
        raise BadInput("no gate results in the workspace", where=str(layout.GATES_DIR), fix="run `dvc repro` first")
    stale_workspace(head_entries, log)
    base = judged(results_at(revision), log)
    return render(changes(base, head), revision, output)
