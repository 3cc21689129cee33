"""`dvc repro` timings and the decode roofline fraction per artifact.

- no-change `dvc repro` (target <= 10 s): median of --repeats runs on an up-to-date workspace;
- with --cold: `dvc repro --force` first (every stage re-executed; goal <= 20 min on 2 cores);
- the roofline fraction each GGUF reached in its speed gate (goal >= 0.6).

Run from the project root (`make benchmark`): python benchmarks/repro.py [--cold] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="time `dvc repro --force` first")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.cold:
        print(f"cold dvc repro --force: {timed(['dvc', 'repro', '--force']) / 60:.1f} min")
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
