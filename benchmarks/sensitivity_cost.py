"""What the sensitivity stage costs, against one calibration pass of the AWQ build, side by side.

1. For each format of --formats, the sensitivity stage itself (pipeline.sensitivity.run, the
   project's params.yaml sensitivity windows), timed from loading to the written record.
2. A sample of --sample groups spread over the model, measured again both ways: each pass
   started at its group's decoder layer (what the stage does) and the whole model run for every
   pass (``replay_layers=False``). The figures must be equal; the seconds say what starting at
   the group's layer saves.
3. The --awq recipe's build, and its calibration pass (``quantize_s``: llm-compressor's
   oneshot, AWQ's scale search over the recipe's calibration samples).

    python benchmarks/sensitivity_cost.py --out benchmarks/results/sensitivity-cost-smollm2-135m.json

Needs `dvc repro source corpus` first. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]


def sample_comparison(format_name: str, params, count: int, threads: int) -> dict:
    """`count` groups spread over the model (the output layer among them where it is its own
    group), measured with passes started at each group's layer and with whole passes."""
    import torch
    from transformers import AutoTokenizer

    from pipeline import formats, layout, sensitivity
    from pipeline.corpus import calibration_windows
    from pipeline.runtimes.transformers import load_causal_lm

    fmt = formats.module(format_name)
    tokenizer = AutoTokenizer.from_pretrained(layout.SOURCE_DIR)
    windows = calibration_windows(tokenizer, layout.CALIBRATION_TEXT, params.windows, params.window_tokens,
                                  "params.yaml: sensitivity")
    model = load_causal_lm(layout.SOURCE_DIR, dtype=getattr(torch, params.dtype)).eval()
    groups, _ = sensitivity.groups_of((name, tuple(p.shape)) for name, p in model.named_parameters())
    step = max(1, len(groups) // count)
    sample = groups[::step][:count - 1] + groups[-1:]
    candidates = {group.name: fmt.search_candidates(group, params.types.get(format_name)) for group in sample}
    figures, seconds = {}, {}
    for replay in (True, False):
        started = time.perf_counter()
        figures[replay] = sensitivity.measure(
            model, windows, sample, candidates, lambda w, t: fmt.search_round_trip(w, t, threads=threads),
            unquantized_type=fmt.SEARCH_UNQUANTIZED, input_round_trip=getattr(fmt, "search_input_round_trip", None),
            replay_layers=replay)
        seconds[replay] = time.perf_counter() - started
    differences = [abs(figures[True][group][type_name] - figures[False][group][type_name])
                   for group in figures[True] for type_name in figures[True][group]]
    return {"groups": [group.name for group in sample], "passes": sum(map(len, candidates.values())),
            "replayed_s": round(seconds[True], 1), "whole_s": round(seconds[False], 1),
            "largest_difference": max(differences), "identical": figures[True] == figures[False]}


def awq_calibration(recipe_name: str, scratch: Path, threads: int) -> dict:
    from pipeline import formats, layout

    recipe = formats.load_recipe(recipe_name)
    out_dir = scratch / recipe_name
    out_dir.mkdir(parents=True)
    facts = formats.module(recipe.format).build(recipe, source_dir=layout.SOURCE_DIR,
                                                calibration_text=layout.CALIBRATION_TEXT,
                                                out_dir=out_dir, threads=threads, log=print)
    return {"recipe": recipe_name, "calibration": facts["calibration"],
            "quantize_s": round(facts["timings_s"]["quantize_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["gguf", "awq", "modelopt"])
    parser.add_argument("--sample", type=int, default=6, help="groups measured both ways (0: none)")
    parser.add_argument("--awq", default="awq-w4a16", help="the AWQ recipe whose calibration pass is the yardstick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    from memory_estimate import host_line

    from pipeline import layout, sensitivity
    from pipeline.config import load_params

    params = load_params().sensitivity
    record = {"command": "python benchmarks/sensitivity_cost.py " + " ".join(sys.argv[1:]), "host": host_line(),
              "windows": params.windows, "window_tokens": params.window_tokens, "dtype": params.dtype, "formats": {}}
    with tempfile.TemporaryDirectory(prefix="qpipe-sensitivity-cost-") as scratch:
        scratch = Path(scratch)
        record["awq_calibration"] = awq_calibration(args.awq, scratch, args.threads)
        for format_name in args.formats:
            started = time.perf_counter()
            measured = sensitivity.run(params.model_copy(update={"formats": [format_name]}), layout.SOURCE_DIR,
                                       layout.CALIBRATION_TEXT, scratch / f"sensitivity-{format_name}",
                                       threads=args.threads, log=print)["formats"][format_name]
            stage_s = time.perf_counter() - started
            record["formats"][format_name] = {
                "stage_s": round(stage_s, 1), "groups": len(measured["groups"]),
                "passes": sum(len(group["options"]) - 1 for group in measured["groups"]),
                "per_awq_calibration": round(stage_s / record["awq_calibration"]["quantize_s"], 2),
                "sample": sample_comparison(format_name, params, args.sample, args.threads) if args.sample else None}

    awq = record["awq_calibration"]
    print(f"\n{awq['recipe']} calibration pass (quantize_s): {awq['quantize_s']:.0f} s")
    print(f"{'format':<10}{'groups':>7}{'passes':>8}{'stage s':>9}{'x AWQ':>7}  sample: replayed / whole s, equal")
    for name, figures in record["formats"].items():
        sample = figures["sample"]
        print(f"{name:<10}{figures['groups']:>7}{figures['passes']:>8}{figures['stage_s']:>9.0f}"
              f"{figures['per_awq_calibration']:>7.2f}  " + (
                  f"{sample['replayed_s']:.0f} / {sample['whole_s']:.0f} ({sample['passes']} passes), "
                  f"{'identical' if sample['identical'] else 'differ by ' + format(sample['largest_difference'], '.2e')}"
                  if sample else "-"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
