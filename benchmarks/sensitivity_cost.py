"""What the sensitivity stage costs, against one calibration pass of the AWQ build, side by side.

1. For each format of --formats, the sensitivity stage itself (pipeline.sensitivity.run, the
   project's params.yaml sensitivity windows) with each method of --methods, timed from loading
   to the written record. With both methods, the scaled figures are checked against the passed
   ones on every group (Spearman's rank correlation, median relative error).
2. A sample of --sample groups spread over the model, measured again both ways: each pass
   started at its group's decoder layer (what the stage does) and the whole model run for every
   pass (``replay_layers=False``). The figures must be equal; the seconds say what starting at
   the group's layer saves.
3. The --awq recipe's build, and its calibration pass (``quantize_s``: llm-compressor's
   oneshot, AWQ's scale search over the recipe's calibration samples).

    python benchmarks/sensitivity_cost.py --out benchmarks/results/sensitivity-cost-smollm2-135m.json
    python benchmarks/sensitivity_cost.py --write   # render the committed result into docs/sensitivity.md (`make docs`)

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

import doc_blocks  # noqa: E402 (beside this script)

SCRIPT = Path(__file__).name
RESULTS = BENCHMARKS / "results" / "sensitivity-cost-smollm2-135m.json"


def render() -> str:
    """docs/sensitivity.md's cost table, from the committed result."""
    results = json.loads(RESULTS.read_text())
    awq = results["awq_calibration"]
    lines = ["| format | method | forward passes | stage s | x the AWQ calibration pass | scaled figures against "
             "their passes: pairs, Spearman, median relative error |", "|---|---|---|---|---|---|"]
    for name, figures in results["formats"].items():
        for method, stage in figures["methods"].items():
            check = figures["scaled_against_measured"] if method == "scaled" else None
            lines.append(f"| {name} | {method} | {stage['passes']} | {stage['stage_s']:.0f} | "
                         f"{stage['per_awq_calibration']:.2f} | " + (
                             f"{check['pairs']} (every scaled figure), {check['spearman']:.2f}, "
                             f"{check['median_relative_error']:.0%}" if check else "-") + " |")
    return ("\n".join(lines) + f"\n\nThe embedded model, {results['windows']} x {results['window_tokens']} calibration "
            f"tokens in {results['dtype']}; the yardstick is {awq['recipe']}'s calibration pass (`quantize_s`, llm-compressor's oneshot): "
            f"{awq['quantize_s']:.0f} s on {awq['calibration']['samples']} x {awq['calibration']['seq_len']} tokens; {results['host']}; `{results['command']}`.\n")


BLOCKS = [(REPO / "docs" / "sensitivity.md", "sensitivity-cost", render)]


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


def scaled_against_measured(scaled: dict, measured: dict) -> dict:
    """The stage's estimate check (``sensitivity.estimate_check``) on every group: each scaled
    figure of the scaled stage's record against the measured stage's pass."""
    from pipeline import sensitivity

    figures = {method: {group["name"]: {type_name: option["mean_kld"] for type_name, option in group["options"].items()}
                        for group in record["groups"]} for method, record in (("scaled", scaled), ("measured", measured))}
    scaled_groups = {group["name"]: group for group in scaled["groups"]
                     if any(option["scaled"] for option in group["options"].values())}
    anchors = {name: next(type_name for type_name, option in group["options"].items()
                          if not option["scaled"] and option["mean_kld"] > 0) for name, group in scaled_groups.items()}
    return sensitivity.estimate_check(figures["scaled"], {name: figures["measured"][name] for name in scaled_groups},
                                      anchors)


def summary(check: dict | None) -> dict | None:
    return None if check is None else {
        "pairs": len(check["pairs"]),
        "spearman": None if check["spearman"] is None else round(check["spearman"], 3),
        "median_relative_error": None if check["median_relative_error"] is None
        else round(check["median_relative_error"], 3)}


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
    parser.add_argument("--methods", nargs="+", choices=["scaled", "measured"], default=["scaled", "measured"])
    parser.add_argument("--sample", type=int, default=6, help="groups measured both ways (0: none)")
    parser.add_argument("--awq", default="awq-w4a16", help="the AWQ recipe whose calibration pass is the yardstick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--write", action="store_true", help="only render the committed result into the docs")
    args = parser.parse_args()
    if args.write:
        doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=True)
        return

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
            stages = {}
            for method in args.methods:
                started = time.perf_counter()
                stages[method] = sensitivity.run(
                    params.model_copy(update={"formats": [format_name], "method": method}), layout.SOURCE_DIR,
                    layout.CALIBRATION_TEXT, scratch / f"sensitivity-{format_name}-{method}",
                    threads=args.threads, log=print)["formats"][format_name]
                stages[method]["stage_s"] = time.perf_counter() - started
            record["formats"][format_name] = {
                "groups": len(next(iter(stages.values()))["groups"]),
                "methods": {method: {"stage_s": round(stage["stage_s"], 1), "passes": stage["passes"],
                                     "per_awq_calibration": round(stage["stage_s"] / record["awq_calibration"]["quantize_s"], 2),
                                     "estimate_check": summary(stage["estimate_check"])}
                            for method, stage in stages.items()},
                "scaled_against_measured": summary(scaled_against_measured(stages["scaled"], stages["measured"]))
                if len(stages) == 2 else None,
                "sample": sample_comparison(format_name, params, args.sample, args.threads) if args.sample else None}

    awq = record["awq_calibration"]
    print(f"\n{awq['recipe']} calibration pass (quantize_s): {awq['quantize_s']:.0f} s")
    print(f"{'format':<10}{'method':<10}{'groups':>7}{'passes':>8}{'stage s':>9}{'x AWQ':>7}  scaled figures, "
          "against passes: Spearman, median error")
    for name, figures in record["formats"].items():
        for method, stage in figures["methods"].items():
            check = stage["estimate_check"] if method == "scaled" else None
            print(f"{name:<10}{method:<10}{figures['groups']:>7}{stage['passes']:>8}{stage['stage_s']:>9.0f}"
                  f"{stage['per_awq_calibration']:>7.2f}  " + (
                      f"{check['pairs']} pairs on the stage's sample: {check['spearman']}, {check['median_relative_error']}"
                      if check else "-"))
        whole = figures["scaled_against_measured"]
        if whole:
            print(f"{name:<10}every group, scaled against measured: {whole['pairs']} pairs, Spearman "
                  f"{whole['spearman']}, median relative error {whole['median_relative_error']}")
        sample = figures["sample"]
        if sample:
            print(f"{name:<10}sample, replayed / whole passes: {sample['replayed_s']:.0f} / {sample['whole_s']:.0f} s "
                  f"({sample['passes']} passes), " + ("identical" if sample["identical"]
                                                      else f"differ by {sample['largest_difference']:.2e}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
