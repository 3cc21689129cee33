"""Tradeoff table, Pareto front and plots over the gate results of the recipes in params.

Quality is mean KLD from the reference (lower is better), speed is batch-1 decode tok/s on
the native runtime (higher is better). An artifact is on the Pareto front when no other
artifact is at least as good on both and better on one beyond the measured noise
(``differs``). Artifacts missing either figure (for instance speed `not_run`) are listed but
take no part in that front; quality_vs_size.png shows every artifact, since size and accuracy
are measured for all of them.

Noise (``differs``): two speeds differ when they are further apart than TIE_SIGMAS standard
deviations of their difference, each side's deviation being the spread of its repeats (or,
for one artifact measured in several runs, the spread between the runs when that is larger).
Two accuracy figures differ when their paired difference over the same windows is more than
TIE_SIGMAS standard errors from zero (both artifacts scored the same windows, so the windows'
own difficulty cancels). Anything else compares exactly.
"""

from __future__ import annotations

import math
import statistics

from pathlib import Path
from typing import Any

from pipeline.files import read_json, write_json, write_text
from pipeline.gates.stale import FIX

# figure -> "min" or "max"
DEFAULT_OBJECTIVES = {"mean_kld": "min", "decode_tok_s": "max"}

COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("bits_per_weight", "bits/w", "{:.2f}"),
    ("ppl_ratio", "ppl ratio", "{:.4f}"),
    ("mean_kld", "mean KLD", "{:.4f}"),
    ("mean_kld_ci95", "KLD 95 % CI", "{low:.4f}-{high:.4f}"),
    ("top1_agreement", "top-1", "{:.3f}"),
    ("task_recovery", "task recovery", "{:.3f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_sd", "± sd", "{:.1f}"),
    ("decode_speedup", "vs f16", "{:.2f}x"),
    ("roofline_fraction", "roofline", "{:.2f}"),
    ("verdict", "verdict", "{}"),
    ("pareto", "Pareto", "{}"),
]


# a recipe whose tensor types the search chose, on both plots
SEARCHED_MARKER = "D"
SEARCHED_LABEL = " (searched)"


def row(result: dict[str, Any], build: dict[str, Any] | None) -> dict[str, Any]:
    accuracy = result["accuracy"] if result["accuracy"].get("status") == "ok" else {}
    speed = result["speed"] if result["speed"].get("status") == "ok" else {}
    tasks = result.get("tasks") or {}  # absent from results written before the task gate
    mix = (build or {}).get("tensor_types") or {}
    return {
        "recipe": result["recipe"],
        "format": result["format"],
        "bytes": result["artifact"]["bytes"],
        "size_mb": result["artifact"]["bytes"] / 1e6 if result["artifact"]["bytes"] is not None else None,
        "bits_per_weight": result["artifact"].get("bits_per_weight"),
        "ppl": accuracy.get("ppl"),
        "ppl_ratio": accuracy.get("ppl_ratio"),
        "mean_kld": accuracy.get("mean_kld"),
        "top1_agreement": accuracy.get("top1_agreement"),
        "tokenizer_mismatch": accuracy.get("tokenizer_mismatch"),
        "task_recovery": tasks.get("min_recovery") if tasks.get("status") == "ok" else None,
        "tasks": tasks.get("tasks") if tasks.get("status") == "ok" else None,
        "prefill_tok_s": speed.get("prefill_tok_s"),
        "decode_tok_s": speed.get("decode_tok_s"),
        "decode_speedup": speed.get("decode_speedup"),
        "ttft_ms": speed.get("ttft_ms"),
        "itl_ms": speed.get("itl_ms"),
        "roofline_fraction": speed.get("roofline_fraction"),
        "accuracy_runtime": result["accuracy"].get("runtime") or f"not_run: {result['accuracy'].get('reason')}",
        "speed_runtime": result["speed"].get("runtime") or f"not_run: {result['speed'].get('reason')}",
        "tensor_types": mix.get("byte_share"),
        # per-tensor types chosen by the search (docs/sensitivity.md): its predicted mean KLD
        "searched": ((build or {}).get("search") or {}).get("predicted_mean_kld"),
        "verdict": result["verdict"],
        "reasons": result.get("reasons", []),
        "sha256": result["artifact"].get("sha256"),
        "mean_kld_ci95": (accuracy.get("ci95") or {}).get("mean_kld"),
        "llama_cpp": accuracy.get("llama_cpp"),
        "second_half": accuracy.get("second_half"),
        "by_position": accuracy.get("by_position"),
        "by_depth": (speed.get("by_depth") or {}).get("depths"),
        "speed_noise": {key: (speed.get("spread") or {}).get(key, {}).get("stdev")
                        for key in ("prefill_tok_s", "decode_tok_s")},
        "per_window": _per_window(accuracy),
        # limits that guard nothing, verdicts on noise (pipeline.limits)
        "limit_notes": limit_notes(result),
    }


