"""The default recipes on a checkpoint you give: every format built and gated, then the table.

    python benchmarks/any_checkpoint.py /path/to/hf-checkpoint [--windows 40] [--recipes ...]

Runs `dvc repro --keep-going` in a scratch copy of this project (benchmarks/scratch_project.py)
with params `model.source` set to the directory, so the real workspace is untouched. Prints
the wall time, the seconds per accuracy window of each gate, each recipe's verdict with its
reasons (a recipe refused for this model says why), and the report's tradeoff table. The seconds
per window are the accuracy section's seconds over the window count, so they include one
tokenizer alignment of the whole evaluation text.
Exit 0 when every recipe passed, 1 otherwise, like `qpipe check`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import scratch_project


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint directory")
    parser.add_argument("--windows", type=int, default=40, help="reference.windows (x reference.window_tokens)")
    parser.add_argument("--recipes", nargs="+", help="default: the recipes in params.yaml")
    parser.add_argument("--project", type=Path, help="where to make the scratch project (default: a temp dir)")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        print(f"error: no config.json in {args.checkpoint} | fix: give a Hugging Face checkpoint directory",
              file=sys.stderr)
        return 2

    changes = {"model": {"source": str(args.checkpoint.resolve())}, "reference": {"windows": args.windows}}
    if args.recipes:
        changes["recipes"] = args.recipes
    root = scratch_project.create(changes, args.project)
    print(f"scratch project: {root}", flush=True)
    started = time.perf_counter()
    repro = subprocess.run(["dvc", "repro", "--keep-going"], cwd=root, env=scratch_project.env(),
                           capture_output=True, text=True)
    wall = time.perf_counter() - started
    (root / "repro.log").write_text(repro.stdout + repro.stderr)
    print(f"dvc repro --keep-going: exit {repro.returncode} in {wall / 60:.1f} min (log: {root / 'repro.log'})")

    source = json.loads((root / "artifacts/source/source.json").read_text())
    print(f"model: {source['architectures']} ({source['model_type']}), {source['parameters'] / 1e6:.0f}M parameters")
    recipes = args.recipes or scratch_project.yaml.safe_load((root / "params.yaml").read_text())["recipes"]
    windows = json.loads((root / "artifacts/reference/reference.json").read_text())["windows"]
    tradeoff = root / "artifacts/report/tradeoff.json"
    # the report's verdicts: relative limits judged across recipes
    rows = {r["recipe"]: r for r in json.loads(tradeoff.read_text())["rows"]} if tradeoff.is_file() else {}
    # the accuracy section's seconds: every window's scoring plus one tokenizer alignment of the text
    print(f"\n{'recipe':<16} {'verdict':<10} {'s/window':>8}  reasons   (s/window: accuracy seconds / windows)")
    all_passed = True
    for name in recipes:
        gate_file = root / "artifacts/gates" / f"{name}.json"
        if name not in rows or not gate_file.is_file():
            all_passed = False
            print(f"{name:<16} {'no result':<10} {'':>8}  a stage failed: see repro.log")
            continue
        accuracy = json.loads(gate_file.read_text())["accuracy"]
        per_window = f"{accuracy['seconds'] / windows:.2f}" if accuracy.get("status") == "ok" else ""
        all_passed &= rows[name]["verdict"] == "pass"
        print(f"{name:<16} {rows[name]['verdict']:<10} {per_window:>8}  {'; '.join(rows[name]['reasons'])}")
    report = root / "artifacts/report/tradeoff.md"
    if report.is_file():
        print("\n" + report.read_text())
    return 0 if all_passed and repro.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
