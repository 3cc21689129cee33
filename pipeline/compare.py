"""Compare artifacts across the workspace and `dvc exp` experiments, and recommend one.

Gate results are cached DVC metrics (artifacts/gates/R.json; dvc.lock holds their hashes, the
DVC cache and remote their bytes), so DVC keeps them for every commit and experiment; `dvc exp
show --json` returns them for the workspace, each baseline commit and each experiment, reading
a result that is not in the local cache from the remote. One row per artifact is made with the report's own row
function: one file (same sha256) scored on the same reference with the same verdict in
several experiments is one candidate, never its own rival. Its speed is the median of its
runs, and its noise the larger of the repeats' spread and the spread between the runs.
The Pareto front is the report's `pareto_front` over all rows, ties within noise included.

`recommend` filters those rows by constraints, in the order given, and names the best by an
objective; every other row gets the reason it lost: the first constraint it broke, a figure
that was not measured, a verdict other than pass, or a worse objective. Rows within the
measured noise of the best (``report.differs``) tie with it, and the smallest file of them wins.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import report
from pipeline.errors import BadInput, QpipeError

GATES_PREFIX = "artifacts/gates/"
COLUMNS = ["experiment", "recipe", "format", "size_mb", "bits_per_weight", "ppl_ratio", "mean_kld",
           "top1_agreement", "task_recovery", "prefill_tok_s", "decode_tok_s", "decode_speedup", "ttft_ms", "itl_ms",
           "roofline_fraction", "verdict", "pareto", "accuracy_runtime", "speed_runtime"]
OUTPUT_FORMATS = ("md", "csv", "json")
# figures measured anew in each run, pooled over one candidate's runs
SPEED_COLUMNS = ("prefill_tok_s", "decode_tok_s", "decode_speedup", "ttft_ms", "itl_ms", "roofline_fraction")


# ---------------------------------------------------------------- reading experiments


def dvc_exp_show(*options: str) -> list[dict[str, Any]]:
    result = subprocess.run(["dvc", "exp", "show", "--json", *options], capture_output=True, text=True)
    if result.returncode != 0:
        raise QpipeError("`dvc exp show --json` failed", where="the DVC repository in the current directory",
                         fix=(result.stderr.strip().splitlines() or ["run qpipe from the project root"])[-1])
    return json.loads(result.stdout)


def gate_results(exp_show: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(experiment label, gate result) for every readable gate file in `dvc exp show --json`."""
    found = []

    def collect(label: str, data: dict[str, Any]) -> None:
        for path, entry in sorted((data.get("metrics") or {}).items()):
            if path.startswith(GATES_PREFIX) and "data" in entry and "verdict" in entry["data"]:
                found.append((label, entry["data"]))

    for commit in exp_show:
        label = "workspace" if commit["rev"] == "workspace" else (commit.get("name") or commit["rev"][:7])
        collect(label, commit.get("data") or {})
        for group in commit.get("experiments") or []:
            for experiment in group.get("revs") or []:
                collect(experiment.get("name") or experiment["rev"][:7], experiment.get("data") or {})
    return found


def load_rows(workspace_only: bool, log=print) -> list[dict[str, Any]]:
    """Rows of every gate result: artifacts/gates/ alone, or every commit and experiment. A
    result written with a newer schema than this qpipe reads is left out, and `log` says so."""
    from pipeline import layout

    entries = workspace_results() if workspace_only else gate_results(dvc_exp_show())
    kept = readable(entries, log)
    if not kept:
        raise BadInput("no gate results" + (" this qpipe can read" if entries else ""), where=str(layout.GATES_DIR),
                       fix="upgrade qpipe" if entries else "run `dvc repro` first")
    return compare_rows(kept, stale_workspace(kept, log))


def stale_workspace(entries: list[tuple[str, dict[str, Any]]], log) -> dict[str, str]:
    """recipe -> why the workspace's result is stale against params.yaml and the recipes now
    (``gates.stale``), each named through `log`. Commits and experiments are what `dvc repro`
    made of their own params; only the workspace can hold results older than its params."""
    from pipeline.config import load_params
    from pipeline.gates.stale import FIX, stale_results

    workspace = [result for label, result in entries if label == "workspace"]
    stale = stale_results(workspace, load_params()) if workspace else {}
    for name, reason in stale.items():
        log(f"workspace {name} is stale: {reason}; {FIX}")
    return stale


def workspace_results() -> list[tuple[str, dict[str, Any]]]:
    """("workspace", gate result) for every file in artifacts/gates/."""
    from pipeline import layout
    from pipeline.files import read_json

    return [("workspace", read_json(path)) for path in sorted(layout.GATES_DIR.glob("*.json"))]


