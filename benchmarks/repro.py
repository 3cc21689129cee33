"""`dvc repro` timings and the decode roofline fraction per artifact.

- no-change `dvc repro` (target <= 10 s): median of --repeats runs on an up-to-date workspace;
- with --cold: `dvc repro --force` first (every stage re-executed; goal <= 15 min on 2 cores),
  timed stage by stage: each stage runs from DVC's "Running stage" line to the next one, so
  DVC's own work between stages is counted in the stage before it;
- the roofline fraction each GGUF reached in its speed gate (goal >= 0.6);
- with --runs, nothing is run: the seconds each stage of the last repro recorded about its own
  run (artifacts/runs/*.json, `wall_s`: the stage's process from its start of work, without
  DVC's own work between stages), by kind.

Run from the project root (`make benchmark`): python benchmarks/repro.py [--cold | --runs] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def cold_by_stage() -> None:
    """`dvc repro --force`, with each stage's seconds from the times its lines appear."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro", "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        match = STAGE_LINE.search(line)
        if match:
            marks.append((match.group(1), time.perf_counter()))
    if process.wait() != 0:
        raise SystemExit(f"dvc repro --force exited with {process.returncode}")
    ended = time.perf_counter()
    seconds = {stage: (marks[i + 1][1] if i + 1 < len(marks) else ended) - at for i, (stage, at) in enumerate(marks)}
    print(f"{'stage':<28} {'seconds':>8}")
    for stage, value in seconds.items():
        print(f"{stage:<28} {value:8.1f}")
    print_kinds(seconds)
    print(f"cold dvc repro --force: {(ended - started) / 60:.1f} min")


def print_kinds(seconds: dict[str, float]) -> None:
    groups: dict[str, list[float]] = {}
    for stage, value in seconds.items():
        groups.setdefault(stage.split("@")[0], []).append(value)
    print("\nby kind: " + ", ".join(f"{kind} {sum(values):.0f} s" + (f" ({len(values)} x {statistics.mean(values):.0f} s, "
                                                                     f"{min(values):.0f}-{max(values):.0f})"
                                                                     if len(values) > 1 else "")
                                     for kind, values in groups.items()))


def recorded_seconds() -> None:
    """Each stage's own seconds from its run record, by kind, and their sum."""
    seconds = {}
    for record_file in sorted(Path("artifacts/runs").glob("*.json")):
        record = json.loads(record_file.read_text())
        seconds[record["stage"]] = record["wall_s"]
    print(f"{'stage':<28} {'seconds':>8}")
    for stage, value in seconds.items():
        print(f"{stage:<28} {value:8.1f}")
    print_kinds(seconds)
    print(f"sum of the stages' own seconds: {sum(seconds.values()) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="time `dvc repro --force` first")
    parser.add_argument("--runs", action="store_true", help="only print the last repro's stage seconds from the "
                        "run records")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.runs:
        recorded_seconds()
        return
    if args.cold:
        cold_by_stage()
    else:
        timed(["dvc", "repro"])  # bring the workspace up to date first
    times = [timed(["dvc", "repro"]) for _ in range(args.repeats)]
    print(f"no-change dvc repro: median {statistics.median(times):.1f} s (runs: {', '.join(f'{t:.1f}' for t in times)})")

    print(f"\n{'recipe':<14} {'decode tok/s':>12} {'roofline tok/s':>14} {'fraction':>8}")
    for gate_file in sorted(Path("artifacts/gates").glob("*.json")):
        speed = json.loads(gate_file.read_text())["speed"]
        if speed.get("status") != "ok":
            print(f"{gate_file.stem:<14} not run: {speed.get('reason')}")
            continue
        print(f"{gate_file.stem:<14} {speed['decode_tok_s']:12.1f} {speed['roofline_tok_s']:14.1f} "
              f"{speed['roofline_fraction']:8.2f}")


if __name__ == "__main__":
    main()
