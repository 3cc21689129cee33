"""Does the per-tensor search pay for itself? Searched GGUF recipes against llama.cpp's stock
types at the same size, side by side in one run, on the project's source and reference.

1. The sensitivity stage's measurement for GGUF (pipeline.sensitivity, params.yaml's
   sensitivity windows), written beside the results, not into artifacts/sensitivity.
2. Each stock type of --stock is built (convert + llama_model_quantize), and for each a
   searched recipe with bits_per_weight equal to the stock file's own (tensor bytes x 8 /
   weights) is solved and built, its types read back from the file.
3. Every file is scored by the accuracy gate's code against the reference (all windows, full
   vocabulary): mean KLD and 99.9 % KLD. A searched file is compared with the best stock file
   no more than 1 % larger than it.
4. --check-groups N: the search's premise, checked on N groups spread over the model: each
   group alone at IQ4_NL (everything else f16) built by llama.cpp and scored there, against
   the damage the sensitivity stage measured in transformers; Spearman's rank correlation.

    python benchmarks/mixed.py --out benchmarks/results/mixed-smollm2-135m.json

Needs `dvc repro reference` first. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STOCK = ["Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
SIZE_TOLERANCE = 0.01


def score(path: Path, reference, threads: int) -> dict:
    from pipeline.gates import accuracy
    from pipeline.runtimes import llama_cpp

    with llama_cpp.open_session(path, threads=threads) as session:
        summary = accuracy.score(session.window_logits(reference.tokens), reference)
    return {"mean_kld": summary["mean_kld"], "p999_kld": summary["p999_kld"], "ppl_ratio": summary["ppl_ratio"],
            "top1_agreement": summary["top1_agreement"], "mean_kld_ci95": summary["ci95"]["mean_kld"]}


def build(recipe_keys: dict, out_dir: Path, threads: int) -> dict:
    from pipeline import layout
    from pipeline.formats import gguf

    recipe = gguf.Recipe.model_validate({"format": "gguf", **recipe_keys})
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = gguf.build(recipe, source_dir=layout.SOURCE_DIR, calibration_text=layout.CALIBRATION_TEXT,
                       out_dir=out_dir, threads=threads, log=lambda _: None)
    return {"file": out_dir / gguf.ARTIFACT_FILE, "bits_per_weight": facts["tensor_types"]["bits_per_weight"],
            "bytes": (out_dir / gguf.ARTIFACT_FILE).stat().st_size}


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ranks = [np.argsort(np.argsort(values)) for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", nargs="+", default=STOCK, help="llama.cpp types to compare at their own sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-groups", type=int, default=8, help="groups checked in llama.cpp (0: none)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    from pipeline import layout, reference as reference_stage, search, sensitivity
    from pipeline.config import load_params
    from pipeline.formats import gguf

    params = load_params()
    reference = reference_stage.load(layout.REFERENCE_DIR)
    sensitivity_params = params.sensitivity.model_copy(update={"formats": ["gguf"]})
    with tempfile.TemporaryDirectory(prefix="qpipe-mixed-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        measured = sensitivity.run(sensitivity_params, layout.SOURCE_DIR, layout.CALIBRATION_TEXT,
                                   scratch / "sensitivity", threads=args.threads, log=print)
        sensitivity_s = time.perf_counter() - started
        rows = []
        for stock_type in args.stock:
            stock = build({"type": stock_type}, scratch / stock_type, args.threads)
            stock.update(score(stock.pop("file"), reference, args.threads))
            recipe = gguf.Recipe.model_validate({"format": "gguf", "type": "Q8_0",
                                                 "search": {"bits_per_weight": stock["bits_per_weight"]}})
            tensor_types, searched_facts = gguf.resolve_search(recipe, measured)
            searched = build({"type": "Q8_0", "tensor_types": tensor_types}, scratch / f"searched-{stock_type}",
                             args.threads)
            searched.update(score(searched.pop("file"), reference, args.threads), **searched_facts)
            rows.append({"stock_type": stock_type, "stock": stock, "searched": searched})
            print(f"{stock_type:<7} stock {stock['bytes'] / 1e6:6.1f} MB KLD {stock['mean_kld']:.4f} "
                  f"p99.9 {stock['p999_kld']:.3f} | searched {searched['bytes'] / 1e6:6.1f} MB "
                  f"KLD {searched['mean_kld']:.4f} (predicted {searched['predicted_mean_kld']:.4f}) "
                  f"p99.9 {searched['p999_kld']:.3f} {searched['types']}", flush=True)

        for row in rows:
            size = row["searched"]["bytes"]
            peers = [other for other in rows if other["stock"]["bytes"] <= size * (1 + SIZE_TOLERANCE)]
            best = min(peers, key=lambda other: other["stock"]["mean_kld"]) if peers else None
            row["best_stock_at_size"] = best and {
                "type": best["stock_type"], "bytes": best["stock"]["bytes"], "mean_kld": best["stock"]["mean_kld"],
                "p999_kld": best["stock"]["p999_kld"]}
            if best:
                row["mean_kld_reduction"] = 1 - row["searched"]["mean_kld"] / best["stock"]["mean_kld"]
                row["p999_kld_reduction"] = 1 - row["searched"]["p999_kld"] / best["stock"]["p999_kld"]

        checked = []
        groups = measured["formats"]["gguf"]["groups"]
        if args.check_groups:
            step = max(1, len(groups) // args.check_groups)
            for group in groups[::step][:args.check_groups]:
                if "IQ4_NL" not in group["options"]:
                    continue
                alone = build({"type": "Q8_0", "tensor_types": {gguf.group_pattern(group): "IQ4_NL", ".": "F16"}},
                              scratch / f"alone-{group['name']}", args.threads)
                llama_cpp_kld = score(alone["file"], reference, args.threads)["mean_kld"]
                checked.append({"group": group["name"], "transformers_mean_kld": group["options"]["IQ4_NL"]["mean_kld"],
                                "llama_cpp_mean_kld": llama_cpp_kld})
                print(f"check {group['name']:<22} transformers {checked[-1]['transformers_mean_kld']:.5f} "
                      f"llama.cpp {llama_cpp_kld:.5f}", flush=True)

    print(f"\nsensitivity: {sensitivity_s:.0f} s for {len(groups)} groups "
          f"({sensitivity_params.windows} x {sensitivity_params.window_tokens} tokens)")
    print(f"{'budget (stock)':<15} {'searched MB':>11} {'best stock':>10} {'its MB':>7} {'mean KLD':>17} "
          f"{'99.9% KLD':>15} {'reduction':>17}")
    for row in rows:
        best = row["best_stock_at_size"]
        if not best:
            continue
        print(f"{row['stock_type']:<15} {row['searched']['bytes'] / 1e6:11.1f} {best['type']:>10} "
              f"{best['bytes'] / 1e6:7.1f} {best['mean_kld']:.4f} -> {row['searched']['mean_kld']:.4f} "
              f"{best['p999_kld']:.3f} -> {row['searched']['p999_kld']:.3f} "
              f"{100 * row['mean_kld_reduction']:6.1f} % {100 * row['p999_kld_reduction']:6.1f} %")
    correlation = spearman([c["transformers_mean_kld"] for c in checked],
                           [c["llama_cpp_mean_kld"] for c in checked]) if len(checked) > 2 else None
    if correlation is not None:
        print(f"rank correlation, sensitivity (transformers) vs llama.cpp, {len(checked)} groups: {correlation:.3f}")
    if args.out:
        record = {"command": "python benchmarks/mixed.py " + " ".join(sys.argv[1:]),
                  "sensitivity": {"seconds": round(sensitivity_s, 1), "windows": sensitivity_params.windows,
                                  "window_tokens": sensitivity_params.window_tokens, "groups": len(groups)},
                  "reference": {"windows": int(reference.tokens.shape[0]), "window_tokens": int(reference.tokens.shape[1])},
                  "rows": rows, "group_check": {"groups": checked, "spearman": correlation}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
