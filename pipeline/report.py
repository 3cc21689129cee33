"""Tradeoff table, Pareto front and plot over the gate results of the recipes in params.

Quality is mean KLD from the reference (lower is better), speed is batch-1 decode tok/s on
the native runtime (higher is better). An artifact is on the Pareto front when no other
artifact is at least as good on both and strictly better on one. Artifacts missing either
figure (for instance speed `not_run`) are listed but take no part in the front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.files import read_json, write_json, write_text

# figure -> "min" or "max"
DEFAULT_OBJECTIVES = {"mean_kld": "min", "decode_tok_s": "max"}

COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("bits_per_weight", "bits/w", "{:.2f}"),
    ("ppl_ratio", "ppl ratio", "{:.4f}"),
    ("mean_kld", "mean KLD", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.3f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "vs f16", "{:.2f}x"),
    ("roofline_fraction", "roofline", "{:.2f}"),
    ("verdict", "verdict", "{}"),
    ("pareto", "Pareto", "{}"),
]


def row(result: dict[str, Any], build: dict[str, Any] | None) -> dict[str, Any]:
    accuracy = result["accuracy"] if result["accuracy"].get("status") == "ok" else {}
    speed = result["speed"] if result["speed"].get("status") == "ok" else {}
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
        "prefill_tok_s": speed.get("prefill_tok_s"),
        "decode_tok_s": speed.get("decode_tok_s"),
        "decode_speedup": speed.get("decode_speedup"),
        "ttft_ms": speed.get("ttft_ms"),
        "itl_ms": speed.get("itl_ms"),
        "roofline_fraction": speed.get("roofline_fraction"),
        "accuracy_runtime": result["accuracy"].get("runtime") or f"not_run: {result['accuracy'].get('reason')}",
        "speed_runtime": result["speed"].get("runtime") or f"not_run: {result['speed'].get('reason')}",
        "tensor_types": mix.get("byte_share"),
        "verdict": result["verdict"],
        "reasons": result.get("reasons", []),
    }


def pareto_front(rows: list[dict[str, Any]], objectives: dict[str, str] = DEFAULT_OBJECTIVES) -> list[bool | None]:
    """For each row: True on the front, False dominated, None when a figure is missing."""

    def oriented(r: dict[str, Any]) -> tuple[float, ...] | None:
        values = []
        for key, sense in objectives.items():
            value = r.get(key)
            if value is None:
                return None
            values.append(-value if sense == "min" else value)  # larger is better
        return tuple(values)

    points = [oriented(r) for r in rows]
    front: list[bool | None] = []
    for point in points:
        if point is None:
            front.append(None)
            continue
        dominated = any(
            other is not None and all(o >= p for o, p in zip(other, point)) and any(o > p for o, p in zip(other, point))
            for other in points
        )
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
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = r.get(key)
            if key == "pareto":
                cells.append({True: "yes", False: "", None: "n/a"}[value])
            elif value is None:
                cells.append("not run")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runtimes and tensor types", ""]
    for r in rows:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in (r.get("tensor_types") or {}).items())
        lines.append(f"- **{r['recipe']}**: accuracy via {r['accuracy_runtime']}; speed via {r['speed_runtime']}"
                     + (f"; bytes by tensor type: {mix}" if mix else "")
                     + (f"; tokenizer mismatch {r['tokenizer_mismatch']:.4%}" if r.get("tokenizer_mismatch") is not None else ""))
        for reason in r.get("reasons", []):
            lines.append(f"  - {r['verdict']}: {reason}")
    lines += ["", "Pareto front: lower mean KLD and higher decode tok/s; `n/a` = a figure was not measured.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5.5), dpi=120)
    plotted = [r for r in rows if r.get("pareto") is not None]
    largest = max((r["bytes"] for r in plotted), default=1)
    for r in plotted:
        axis.scatter(r["decode_tok_s"], r["mean_kld"], s=60 + 600 * r["bytes"] / largest,
                     color="tab:red" if r["pareto"] else "tab:blue", alpha=0.6, edgecolors="black")
        axis.annotate(f"{r['recipe']}\n{r['size_mb']:.0f} MB", (r["decode_tok_s"], r["mean_kld"]),
                      textcoords="offset points", xytext=(8, 6), fontsize=8)
    front = sorted((r for r in plotted if r["pareto"]), key=lambda r: r["decode_tok_s"])
    if len(front) > 1:
        axis.plot([r["decode_tok_s"] for r in front], [r["mean_kld"] for r in front], "--", color="tab:red",
                  label="Pareto front")
        axis.legend()
    axis.set_xlabel("decode tok/s (batch 1, native runtime)")
    axis.set_ylabel("mean KLD vs reference (lower is better)")
    axis.set_title("Quality vs speed (point area ~ file size)")
    axis.grid(alpha=0.3)
    missing = [r["recipe"] for r in rows if r.get("pareto") is None]
    if missing:
        fig.text(0.01, 0.01, "not plotted (figure not measured): " + ", ".join(missing), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(recipes: list[str], out_dir: Path, log=print) -> list[dict[str, Any]]:
    from pipeline import layout
    from pipeline.files import atomic_dir
    from pipeline.gates import load_results

    results = load_results(recipes)
    rows = build_rows(results, layout.BUILDS_DIR)
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
    log(f"report: {len(rows)} artifacts, {sum(1 for r in rows if r['pareto'])} on the Pareto front")
    return rows
