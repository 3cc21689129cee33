"""Each heavy stage's memory estimate (pipeline/memory.py) against its measured peak RSS.

Runs the reference, build and gate stages of the chosen recipes one by one in a scratch copy of
the project (benchmarks/scratch_project.py) and prints, per stage, the estimate made before
loading and the peak resident memory the stage reached (the kernel's maxrss of the stage's
process tree). An estimate should sit above the peak: below it, a host could be told a stage
fits and then be killed.

    python benchmarks/memory_estimate.py                      # the embedded model
    python benchmarks/memory_estimate.py --model /path/to/ckpt --recipes gguf-q8_0 trtllm-fp8
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import scratch_project

DEFAULT_RECIPES = ["gguf-q8_0", "gguf-iq4_xs", "awq-w4a16", "trtllm-fp8", "trtllm-int8-wo"]


# Linux starts a new process's peak RSS at the RSS of the process it was forked from (exec
# keeps the pre-exec high-water mark), so a stage started from this benchmark, which holds
# gigabytes after writing a checkpoint, would report at least that. A small launcher process
# starts the stage instead and reports the stage's own peak (with its children's).
LAUNCHER = ("import os, subprocess, sys; process = subprocess.Popen(sys.argv[2:]); "
            "_, status, usage = os.wait4(process.pid, 0); open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
            "sys.exit(os.waitstatus_to_exitcode(status))")


def measured(args: list[str], cwd, env) -> tuple[float, float]:
    """(peak RSS in GB of the command and its children, seconds)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, tempfile.NamedTemporaryFile("r") as peak_kib:
        # a file, not a pipe: a pipe would fill up and stall the stage
        process = subprocess.run([sys.executable, "-c", LAUNCHER, peak_kib.name, *args], cwd=cwd, env=env,
                                 stdout=log, stderr=log, text=True)
        if process.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(args)} failed:\n{log.read()[-2000:]}")
        peak = int(peak_kib.read())
    return peak * 1024 / 1e9, time.perf_counter() - started


def stage_rows(root, recipes: list[str], env) -> Iterator[tuple[str, float | None, float, float]]:
    """Run the reference, then each recipe's build, the baseline, then each gate, one process
    at a time in the project at `root`; yield (stage, estimate GB, peak RSS GB, seconds) as each
    finishes. The estimate is the one the stage made before loading (None where it made none)."""
    peak, seconds = measured(["qpipe", "reference"], root, env)
    run = json.loads((root / "artifacts/runs/reference.json").read_text())
    yield "reference", run["memory"]["estimate_gb"], peak, seconds
    for recipe in recipes:
        measured(["qpipe", "recipe", recipe], root, env)
        peak, seconds = measured(["qpipe", "build", recipe], root, env)
        build = json.loads((root / f"artifacts/builds/{recipe}/build.json").read_text())
        if build.get("status") == "refused":
            print(f"build {recipe}: refused ({build['reason']})")
            continue
        run = json.loads((root / f"artifacts/runs/build@{recipe}.json").read_text())
        yield f"build {recipe}", run["memory"]["estimate_gb"], peak, seconds
    measured(["qpipe", "formats"], root, env)
    peak, seconds = measured(["qpipe", "baseline"], root, env)
    yield "baseline", None, peak, seconds
    for recipe in recipes:
        if not (root / f"artifacts/builds/{recipe}/build.json").is_file():
            continue
        measured(["qpipe", "engine", recipe], root, env)
        peak, seconds = measured(["qpipe", "gate", recipe], root, env)
        gate = json.loads((root / f"artifacts/gates/{recipe}.json").read_text())
        yield f"gate {recipe}", gate["memory"]["estimate_gb"], peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m", help="params model.source")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--windows", type=int, default=8, help="reference.windows (x 512 tokens)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project (default: deleted at the end)")
    args = parser.parse_args()

    root = scratch_project.create({"model": {"source": args.model}, "recipes": args.recipes,
                                   "reference": {"windows": args.windows}})
    try:
        print_rows(args.model, args.recipes, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"(deleted the scratch project, {root}; --keep keeps it)")


def print_rows(model: str, recipes: list[str], root: Path) -> None:
    env = scratch_project.env()
    for stage in (["host"], ["source"], ["corpus"]):
        measured(["qpipe", *stage], root, env)
    source = json.loads((root / "artifacts/source/source.json").read_text())
    print(f"model: {model} ({source['architectures']}, {source['parameters'] / 1e6:.1f}M parameters)")
    print(f"{'stage':<26} {'estimate GB':>11} {'peak RSS GB':>11} {'estimate/peak':>13} {'seconds':>8}")
    for label, estimate_gb, peak_gb, seconds in stage_rows(root, recipes, env):
        if estimate_gb is not None:
            print(f"{label:<26} {estimate_gb:11.2f} {peak_gb:11.2f} {estimate_gb / peak_gb:13.2f} {seconds:8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
