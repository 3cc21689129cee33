"""Does the per-tensor search pay for itself? Searched recipes against uniform ones at the same
size, side by side in one run, on the project's source and reference.

1. The sensitivity stage's measurement for the format (pipeline.sensitivity, params.yaml's
   sensitivity windows), written beside the results, not into artifacts/sensitivity.
2. Each uniform recipe of --uniform (recipes/NAME.yaml) is built, and beside it the same recipe
   with `search: {bits_per_weight: <the uniform artifact's own>}`, solved and built (a GGUF's
   types read back from the file).
3. Every artifact is scored by the accuracy gate's code against the reference (all windows, full
   vocabulary): mean KLD and 99.9 % KLD. A searched GGUF is held against the best uniform one no
   more than 1 % larger than it; a searched AWQ recipe against its own uniform recipe (VERSUS).
4. GGUF, --check-groups N: the search's premise, checked on N groups spread over the model: each
   group alone at IQ4_NL (everything else f16) built by llama.cpp and scored there, against the
   damage the sensitivity stage measured in transformers; Spearman's rank correlation.
5. --budgets: more searched points on the size/KLD curve, each built from the first uniform
   recipe's keys at that many bits per weight and held against the best uniform one its size.

    python benchmarks/mixed.py --out benchmarks/results/mixed-smollm2-135m.json
    python benchmarks/mixed.py --format awq --uniform rtn-w4a16 awq-w4a16 --out benchmarks/results/mixed-awq-smollm2-135m.json
    python benchmarks/mixed.py --format modelopt --budgets 7.5 8.5 --out benchmarks/results/mixed-modelopt-smollm2-135m.json
    python benchmarks/mixed.py --write    # render the committed results into the README (`make docs`)

Needs `dvc repro reference` first. Prints a table and writes the figures as JSON.
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
RESULTS = {"gguf": BENCHMARKS / "results" / "mixed-smollm2-135m.json",
           "awq": BENCHMARKS / "results" / "mixed-awq-smollm2-135m.json",
           "modelopt": BENCHMARKS / "results" / "mixed-modelopt-smollm2-135m.json"}
UNIFORM = {"gguf": ["gguf-q4_0", "gguf-iq4_xs", "gguf-q4_k_m", "gguf-q5_k_m", "gguf-q6_k", "gguf-q8_0"],
           "awq": ["rtn-w4a16", "awq-w4a16"],
           "modelopt": ["trtllm-nvfp4", "trtllm-fp8"]}
# what a searched recipe is held against: the best uniform one no more than 1 % larger (GGUF's
# stock types, and ModelOpt's NVFP4 and FP8, are alternatives to each other), or its own uniform
# recipe (AWQ's rtn and awq are two algorithms, each searched as itself)
VERSUS = {"gguf": "best", "awq": "own", "modelopt": "best"}
SIZE_TOLERANCE = 0.01


def score(fmt, build_dir: Path, reference, threads: int) -> dict:
    from pipeline.config import SpeedParams
    from pipeline.gates import accuracy

    with fmt.open_session(build_dir, threads, SpeedParams()) as session:
        summary = accuracy.score(session.window_logits(reference.tokens), reference)
    return {"mean_kld": summary["mean_kld"], "p999_kld": summary["p999_kld"], "ppl_ratio": summary["ppl_ratio"],
            "top1_agreement": summary["top1_agreement"], "mean_kld_ci95": summary["ci95"]["mean_kld"]}


def build(fmt, recipe_keys: dict, out_dir: Path, threads: int) -> dict:
    from pipeline import layout
    from pipeline.files import artifact_bytes

    recipe = fmt.Recipe.model_validate(recipe_keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt.build(recipe, source_dir=layout.SOURCE_DIR, calibration_text=layout.CALIBRATION_TEXT, out_dir=out_dir,
              threads=threads, log=lambda _: None)
    return {"bits_per_weight": fmt.bits_per_weight(out_dir), "bytes": artifact_bytes(fmt.artifact_path(out_dir))}


def held_against(results: dict) -> list[tuple[dict, dict | None]]:
    """Each row with the uniform row its searched recipe is held against (VERSUS), or None."""
    rows = results["rows"]
    pairs = []
    for row in rows:
        size = row["searched"]["bytes"]
        peers = [other for other in rows if other["uniform_figures"]
                 and other["uniform_figures"]["bytes"] <= size * (1 + SIZE_TOLERANCE)
                 and (VERSUS[results["format"]] == "best" or other is row)]
        pairs.append((row, min(peers, key=lambda other: other["uniform_figures"]["mean_kld"]) if peers else None))
    return pairs


def table(results: dict) -> str:
    """The README's rows: each searched recipe against the uniform one it is held against."""
    lines = []
    for row, against in held_against(results):
        if against is None:
            continue
        best, searched = {"recipe": against["uniform"], **against["uniform_figures"]}, row["searched"]
        types = ", ".join(f"{name} {count}" for name, count in searched["types"].items())
        budget = (f"{row['uniform']} ({row['uniform_figures']['bits_per_weight']:.2f})" if row["uniform_figures"]
                  else f"{searched['budget']['bits_per_weight']:g} bits/w")
        lines.append(f"| {budget} | "
                     f"{searched['bytes'] / 1e6:.1f} | {best['recipe']} | {best['bytes'] / 1e6:.1f} | "
                     f"{best['mean_kld']:.4f} → {searched['mean_kld']:.4f} "
                     f"({100 * (searched['mean_kld'] / best['mean_kld'] - 1):+.0f} %) | "
                     f"{best['p999_kld']:.3f} → {searched['p999_kld']:.3f} "
                     f"({100 * (searched['p999_kld'] / best['p999_kld'] - 1):+.0f} %) | "
                     f"{types} |")
    return "\n".join(lines) + "\n"


