"""The memory tables of the docs, from the committed measurements and the code.

    python benchmarks/memory_table.py            # print both tables
    python benchmarks/memory_table.py --write    # put them into the docs (`make docs` runs this)
    python benchmarks/memory_table.py --fit      # suggest each stage's least factors from the peaks

- docs/methodology.md "Memory": every peak measured by benchmarks/memory_estimate.py and
  benchmarks/scale.py (benchmarks/results/memory-*.json) against the estimate the current
  factors make from the same inputs (the ``memory.Need`` each stage recorded). After a refit of
  the factors it shows at once whether every estimate still sits above every peak, and by how
  much; a test fails where one does not.
- docs/checkpoints.md "An 8B checkpoint on your host": what `qpipe doctor --checkpoint` estimates
  on a CPU host for published configs (benchmarks/scale.py's), nothing loaded.

A test checks that the docs hold what this prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
sys.path[:0] = [str(BENCHMARKS), str(REPO)]

import doc_blocks  # noqa: E402 (beside this script)

# the measured table's rows: (stage, format), in pipeline order
MEASURED_ROWS = [("reference", None), ("build", "gguf"), ("build", "awq"), ("build", "modelopt"),
                 ("gate", "gguf"), ("gate", "awq"), ("gate", "modelopt")]
FORMAT_NAMES = {"gguf": "GGUF", "awq": "AWQ", "modelopt": "ModelOpt"}
# an estimate more than this far above its peak is listed under the table
SLACK = 1.25
# --fit keeps every estimate this far above its peak: a stage's peak moves by a few per cent
# between runs (the AWQ build at Llama-3.2-1B's shape: 7.78 and 7.53 GB)
MARGIN = 1.05
DOCTOR_MODELS = ["llama-3.1-8b", "qwen2.5-7b"]


def measurements() -> list[dict]:
    """The committed results files, smallest model first."""
    return sorted((json.loads(path.read_text()) for path in RESULTS.glob("memory-*.json")),
                  key=lambda result: result["parameters"])


def current_estimate(row: dict) -> float:
    """GB the current factors estimate for a measured stage, from the inputs it recorded."""
    from pipeline import memory

    inputs = dict(row["inputs"])
    size = memory.ModelSize(inputs.pop("parameters"), inputs.pop("vocabulary"), inputs.pop("largest_tensor"))
    return memory.Need(factors_of(row["stage"], row["format"], row["recipe"]), size, **inputs).bytes / 1e9


def estimated_rows(result: dict) -> list[tuple[dict, float]]:
    """(row, current estimate in GB) for each stage of `result` that made a CPU estimate."""
    return [(row, current_estimate(row)) for row in result["stages"]
            if row["inputs"] and row["inputs"]["device"] == "cpu"]


def measured_table() -> str:
    results = [(result, estimated_rows(result)) for result in measurements()]
    header = "| stage | " + " | ".join(f"{r['model']}, {r['parameters'] / 1e9:.2f}B" for r, _ in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    for stage, fmt in MEASURED_ROWS:
        cells = []
        for _, rows in results:
            entries = [f"{_short(row['recipe'])}{estimate:.2f} / {row['peak_gb']:.2f} ({estimate / row['peak_gb']:.2f})"
                       for row, estimate in rows if row["stage"] == stage and row["format"] == fmt]
            cells.append("; ".join(entries))
        if any(cells):
            lines.append(f"| {stage}{' ' + FORMAT_NAMES[fmt] if fmt else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _exceptions(results)


def _short(recipe: str | None) -> str:
    return f"{recipe.split('-', 1)[1]} " if recipe else ""


def _exceptions(results: list[tuple[dict, list[tuple[dict, float]]]]) -> str:
    below, loose = [], []
    for result, rows in results:
        for row, estimate in rows:
            ratio = estimate / row["peak_gb"]
            label = f"{row['stage']} {row['recipe'] or ''} at {result['model']} ({ratio:.2f})".replace("  ", " ")
            if ratio < 1:
                below.append(label)
            elif ratio > SLACK:
                loose.append(label)
    lines = [f"Below its peak: {', '.join(below)}." if below else "Every estimate is above its peak.",
             f"More than {SLACK - 1:.0%} above it: {', '.join(loose)}." if loose
             else f"None is more than {SLACK - 1:.0%} above it."]
    return "\n".join(lines) + "\n\nMeasured by:\n" + "".join(
        f"- {result['model']}: `{result['command']}` ({result['settings']}; {result['host']})\n"
        for result, _ in results)


def factors_of(stage: str, fmt: str | None, recipe: str | None):
    """The current factors of a measured stage (a build's may depend on its recipe)."""
    from pipeline import formats, memory

    if stage == "reference":
        return memory.REFERENCE
    info = formats.module(fmt).INFO
    if stage == "gate":
        return info.gate_memory
    return formats.load_recipe(recipe, REPO / "recipes").build_memory(info.build_memory)


def suggest_factors() -> list[str]:
    """For each set of factors, the overhead (on a 0.05 GiB grid) and the least bytes per
    parameter that keep every estimate MARGIN above its peak with the lowest worst ratio, the
    per-logit factor kept: a starting point for the factors in pipeline/memory.py and the
    formats' INFO.
    Stages whose factors are not one slope per parameter (several phases, or a largest-tensor
    term) are left to be fitted by hand against the table."""
    from pipeline import memory

    lines = []
    groups: dict[tuple, list[dict]] = {}
    for result in measurements():
        for row in result["stages"]:
            if row["inputs"] and row["inputs"]["device"] == "cpu":
                key = (row["stage"], row["format"] or "", factors_of(row["stage"], row["format"], row["recipe"]))
                groups.setdefault(key, []).append(row)
    for (stage, fmt, current), rows in groups.items():
        recipes = sorted({row["recipe"] for row in rows if row["recipe"]})
        label = f"{stage} {fmt} ({', '.join(recipes)})" if recipes else stage
        if not isinstance(current, memory.Factors) or current.per_largest_tensor:
            lines.append(f"{label}: by hand, against the table (its factors: {current})")
            continue
        best = None
        for step in range(5, 41):
            overhead = step * 0.05 * memory.GIB
            fixed = [overhead + current.per_logit * row["inputs"]["window_tokens"] * row["inputs"]["vocabulary"]
                     + row["inputs"]["mapped_bytes"] for row in rows]
            weights = [memory.DTYPE_BYTES[row["inputs"]["dtype"]] * row["inputs"]["parameters"] for row in rows]
            slope = max(0.0, *((MARGIN * row["peak_gb"] * 1e9 - rest) / weight
                                for row, rest, weight in zip(rows, fixed, weights)))
            slope = math.ceil(slope * 20) / 20
            worst = max((rest + slope * weight) / (row["peak_gb"] * 1e9)
                        for row, rest, weight in zip(rows, fixed, weights))
            if best is None or worst < best[0]:
                best = (worst, overhead, slope)
        worst, overhead, slope = best
        lines.append(f"{label}: now {current.overhead / memory.GIB:.2f} GiB + {current.per_parameter:.2f} "
                     f"B/param/byte; suggested {overhead / memory.GIB:.2f} GiB + {slope:.2f} (worst ratio "
                     f"{worst:.2f}, {len(rows)} peaks)")
    return lines


def doctor_table() -> str:
    """`qpipe doctor --checkpoint`'s estimates on a CPU host for each DOCTOR_MODELS config and
    the default params, in GB: one row per stage, a range where a format's recipes differ."""
    import scale
    from pipeline import cli, config, formats, reference

    params = config.load_params(REPO / "params.yaml")
    format_of = {name: FORMAT_NAMES[formats.load_recipe(name).format] for name in params.recipes}
    reference_label = "reference, fp32 (the default) / `reference.dtype: bfloat16`"
    columns = []
    for model in DOCTOR_MODELS:
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = Path(directory)
            scale.write_config(model, checkpoint, None)
            needs = {reference_label: [reference.memory_need(params.reference.model_copy(update={"dtype": dtype}),
                                                             checkpoint, "cpu").bytes / 1e9
                                       for dtype in ("float32", "bfloat16")]}
            for stage, need in cli.stage_needs(checkpoint, params, device="cpu", gpu=False)[1:]:
                kind, recipe = stage.split(" ", 1)
                needs.setdefault(f"{kind} {format_of[recipe]}", []).append(need.bytes / 1e9)
            columns.append(needs)
    lines = ["| stage | " + " | ".join(DOCTOR_MODELS) + " |", "|---" * (len(DOCTOR_MODELS) + 1) + "|"]
    for label in columns[0]:
        cells = []
        for needs in columns:
            values = needs[label]
            if label == reference_label:
                cells.append(" / ".join(f"{value:.1f}" for value in values))
            else:
                low, high = min(values), max(values)
                cells.append(f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SCRIPT = Path(__file__).name
# (doc, name of the block, the function that renders it)
BLOCKS = [(REPO / "docs/methodology.md", "measured", measured_table),
          (REPO / "docs/checkpoints.md", "doctor", doctor_table)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the tables in the docs")
    parser.add_argument("--fit", action="store_true", help="suggest each stage's factors from the measured peaks")
    args = parser.parse_args()
    if args.fit:
        print("\n".join(suggest_factors()))
        return
    doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=args.write)


if __name__ == "__main__":
    main()