def limit_notes(result: dict[str, Any]) -> list[str]:
    from pipeline.limits import notes

    return notes(result)


def _per_window(accuracy: dict[str, Any]) -> dict[str, list[float]] | None:
    """Each window's figure for the paired comparison of accuracy columns."""
    windows = accuracy.get("per_window")
    if not windows:
        return None
    return {"mean_kld": windows["mean_kld"], "top1_agreement": windows["top1_agreement"],
            "ppl_ratio": [math.exp(q - p) for q, p in zip(windows["mean_nll"], windows["mean_reference_nll"])]}


TIE_SIGMAS = 2.0


def differs(a: dict[str, Any], b: dict[str, Any], column: str) -> bool:
    """Whether rows a and b differ on `column` beyond the measured noise (module docstring)."""
    if a.get(column) is None or b.get(column) is None:
        return a.get(column) != b.get(column)
    if column in ("prefill_tok_s", "decode_tok_s"):
        noise = math.hypot((a.get("speed_noise") or {}).get(column) or 0.0,
                           (b.get("speed_noise") or {}).get(column) or 0.0)
        return abs(a[column] - b[column]) > TIE_SIGMAS * noise
    windows_a, windows_b = (a.get("per_window") or {}).get(column), (b.get("per_window") or {}).get(column)
    if windows_a and windows_b and len(windows_a) == len(windows_b) > 1:
        gaps = [x - y for x, y in zip(windows_a, windows_b)]
        standard_error = statistics.stdev(gaps) / math.sqrt(len(gaps))
        return abs(statistics.mean(gaps)) > TIE_SIGMAS * standard_error
    return a[column] != b[column]


def better(a: dict[str, Any], b: dict[str, Any], key: str, sense: str) -> bool:
    """a beats b on `key` beyond the measured noise."""
    ahead = a[key] < b[key] if sense == "min" else a[key] > b[key]
    return ahead and differs(a, b, key)


def pareto_front(rows: list[dict[str, Any]], objectives: dict[str, str] = DEFAULT_OBJECTIVES) -> list[bool | None]:
    """For each row: True on the front, False dominated, None when a figure is missing. A row
    is dominated by one that is nowhere worse and somewhere better, beyond the noise."""
    complete = [all(r.get(key) is not None for key in objectives) for r in rows]
    front: list[bool | None] = []
    for row_, has_figures in zip(rows, complete):
        if not has_figures:
            front.append(None)
            continue
        dominated = any(
            other_complete and other is not row_
            and not any(better(row_, other, key, sense) for key, sense in objectives.items())
            and any(better(other, row_, key, sense) for key, sense in objectives.items())
            for other, other_complete in zip(rows, complete))
        front.append(not dominated)
    return front