def note(results: dict) -> str:
    sensitivity = results["sensitivity"]
    check = results["group_check"]
    method = sensitivity.get("method", "measured")  # runs before the scaled method passed every type
    estimate = sensitivity.get("estimate_check") or {}
    return (f"{results['format']}: sensitivity {sensitivity['seconds'] / 60:.0f} min ({sensitivity['groups']} groups, "
            f"{sensitivity['windows']} x {sensitivity['window_tokens']} calibration tokens, {method}"
            + (f"; its scaled figures against passes on {len({p['group'] for p in estimate['pairs']})} groups: "
               f"Spearman {estimate['spearman']:.2f}" if estimate.get("spearman") is not None else "") + ")"
            + (f", against llama.cpp's own figures on {len(check['groups'])} groups alone at IQ4_NL: Spearman "
               f"{check['spearman']:.2f}" if check["groups"] else "") + f"; `{results['command']}`")


def render(formats: tuple[str, ...]) -> str:
    runs = [json.loads(RESULTS[name].read_text()) for name in formats if RESULTS[name].is_file()]
    if not runs:
        return "No results committed yet: run the commands in benchmarks/mixed.py.\n"
    lines = ["| budget: the bits/w of | searched MB | held against | its MB | mean KLD | 99.9 % KLD | "
             "types chosen |", "|---|---|---|---|---|---|---|"]
    lines += [line for results in runs for line in table(results).splitlines()]
    reference = runs[0]["reference"]
    lines += ["", f"Full-vocabulary KLD against the fp32 reference, {reference['windows']} x "
                  f"{reference['window_tokens']} tokens; {runs[0]['host']}. " + ". ".join(note(r) for r in runs) + "."]
    return "\n".join(lines) + "\n"