def readable(entries: list[tuple[str, dict[str, Any]]], log) -> list[tuple[str, dict[str, Any]]]:
    """The (label, result) entries of a schema this qpipe reads; each other one is named through
    `log` and left out. Results written before there were schema versions are version 1."""
    from pipeline import layout

    kept = []
    for label, result in entries:
        version = result.get("schema_version", 1)
        if version > layout.SCHEMA_VERSION:
            log(f"left out {label} {result.get('recipe')}: its gate result has schema version {version}, this "
                f"qpipe reads up to {layout.SCHEMA_VERSION}; upgrade qpipe to compare it")
        else:
            kept.append((label, result))
    return kept


def compare_rows(entries: list[tuple[str, dict[str, Any]]],
                 stale: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of the report's shape plus `experiment`; an artifact whose gate result is the same
    in several experiments is one row listing all of them. `stale` (recipe -> why) marks the
    workspace's stale results; a row is `stale` only when the result is stale wherever it is."""
    stale = stale or {}
    from pipeline.gates import verdict

    by_experiment: dict[str, list[dict[str, Any]]] = {}  # relative limits are judged within one experiment
    for label, result in entries:
        by_experiment.setdefault(label, []).append(result)
    rows: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for label, result in ((label, result) for label, results in by_experiment.items()
                          for result in verdict.resolve(results)):
        row = {"experiment": label, "experiments": [label], **report.row(result, None),
               "stale": stale.get(result["recipe"]) if label == "workspace" else None}
        key = _candidate_key(label, result)
        if key in seen:
            seen[key]["experiments"].append(label)
            seen[key]["measurements"].append(row)
            if not row["stale"]:
                seen[key]["stale"] = None
            continue
        row["measurements"] = [{**row, "speed_noise": dict(row["speed_noise"])}]  # the pooled row's own noise changes
        seen[key] = row
        rows.append(row)
    for row in rows:
        row["experiment"] = ", ".join(row["experiments"])
        _pool_speed(row, row.pop("measurements"))
    return report.mark_pareto(rows)


def _candidate_key(label: str, result: dict[str, Any]) -> str:
    """One file scored on the same reference with the same verdict is one candidate; a result
    without a file (a refused build) is its experiment's own."""
    accuracy = {k: v for k, v in result["accuracy"].items() if k != "seconds"}
    sha256 = result["artifact"].get("sha256")
    return json.dumps({"sha256": sha256, "accuracy": accuracy, "verdict": result["verdict"], "recipe": result["recipe"],
                       "experiment": None if sha256 else label}, sort_keys=True)


def _pool_speed(row: dict[str, Any], measurements: list[dict[str, Any]]) -> None:
    """Median speed over one candidate's runs; noise = the larger of the repeats' spread and
    the spread between the runs."""
    import statistics

    for column in SPEED_COLUMNS:
        values = [m[column] for m in measurements if m.get(column) is not None]
        if len(values) < 2:
            continue
        row[column] = statistics.median(values)
        if column in row["speed_noise"]:
            within = max((m["speed_noise"].get(column) or 0.0) for m in measurements)
            row["speed_noise"][column] = max(within, statistics.stdev(values))
    row["runs"] = len(measurements)


def sort_rows(rows: list[dict[str, Any]], column: str, descending: bool = False) -> list[dict[str, Any]]:
    if column not in COLUMNS:
        raise BadInput(f"unknown column {column!r}", where="--sort", fix=f"use one of: {', '.join(COLUMNS)}")
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]  # not measured: always last
    return sorted(present, key=lambda r: r[column], reverse=descending) + missing


def render(rows: list[dict[str, Any]], output: str) -> str:
    if output == "json":
        return json.dumps([{c: r.get(c) for c in COLUMNS} for r in rows], indent=2) + "\n"
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if output != "md":
        raise BadInput(f"unknown output format {output!r}", where="--format", fix=f"use one of: {', '.join(OUTPUT_FORMATS)}")
    shown = [c for c in COLUMNS if c not in ("accuracy_runtime", "speed_runtime")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), c) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any, column: str) -> str:
    if column == "pareto":
        return {True: "yes", False: "", None: "n/a"}[value]
    if value is None:
        return "not run"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- recommend


@dataclass
class Constraint:
    flag: str
    column: str
    limit: float
    at_most: bool
    text: str = ""  # the limit as the user wrote it

    def describe(self) -> str:
        return f"{self.flag} {self.text or format(self.limit, 'g')}"

    def broken_by(self, row: dict[str, Any]) -> str | None:
        value = row.get(self.column)
        if value is None:
            return f"{self.column} not measured ({self.flag} needs it)"
        if (value > self.limit) if self.at_most else (value < self.limit):
            shown = f"size {value / 1e6:.1f} MB" if self.column == "bytes" else f"{self.column} {value:.4g}"
            return f"{shown} breaks {self.describe()}"
        return None


# `qpipe recommend`'s constraints that hold no gate limit's figure: flag -> (column, at most)
UNGATED_CONSTRAINTS: dict[str, tuple[str, bool]] = {"--max-size": ("bytes", True),
                                                    "--min-decode": ("decode_tok_s", False)}


