"""Each heavy stage's memory estimate (pipeline/memory.py) against its measured peak.

Runs the reference, build and gate stages of the chosen recipes one by one in a scratch copy of
the project (benchmarks/scratch_project.py) and prints, per stage, the estimate made before
loading and the peak memory the stage reached (benchmarks/peak_memory.py: the larger of its
largest process's peak RSS and its process tree's summed PSS). An estimate should sit above
the peak: below it, a host could be told a stage fits and then be killed. For the embedded
model it writes benchmarks/results/memory-smollm2-135m.json, which benchmarks/memory_table.py
renders into docs/methodology.md.

    python benchmarks/memory_estimate.py                      # the embedded model
    python benchmarks/memory_estimate.py --model /path/to/ckpt --recipes gguf-q8_0 trtllm-fp8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import scratch_project

DEFAULT_RECIPES = ["gguf-q8_0", "gguf-iq4_xs", "awq-w4a16", "trtllm-fp8", "trtllm-int8-wo"]


RESULTS = Path(__file__).resolve().parent / "results"
PEAK_MEMORY = Path(__file__).resolve().parent / "peak_memory.py"


def measured(args: list[str], cwd, env) -> dict[str, float]:
    """The command's peak memory in GB (benchmarks/peak_memory.py: the larger of its largest
    process's peak RSS and its process tree's summed PSS, each also given, with the tree's
    anonymous part) and its seconds."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, tempfile.NamedTemporaryFile("r") as peaks:
        # a file, not a pipe: a pipe would fill up and stall the stage
        process = subprocess.run([sys.executable, str(PEAK_MEMORY), peaks.name, *args], cwd=cwd, env=env,
                                 stdout=log, stderr=log, text=True)
        if process.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(args)} failed:\n{log.read()[-2000:]}")
        peak = json.loads(peaks.read())
    max_rss, tree_pss = peak["max_rss"] / 1e9, peak["tree_pss"] / 1e9
    return {"peak_gb": round(max(max_rss, tree_pss), 3), "max_rss_gb": round(max_rss, 3),
            "tree_pss_gb": round(tree_pss, 3), "tree_anonymous_gb": round(peak["tree_anonymous"] / 1e9, 3),
            "seconds": round(time.perf_counter() - started, 1)}


def stage_rows(root, recipes: list[str], env) -> Iterator[dict]:
    """Run the reference, then each recipe's build, the baseline, then each gate, one process
    at a time in the project at `root`; yield each stage's row as it finishes: its kind, recipe
    and format, the measured peaks and seconds, the estimate the stage made before loading and
    what that estimate was made of (the stage's ``memory.Need`` inputs; none for the baseline)."""
    from pipeline import formats

    def row(stage: str, recipe: str | None, memory_record: dict | None, measurement: dict) -> dict:
        return {"stage": stage, "recipe": recipe, "format": recipe and formats.load_recipe(recipe).format,
                **measurement, "estimate_gb": (memory_record or {}).get("estimate_gb"),
                "inputs": (memory_record or {}).get("inputs")}

    measurement = measured(["qpipe", "reference"], root, env)
    yield row("reference", None, read_json(root / "artifacts/runs/reference.json")["memory"], measurement)
    for recipe in recipes:
        measured(["qpipe", "recipe", recipe], root, env)
        measurement = measured(["qpipe", "build", recipe], root, env)
        build = read_json(root / f"artifacts/builds/{recipe}/build.json")
        if build.get("status") == "refused":
            print(f"build {recipe}: refused ({build['reason']})")
            continue
        yield row("build", recipe, read_json(root / f"artifacts/runs/build@{recipe}.json")["memory"], measurement)
    measured(["qpipe", "formats"], root, env)
    yield row("baseline", None, None, measured(["qpipe", "baseline"], root, env))
    for recipe in recipes:
        if not (root / f"artifacts/builds/{recipe}/build.json").is_file():
            continue
        measured(["qpipe", "engine", recipe], root, env)
        measurement = measured(["qpipe", "gate", recipe], root, env)
        yield row("gate", recipe, read_json(root / f"artifacts/gates/{recipe}.json")["memory"], measurement)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def print_header(layers: int | None = None) -> None:
    print(f"{'stage':<26} {'estimate GB':>11} {'peak GB':>8} {'(max RSS':>8} {'tree PSS)':>9} {'anon':>6} "
          f"{'est/peak':>8} {'seconds':>8}" + (f" {'s/layer':>8}" if layers else ""))


def print_row(row: dict, layers: int | None = None) -> None:
    label = " ".join(part for part in (row["stage"], row["recipe"]) if part)
    estimate, ratio = ((f"{row['estimate_gb']:11.2f}", f"{row['estimate_gb'] / row['peak_gb']:8.2f}")
                       if row["estimate_gb"] is not None else (f"{'-':>11}", f"{'-':>8}"))
    print(f"{label:<26} {estimate} {row['peak_gb']:8.2f} {row['max_rss_gb']:8.2f} {row['tree_pss_gb']:9.2f} "
          f"{row['tree_anonymous_gb']:6.2f} {ratio} {row['seconds']:8.1f}"
          + (f" {row['seconds'] / layers:8.2f}" if layers else ""), flush=True)


def write_results(name: str, description: dict, rows: list[dict]) -> Path:
    """benchmarks/results/memory-<name>.json: what benchmarks/memory_table.py renders into
    docs/methodology.md, the estimates recomputed there from the rows' inputs."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"memory-{name}.json"
    path.write_text(json.dumps({**description, "host": host_line(), "stages": rows}, indent=1) + "\n")
    return path


def host_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{cpu}, {os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB"


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
        print_rows(args.model, args.recipes, root, args.windows)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"(deleted the scratch project, {root}; --keep keeps it)")


def print_rows(model: str, recipes: list[str], root: Path, windows: int) -> None:
    env = scratch_project.env()
    for stage in (["host"], ["source"], ["corpus"]):
        measured(["qpipe", *stage], root, env)
    source = read_json(root / "artifacts/source/source.json")
    print(f"model: {model} ({source['architectures']}, {source['parameters'] / 1e6:.1f}M parameters)")
    print_header()
    description = {"model": "SmolLM2-135M", "parameters": source["parameters"], "layers": None,
                   "command": "python benchmarks/memory_estimate.py " + " ".join(sys.argv[1:]),
                   "settings": f"{windows} x 512-token windows, float32 reference, the recipes' own calibration"}
    rows = []
    for row in stage_rows(root, recipes, env):
        print_row(row)
        rows.append(row)
        if model == "embedded:smollm2-135m":
            write_results("smollm2-135m", description, rows)


if __name__ == "__main__":
    main()