# (doc, name of the block, the function that renders it)
BLOCKS = [(REPO / "README.md", "mixed", lambda: render(("gguf", "awq"))),
          (REPO / "docs" / "sensitivity.md", "mixed-modelopt", lambda: render(("modelopt",)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="only render the committed results into the README")
    parser.add_argument("--format", default="gguf", choices=sorted(UNIFORM), help="the format to search")
    parser.add_argument("--uniform", nargs="+", help="recipes to compare at their own sizes (default: per format)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-groups", type=int, default=8, help="GGUF: groups checked in llama.cpp (0: none)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[], help="more bits-per-weight budgets to search")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.write:
        doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=True)
        return

    from memory_estimate import host_line

    from pipeline import formats, layout, reference as reference_stage, sensitivity
    from pipeline.config import load_params

    fmt = formats.module(args.format)
    params = load_params()
    reference = reference_stage.load(layout.REFERENCE_DIR)
    sensitivity_params = params.sensitivity.model_copy(update={"formats": [args.format]})
    with tempfile.TemporaryDirectory(prefix="qpipe-mixed-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        measured = sensitivity.run(sensitivity_params, layout.SOURCE_DIR, layout.CALIBRATION_TEXT,
                                   scratch / "sensitivity", threads=args.threads, log=print)
        sensitivity_s = time.perf_counter() - started
        rows = []
        for name in args.uniform or UNIFORM[args.format]:
            keys = formats.load_recipe(name).model_dump(exclude={"gates", "description"})
            uniform = build(fmt, keys, scratch / name, args.threads)
            uniform.update(score(fmt, scratch / name, reference, args.threads))
            searching = fmt.Recipe.model_validate({**keys, "search": {"bits_per_weight": uniform["bits_per_weight"]}})
            searched_keys, searched_facts = fmt.resolve_search(searching, measured)
            searched = build(fmt, {**keys, **searched_keys}, scratch / f"searched-{name}", args.threads)
            searched.update(score(fmt, scratch / f"searched-{name}", reference, args.threads), **searched_facts)
            rows.append({"uniform": name, "uniform_figures": uniform, "searched": searched})
            print(f"{name:<12} uniform {uniform['bytes'] / 1e6:6.1f} MB KLD {uniform['mean_kld']:.4f} "
                  f"p99.9 {uniform['p999_kld']:.3f} | searched {searched['bytes'] / 1e6:6.1f} MB "
                  f"KLD {searched['mean_kld']:.4f} (predicted {searched['predicted_mean_kld']:.4f}) "
                  f"p99.9 {searched['p999_kld']:.3f} {searched['types']}", flush=True)
        for bits in args.budgets:
            keys = formats.load_recipe((args.uniform or UNIFORM[args.format])[0]).model_dump(
                exclude={"gates", "description"})
            searched_keys, searched_facts = fmt.resolve_search(
                fmt.Recipe.model_validate({**keys, "search": {"bits_per_weight": bits}}), measured)
            searched = build(fmt, {**keys, **searched_keys}, scratch / f"searched-{bits}", args.threads)
            searched.update(score(fmt, scratch / f"searched-{bits}", reference, args.threads), **searched_facts)
            rows.append({"uniform": None, "uniform_figures": None, "searched": searched})
            print(f"{bits:g} bits/w   searched {searched['bytes'] / 1e6:6.1f} MB KLD {searched['mean_kld']:.4f} "
                  f"(predicted {searched['predicted_mean_kld']:.4f}) p99.9 {searched['p999_kld']:.3f} "
                  f"{searched['types']}", flush=True)

        checked = []
        groups = measured["formats"][args.format]["groups"]
        if args.format == "gguf" and args.check_groups:
            step = max(1, len(groups) // args.check_groups)
            for group in groups[::step][:args.check_groups]:
                if "IQ4_NL" not in group["options"]:
                    continue
                alone = scratch / f"alone-{group['name']}"
                build(fmt, {"format": "gguf", "type": "Q8_0",
                            "tensor_types": {fmt.group_pattern(group): "IQ4_NL", ".": "F16"}}, alone, args.threads)
                llama_cpp_kld = score(fmt, alone, reference, args.threads)["mean_kld"]
                checked.append({"group": group["name"], "transformers_mean_kld": group["options"]["IQ4_NL"]["mean_kld"],
                                "llama_cpp_mean_kld": llama_cpp_kld})
                print(f"check {group['name']:<22} transformers {checked[-1]['transformers_mean_kld']:.5f} "
                      f"llama.cpp {llama_cpp_kld:.5f}", flush=True)

    correlation = sensitivity.rank_correlation([c["transformers_mean_kld"] for c in checked],
                           [c["llama_cpp_mean_kld"] for c in checked]) if len(checked) > 2 else None
    record = {"command": "python benchmarks/mixed.py " + " ".join(sys.argv[1:]), "host": host_line(),
              "format": args.format,
              "sensitivity": {"seconds": round(sensitivity_s, 1), "windows": sensitivity_params.windows,
                              "method": measured["formats"][args.format]["method"],
                              "estimate_check": measured["formats"][args.format]["estimate_check"],
                              "window_tokens": sensitivity_params.window_tokens, "groups": len(groups)},
              "reference": {"windows": int(reference.tokens.shape[0]), "window_tokens": int(reference.tokens.shape[1])},
              "rows": rows, "group_check": {"groups": checked, "spearman": correlation}}
    print()
    print(table(record))
    print(note(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
