"""How quantization error moves with position: the accuracy gate's `by_position` figures on
windows longer than the default 512 tokens, in a scratch copy of this project.

    python benchmarks/by_position.py [--windows 10] [--window-tokens 2048] [--recipes gguf-q8_0 gguf-q4_0]

Runs `dvc repro gate@R` for each recipe there (the source, corpus, reference and builds it
needs come first) with params reference {windows, window_tokens} and the default
position_buckets, and prints, per recipe and bucket, the mean KLD with its 95 % interval, the
99.9 % KLD and top-1 agreement. The reference's log-probs take windows x window_tokens x
vocabulary x 2 bytes on disk (2 GB for 10 x 2048 on the embedded model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import scratch_project  # noqa: E402 (beside this script)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window-tokens", type=int, default=2048)
    parser.add_argument("--recipes", nargs="+", default=["gguf-q8_0", "gguf-q4_0"])
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    args = parser.parse_args()
    root = scratch_project.create({"reference": {"windows": args.windows, "window_tokens": args.window_tokens},
                                   "recipes": args.recipes})
    started = time.perf_counter()
    repro = subprocess.run(["dvc", "repro", *(f"gate@{recipe}" for recipe in args.recipes)], cwd=root,
                           env=scratch_project.env(), capture_output=True, text=True)
    print(f"dvc repro: exit {repro.returncode} in {(time.perf_counter() - started) / 60:.1f} min; "
          f"{args.windows} x {args.window_tokens} tokens")
    if repro.returncode:
        print((repro.stdout + repro.stderr)[-3000:], file=sys.stderr)
        return 4
    print(f"{'recipe':<12} {'positions':<11} {'mean KLD':>9} {'95 % interval':>17} {'99.9 % KLD':>10} {'top-1':>6}")
    for recipe in args.recipes:
        accuracy = json.loads((root / "artifacts/gates" / f"{recipe}.json").read_text())["accuracy"]
        for bucket in accuracy["by_position"].values():
            interval = bucket["ci95"]["mean_kld"]
            print(f"{recipe:<12} {bucket['positions']:<11} {bucket['mean_kld']:>9.4f} "
                  f"{interval['low']:>8.4f}–{interval['high']:<8.4f} {bucket['p999_kld']:>10.3f} "
                  f"{bucket['top1_agreement']:>6.3f}")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