def constraint_columns() -> dict[str, tuple[str, bool]]:
    """flag -> (column, at most) of every `qpipe recommend` constraint: the gate limits that name
    one (``config.LIMITS``: the same figure, held the same way), and size and decode speed."""
    from pipeline.config import LIMITS

    return {**UNGATED_CONSTRAINTS, **{limit.recommend_flag: (limit.column, limit.comparison == "<=")
                                      for limit in LIMITS if limit.recommend_flag}}


def constraints(given: dict[str, str | float | None]) -> list[Constraint]:
    """The constraints given (flag -> value as typed; None: not given), in the order given."""
    columns = constraint_columns()
    found = []
    for flag, value in given.items():
        if value is None:
            continue
        column, at_most = columns[flag]
        if column == "bytes":
            found.append(Constraint(flag, column, parse_size(value), at_most, text=value))
        else:
            found.append(Constraint(flag, column, value, at_most))
    return found


# objective -> (column, larger is better)
OBJECTIVES: dict[str, tuple[str, bool]] = {
    "decode": ("decode_tok_s", True),
    "prefill": ("prefill_tok_s", True),
    "kld": ("mean_kld", False),
    "ppl": ("ppl_ratio", False),
    "top1": ("top1_agreement", True),
    "recovery": ("task_recovery", True),
    "size": ("bytes", False),
}


def parse_size(text: str) -> float:
    """'120MB', '1.5 GB', '900MiB', '2e8' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text, re.IGNORECASE)
    if not match:
        raise BadInput(f"not a size: {text!r}", where="--max-size", fix="write it like 120MB, 1.5GB or 900MiB")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    scale = {"b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
    return number * scale[unit]


def recommend(rows: list[dict[str, Any]], constraints: list[Constraint], objective: str) -> dict[str, Any]:
    """The best passing row under the constraints, and why each other row lost."""
    if objective not in OBJECTIVES:
        raise BadInput(f"unknown objective {objective!r}", where="--objective", fix=f"use one of: {', '.join(OBJECTIVES)}")
    if not rows:
        raise BadInput("no gate results to choose from", where="artifacts/gates/ and dvc experiments",
                       fix="run `dvc repro` first")
    column, larger_is_better = OBJECTIVES[objective]
    lost: dict[int, str] = {}
    remaining = list(range(len(rows)))
    last_excluded: tuple[str, list[int]] | None = None

    def exclude(reason_of: Callable[[dict[str, Any]], str | None], what: str) -> None:
        nonlocal remaining, last_excluded
        kept, dropped = [], []
        for i in remaining:
            reason = reason_of(rows[i])
            if reason:
                lost[i] = reason
                dropped.append(i)
            else:
                kept.append(i)
        if dropped and not kept:
            last_excluded = (what, dropped)
        remaining = kept

    exclude(lambda r: f"stale: {r['stale']}" if r.get("stale") else
            None if r["verdict"] == "pass" else f"verdict {r['verdict']}", "verdict pass")
    for constraint in constraints:
        exclude(constraint.broken_by, constraint.describe())
    exclude(lambda r: None if r.get(column) is not None else f"{column} not measured (objective {objective})",
            f"objective {objective} needs {column}")
    if not remaining:
        what, dropped = last_excluded or ("verdict pass", [])
        names = ", ".join(_label(rows[i]) for i in dropped)
        raise BadInput(f"no artifact meets every constraint: {what} excluded the last candidates ({names})",
                       where="qpipe recommend", fix="relax that constraint; `qpipe compare` shows every figure")
    ordered = sorted(remaining, key=lambda i: (-rows[i][column] if larger_is_better else rows[i][column],
                                               rows[i]["bytes"], rows[i]["recipe"]))
    leader = ordered[0]
    tied = [i for i in ordered if not report.differs(rows[i], rows[leader], column)]
    best = min(tied, key=lambda i: (rows[i]["bytes"], rows[i]["recipe"]))
    for i in ordered:
        if i == best:
            continue
        lost[i] = (f"ties with the best on {column} ({rows[i][column]:.4g} vs {rows[best][column]:.4g}, "
                   f"within the measured noise), larger file" if i in tied
                   else f"{column} {rows[i][column]:.4g} vs {rows[best][column]:.4g}")
    return {"best": rows[best], "objective": objective, "column": column,
            "lost": [{"row": rows[i], "reason": lost[i]} for i in range(len(rows)) if i != best]}


def _label(row: dict[str, Any]) -> str:
    return f"{row['recipe']} ({row['experiment']})"


def explain(choice: dict[str, Any]) -> str:
    best = choice["best"]
    lines = [f"best: {_label(best)}: {choice['column']} {best[choice['column']]:.4g}, "
             f"{best['size_mb']:.1f} MB, mean KLD {_cell(best.get('mean_kld'), 'mean_kld')}"]
    lines += [f"  lost: {_label(entry['row'])}: {entry['reason']}" for entry in choice["lost"]]
    return "\n".join(lines) + "\n"