def build_rows(results: list[dict[str, Any]], builds_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        build_file = Path(builds_dir) / result["recipe"] / "build.json"
        rows.append(row(result, read_json(build_file) if build_file.is_file() else None))
    return mark_pareto(rows)


def mark_pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each row's `pareto` (True, False, or None without the figures) in place."""
    for r, on_front in zip(rows, pareto_front(rows)):
        r["pareto"] = on_front
    return rows


def markdown(rows: list[dict[str, Any]], reference_meta: dict[str, Any], host: dict[str, Any]) -> str:
    lines = [
        "# Quantization tradeoff",
        "",
        f"Reference: {reference_meta.get('runtime')} ({reference_meta.get('dtype')}), ppl "
        f"{reference_meta.get('ppl', float('nan')):.4f} over {reference_meta.get('eval_tokens')} tokens "
        f"({reference_meta.get('windows')} x {reference_meta.get('window_tokens')}). "
        f"Host: {host.get('cpu')} ({host.get('cores')} cores), {host.get('gpu') or 'no GPU'}, "
        f"measured bandwidth {host.get('bandwidth_gb_s')} GB/s.",
        "",
    ]
    # the task column only where a task gate ran: the default run names no task
    columns = [c for c in COLUMNS if c[0] != "task_recovery" or any(r.get("task_recovery") is not None for r in rows)]
    lines += ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            value = r.get(key)
            if key == "pareto":
                cells.append({True: "yes", False: "", None: "n/a"}[value])
            elif key == "decode_sd":
                value = (r.get("speed_noise") or {}).get("decode_tok_s")
                cells.append("" if value is None else fmt.format(value))
            elif key == "verdict" and r.get("stale"):
                cells.append(f"{value} (stale)")
            elif value is None:
                cells.append("not run")
            else:
                cells.append(fmt.format(**value) if isinstance(value, dict) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines += llama_cpp_table(rows)
    lines += position_table(rows)
    lines += depth_table(rows)
    lines += tasks_table(rows)
    lines += ["", "## Runtimes and tensor types", ""]
    for r in rows:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in (r.get("tensor_types") or {}).items())
        lines.append(f"- **{r['recipe']}**: accuracy via {r['accuracy_runtime']}; speed via {r['speed_runtime']}"
                     + (f"; bytes by tensor type: {mix}" if mix else "")
                     + (f"; types chosen per tensor by the search (predicted mean KLD {r['searched']:.4f})"
                        if r.get("searched") is not None else "")
                     + (f"; tokenizer mismatch {r['tokenizer_mismatch']:.4%}" if r.get("tokenizer_mismatch") is not None else ""))
        if r.get("stale"):
            lines.append(f"  - stale: {r['stale']}; {FIX}")
        for reason in r.get("reasons", []):
            lines.append(f"  - {r['verdict']}: {reason}")
        for note in r.get("limit_notes") or []:
            lines.append(f"  - limit: {note}")
    lines += ["", f"Pareto front: lower mean KLD and higher decode tok/s, a difference within the measured noise "
                  f"being a tie ({TIE_SIGMAS:g} sd of the speed repeats; {TIE_SIGMAS:g} standard errors of the paired "
                  "per-window KLD); `n/a` = a figure was not measured.", ""]
    return "\n".join(lines)


def tasks_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each task's score, the unquantized model's, and recovery, per recipe whose task gate ran."""
    ran = [r for r in rows if r.get("tasks")]
    if not ran:
        return []
    lines = ["", "## Tasks (lm-evaluation-harness)", "",
             "Score on the task's metric through the artifact's own runtime, the unquantized model's score "
             "(95 % interval from lm-eval's stderr), and recovery = score / unquantized score (its paired 95 % "
             "interval, bootstrapped over documents).", "",
             "| recipe | task | metric | documents | score | unquantized | recovery |", "|---|---|---|---|---|---|---|"]
    for r in ran:
        for task in r["tasks"]:
            interval = task.get("base_ci95")
            base = f"{task['base_score']:.4f}" + (f" ({interval['low']:.3f}-{interval['high']:.3f})" if interval else "")
            paired = task.get("recovery_ci95")
            shown = "n/a" if task["recovery"] is None else f"{task['recovery']:.3f}" + (
                f" ({paired['low']:.3f}-{paired['high']:.3f})" if paired else "")
            lines.append(f"| {r['recipe']} | {task['name']} | {task['metric']} | {task['samples']} | "
                         f"{task['score']:.4f} | {base} | {shown} |")
    return lines


# llama-perplexity --kl-divergence labels shown in the report, all positions then the second half
LLAMA_CPP_LABELS = ("Mean KLD", "Maximum KLD", "99.9% KLD", "99.0% KLD", "95.0% KLD", "90.0% KLD", "Median KLD",
                    "Mean Δp %", "RMS Δp %", "Same top p %")


def llama_cpp_table(rows: list[dict[str, Any]]) -> list[str]:
    """llama.cpp's KL-divergence statistics per artifact, under its labels, so that a table
    from llama-perplexity --kl-divergence compares line by line."""
    measured = [r for r in rows if r.get("llama_cpp")]
    if not measured:
        return []
    lines = ["", "## llama.cpp's statistics", "",
             "As `llama-perplexity --kl-divergence` prints them, over every position; the last two columns over "
             "the second half of each window, the positions llama-perplexity scores.", "",
             "| recipe | " + " | ".join(LLAMA_CPP_LABELS) + " | 2nd half: PPL(Q)/PPL(base) | 2nd half: Mean KLD |",
             "|" + "---|" * (len(LLAMA_CPP_LABELS) + 3)]
    for r in measured:
        half = r.get("second_half") or {}
        cells = [f"{r['llama_cpp'][label]:.6f}" if "KLD" in label else f"{r['llama_cpp'][label]:.3f}"
                 for label in LLAMA_CPP_LABELS]
        cells += [f"{half['ppl_ratio']:.6f}" if half else "", f"{half['mean_kld']:.6f}" if half else ""]
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    return lines


def position_table(rows: list[dict[str, Any]]) -> list[str]:
    """Mean KLD (95 % interval), 99.9 % KLD and top-1 per bucket of positions (params
    reference.position_buckets), where a window reaches past the first bucket."""
    measured = [r for r in rows if len(r.get("by_position") or {}) > 1]
    if not measured:
        return []
    labels = list(measured[0]["by_position"])
    lines = ["", "## By position", "",
             "Each figure over the positions of each bucket of every window (params `reference.position_buckets`): "
             "mean KLD (95 % interval) / 99.9 % KLD / top-1.", "",
             "| recipe | " + " | ".join(f"positions {label}" for label in labels) + " |",
             "|" + "---|" * (len(labels) + 1)]
    for r in measured:
        cells = []
        for label in labels:
            bucket = r["by_position"].get(label)
            interval = (bucket or {}).get("ci95", {}).get("mean_kld")
            cells.append("" if bucket is None else
                         f"{bucket['mean_kld']:.4f} ({interval['low']:.4f}–{interval['high']:.4f}) / "
                         f"{bucket['p999_kld']:.3f} / {bucket['top1_agreement']:.3f}")
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    return lines


def depth_table(rows: list[dict[str, Any]]) -> list[str]:
    """Decode at each of params speed.depths, where the runtime measured it."""
    measured = [r for r in rows if r.get("by_depth")]
    if not measured:
        return []
    depths = list(measured[0]["by_depth"])
    lines = ["", "## Decode at depth", "",
             "Decode tok/s at each context depth of params `speed.depths` (llama-bench -d) / its roofline fraction "
             "(weights and the KV cache read at that depth, in the cache's own types) / KV-cache MB read per token.",
             "", "| recipe | " + " | ".join(f"depth {depth}" for depth in depths) + " |",
             "|" + "---|" * (len(depths) + 1)]
    for r in measured:
        cells = []
        for depth in depths:
            figures = r["by_depth"].get(depth)
            fraction = (figures or {}).get("roofline_fraction")
            cells.append("" if figures is None else
                         f"{figures['decode_tok_s']:.1f} / {'n/a' if fraction is None else f'{fraction:.2f}'} / "
                         f"{figures['kv_cache_bytes'] / 1e6:.1f}")
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Quality vs speed: the rows with both figures, the Pareto front joined."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(8, 5.5), dpi=120)
    plotted = [r for r in rows if r.get("pareto") is not None]
    largest = max((r["bytes"] for r in plotted), default=1)
    for r in plotted:
        axis.scatter(r["decode_tok_s"], r["mean_kld"], s=60 + 600 * r["bytes"] / largest,
                     color="tab:red" if r["pareto"] else "tab:blue", alpha=0.6, edgecolors="black",
                     marker=SEARCHED_MARKER if r.get("searched") is not None else "o")
        axis.annotate(f"{r['recipe']}{SEARCHED_LABEL if r.get('searched') is not None else ''}\n"
                      f"{r['size_mb']:.0f} MB", (r["decode_tok_s"], r["mean_kld"]),
                      textcoords="offset points", xytext=(8, 6), fontsize=8)
    front = sorted((r for r in plotted if r["pareto"]), key=lambda r: r["decode_tok_s"])
    if len(front) > 1:
        axis.plot([r["decode_tok_s"] for r in front], [r["mean_kld"] for r in front], "--", color="tab:red",
                  label="Pareto front")
        axis.legend()
    axis.set_xlabel("decode tok/s (batch 1, native runtime)")
    axis.set_ylabel("mean KLD vs reference (lower is better)")
    axis.set_title("Quality vs speed (point area ~ file size)")
    _finish(plt, fig, axis, path, [r["recipe"] for r in rows if r.get("pareto") is None])


def plot_quality_vs_size(rows: list[dict[str, Any]], path: Path) -> None:
    """Quality vs size for every artifact with both figures, whatever its format, with the 95 %
    interval of its mean KLD (log scale: near-lossless and 4-bit quants differ 50-fold)."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(8, 5.5), dpi=120)
    plotted = [r for r in rows if r.get("mean_kld") is not None and r.get("size_mb") is not None]
    colours = {name: f"C{i}" for i, name in enumerate(sorted({r["format"] for r in plotted}))}
    for r in plotted:
        interval = r.get("mean_kld_ci95")
        error = [[r["mean_kld"] - interval["low"]], [interval["high"] - r["mean_kld"]]] if interval else None
        axis.errorbar(r["size_mb"], r["mean_kld"], yerr=error, fmt=SEARCHED_MARKER if r.get("searched") is not None
                      else "o", color=colours[r["format"]], capsize=3, markeredgecolor="black", alpha=0.8)
        axis.annotate(r["recipe"] + (SEARCHED_LABEL if r.get("searched") is not None else ""), (r["size_mb"], r["mean_kld"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for name, colour in colours.items():
        axis.scatter([], [], color=colour, edgecolors="black", label=name)
    if colours:
        axis.legend(title="format")
        axis.set_yscale("log")
    axis.set_xlabel("artifact size (MB)")
    axis.set_ylabel("mean KLD vs reference, 95 % interval (lower is better)")
    axis.set_title("Quality vs size, every format")
    _finish(plt, fig, axis, path, [r["recipe"] for r in rows if r not in plotted])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, axis, path: Path, missing: list[str]) -> None:
    axis.grid(alpha=0.3)
    if missing:
        fig.text(0.01, 0.01, "not plotted (figure not measured): " + ", ".join(missing), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(params, out_dir: Path, log=print) -> list[dict[str, Any]]:
    """The report over params `recipes`; a gate result judged against other params or limits
    than `params` and the recipe files now is marked stale (``gates.stale``) and named."""
    from pipeline import layout
    from pipeline.files import atomic_dir
    from pipeline.gates import load_results
    from pipeline.gates.stale import stale_results

    results = load_results(params.recipes)
    rows = build_rows(results, layout.BUILDS_DIR)
    stale = stale_results(results, params)
    for r in rows:
        r["stale"] = stale.get(r["recipe"])
        if r["stale"]:
            log(f"report: {r['recipe']} is stale: {r['stale']}; {FIX}")
    reference_meta = read_json(layout.REFERENCE_DIR / "reference.json")
    host = results[0]["host"] if results else {}
    with atomic_dir(out_dir) as staging:
        write_json(staging / "tradeoff.json", {"objectives": DEFAULT_OBJECTIVES, "reference": reference_meta,
                                               "host": host, "rows": rows})
        write_text(staging / "tradeoff.md", markdown(rows, reference_meta, host))
        write_json(staging / "points.json", [
            {"recipe": r["recipe"], "decode_tok_s": r["decode_tok_s"], "mean_kld": r["mean_kld"],
             "size_mb": round(r["size_mb"], 1), "pareto": bool(r["pareto"])}
            for r in rows if r.get("pareto") is not None
        ])
        plot(rows, staging / "pareto.png")
        plot_quality_vs_size(rows, staging / "quality_vs_size.png")
    log(f"report: {len(rows)} artifacts, {sum(1 for r in rows if r['pareto'])} on the Pareto front")
    return rows
