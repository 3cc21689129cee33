"""GGUF recipes with and without a quantized KV cache, at a long context: what the KV cache costs
in quality by position, and what it buys in decode speed at depth.

    python benchmarks/kv_cache.py --out benchmarks/results/kv-cache-smollm2-135m.json   # measure (about 30 min)
    python benchmarks/kv_cache.py --write     # render the committed results into the README (`make docs`)

Measuring runs, in a scratch copy of this project, `dvc repro gate@R` for every pair of a GGUF
type (--types, each the shipped recipes/gguf-<type>.yaml) and a KV-cache type (--caches: that
recipe with `kv_cache: <cache>`), with params reference {windows, window_tokens} (default 6 x
4096 tokens), the default position buckets, speed.depths [--depth] and the needle probe
(tasks/qpipe_needle.yaml, its first --needles documents: as many at each of its five depths).
Each row is that gate's own figures: mean KLD per position bucket and its 95 % interval, the
99.9 % KLD over all positions, the needles retrieved (and by the unquantized model), decode
tok/s at depth 512 and at --depth (llama-bench -d), and the KV-cache bytes a position takes.
The reference takes windows x window_tokens x vocabulary x 2 bytes of disk (2.4 GB at 6 x 4096
on the embedded model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS)]

import doc_blocks  # noqa: E402 (beside this script)
import scratch_project  # noqa: E402

SCRIPT = Path(__file__).name
RESULTS = BENCHMARKS / "results" / "kv-cache-smollm2-135m.json"


def recipe_name(quant_type: str, cache: str) -> str:
    return f"gguf-{quant_type.lower()}-kv-{cache}"


def measure(args) -> dict:
    from memory_estimate import host_line

    recipes = [(quant_type, cache, recipe_name(quant_type, cache)) for quant_type in args.types
               for cache in args.caches]
    root = scratch_project.create({"reference": {"windows": args.windows, "window_tokens": args.window_tokens},
                                   "speed": {"depths": [args.depth]}, "recipes": [name for *_, name in recipes],
                                   "tasks": [{"name": "qpipe_needle", "limit": args.needles}]})
    for quant_type, cache, name in recipes:
        shipped = (REPO / "recipes" / f"gguf-{quant_type.lower()}.yaml").read_text()
        (root / "recipes" / f"{name}.yaml").write_text(f"kv_cache: {cache}\n{shipped}")
    started = time.perf_counter()
    repro = subprocess.run(["dvc", "repro", *(f"gate@{name}" for *_, name in recipes)], cwd=root,
                           env=scratch_project.env(), capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    if repro.returncode:
        print((repro.stdout + repro.stderr)[-3000:], file=sys.stderr)
        raise SystemExit(4)
    rows = []
    (base_needle,) = json.loads((root / "artifacts/tasks/base.json").read_text())["tasks"]
    for quant_type, cache, name in recipes:
        gate = json.loads((root / "artifacts/gates" / f"{name}.json").read_text())
        accuracy, speed, (needle,) = gate["accuracy"], gate["speed"], gate["tasks"]["tasks"]
        at_depth = speed["by_depth"]["depths"][str(args.depth)]
        context = args.depth + speed["gen_tokens"] / 2  # the mean decode context of the roofline's bytes
        rows.append({
            "recipe": name, "type": quant_type, "kv_cache": cache, "bytes": gate["artifact"]["bytes"],
            "mean_kld": accuracy["mean_kld"], "p999_kld": accuracy["p999_kld"],
            "by_position": {label: {"mean_kld": bucket["mean_kld"], "ci95": bucket["ci95"]["mean_kld"],
                                    "p999_kld": bucket["p999_kld"], "top1_agreement": bucket["top1_agreement"]}
                            for label, bucket in accuracy["by_position"].items()},
            "needle": needle["score"], "needle_documents": needle["samples"],
            "speed_status": speed["status"], "decode_tok_s": speed["decode_tok_s"],
            "decode_at_depth_tok_s": at_depth["decode_tok_s"], "decode_at_depth_stdev": at_depth["stdev"],
            "roofline_fraction_at_depth": at_depth["roofline_fraction"],
            "kv_bytes_per_token_at_depth": at_depth["kv_cache_bytes"],
            "kv_bytes_per_position": at_depth["kv_cache_bytes"] / context,
        })
    if not args.keep:
        shutil.rmtree(root)
    command = "python benchmarks/kv_cache.py " + " ".join(sys.argv[1:])
    return {"command": command, "host": host_line(), "windows": args.windows, "window_tokens": args.window_tokens,
            "depth": args.depth, "minutes": round(minutes, 1), "base_needle": base_needle["score"], "rows": rows}


def table(results: dict) -> str:
    labels = list(results["rows"][0]["by_position"])
    depth = results["depth"]
    lines = ["| GGUF | KV cache | " + " | ".join(f"KLD {label}" for label in labels)
             + f" | 99.9 % KLD | needles | decode at 512 | decode at {depth} | KV bytes / position |",
             "|---" * (len(labels) + 7) + "|"]
    for row in results["rows"]:
        cells = [f"{bucket['mean_kld']:.4f} ({bucket['ci95']['low']:.4f}–{bucket['ci95']['high']:.4f})"
                 for bucket in row["by_position"].values()]
        speed_note = "" if row["speed_status"] == "ok" else f" ({row['speed_status']})"  # one measurement
        lines.append(f"| {row['type']} | {row['kv_cache']} | " + " | ".join(cells)
                     + f" | {row['p999_kld']:.3f} | {row['needle']:.2f} | {row['decode_tok_s']:.1f}{speed_note} | "
                       f"{row['decode_at_depth_tok_s']:.1f} ± {row['decode_at_depth_stdev']:.1f}{speed_note} | "
                       f"{row['kv_bytes_per_position']:,.0f} |")
    needles = results["rows"][0]["needle_documents"]
    lines += ["", f"{results['windows']} windows x {results['window_tokens']} tokens of the evaluation text, full "
                  f"vocabulary KLD against the fp32 reference (95 % interval over windows); needles: the share of "
                  f"{needles} numbers retrieved at 4096 tokens (unquantized model: {results['base_needle']:.2f}); "
                  f"decode tok/s from "
                  f"llama-bench (tg at depth 512 and {depth}, ± its sd); {results['host']}; "
                  f"`{results['command']}` ({results['minutes']:.0f} min)."]
    return "\n".join(lines) + "\n"


def render() -> str:
    return table(json.loads(RESULTS.read_text()))


# (doc, name of the block, the function that renders it)
BLOCKS = [(REPO / "README.md", "kv-cache", render)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="only render the committed results into the README")
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--caches", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--window-tokens", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4096)
    parser.add_argument("--needles", type=int, default=10, help="needle documents (a multiple of five keeps the "
                        "depths even)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    args = parser.parse_args()
    if args.write:
        doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=True)
        return 0
    results = measure(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
