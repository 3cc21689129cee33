"""Which shipped KLD limits can be relative to another recipe, from two models' measurements.

The embedded model's figures are the default run's (the README's results table, which
benchmarks/results_table.py writes from that run); the second model's are
benchmarks/results/limits-qwen2.5-coder-0.5b.json (issue 31's run, transcribed: this host
reaches no model hub). For each recipe measured on both, two forms of max_mean_kld, each fitted
by the shipped rule (MARGIN x the measured figure) so that it passes both models:

- absolute: MARGIN x the embedded model's KLD (what the recipes ship);
- relative: {relative_to: ANCHOR, factor: F}, F = MARGIN x the larger of the two models'
  KLD / ANCHOR's KLD ratios.

A form's looseness on a model is its limit over the measured KLD (1.4 is a fit; above 5 the
report flags it as loose; below 1 it fails). The form that ships is the one whose worst
looseness over the two models is smaller, if that is at most 5; where neither form is, none
travels ("neither"): the recipe keeps its absolute limit and says so.
ppl ratio and top-1 stay absolute: the second model's Q4_K_M measures a ppl ratio below 1, so
no factor of another recipe's excess fits it.

    python benchmarks/limit_forms.py            # print the table
    python benchmarks/limit_forms.py --write    # put it into docs/checkpoints.md (`make docs`)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]

import doc_blocks  # noqa: E402 (beside this script)

from pipeline.limits import LOOSE_FACTOR  # noqa: E402

SCRIPT = Path(__file__).name
SECOND_MODEL = BENCHMARKS / "results" / "limits-qwen2.5-coder-0.5b.json"
ANCHOR = "gguf-q8_0"
MARGIN = 1.4  # the shipped recipes' rule: KLD may grow to 1.4x its measured value


def embedded_kld() -> dict[str, float]:
    """Each recipe's mean KLD in the README's results table (the default run)."""
    block = doc_blocks.current(REPO / "README.md", "results_table.py", "results")
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): float(cells[4].split()[0]) for cells in rows[1:]}


def forms() -> list[dict]:
    """One row per recipe measured on both models (the anchor aside)."""
    first, second = embedded_kld(), json.loads(SECOND_MODEL.read_text())["mean_kld"]
    rows = []
    for recipe in first:
        if recipe == ANCHOR or recipe not in second:
            continue
        measured = {"embedded": first[recipe], "second": second[recipe]}
        ratios = {model: measured[model] / {"embedded": first, "second": second}[model][ANCHOR] for model in measured}
        absolute = MARGIN * measured["embedded"]
        factor = MARGIN * max(ratios.values())
        anchors = {"embedded": first[ANCHOR], "second": second[ANCHOR]}
        looseness = {"absolute": {model: absolute / measured[model] for model in measured},
                     "relative": {model: factor * anchors[model] / measured[model] for model in measured}}
        worst = {form: max(values.values()) if min(values.values()) >= 1 else float("inf")
                 for form, values in looseness.items()}
        best = min(worst, key=worst.get)
        rows.append({"recipe": recipe, "kld": measured, "ratio": ratios, "absolute": absolute, "factor": factor,
                     "looseness": looseness, "ships": best if worst[best] <= LOOSE_FACTOR else "neither"})
    return rows


def looseness_cell(values: dict[str, float]) -> str:
    return " / ".join("fails" if value < 1 else f"{value:.1f}x" for value in values.values())


def render() -> str:
    second = json.loads(SECOND_MODEL.read_text())
    lines = [f"| recipe | mean KLD: embedded / {second['model'].split(' (')[0]} | ÷ {ANCHOR}'s | absolute limit: "
             "looseness | relative factor: looseness | ships |", "|---|---|---|---|---|---|"]
    for row in forms():
        lines.append(f"| {row['recipe']} | {row['kld']['embedded']:.4f} / {row['kld']['second']:.4f} | "
                     f"{row['ratio']['embedded']:.1f} / {row['ratio']['second']:.1f} | "
                     f"{row['absolute']:.3g}: {looseness_cell(row['looseness']['absolute'])} | "
                     f"{row['factor']:.3g}: {looseness_cell(row['looseness']['relative'])} | {row['ships']} |")
    lines += ["", f"Looseness is limit / measured on the embedded model / on the second, each form fitted at "
                  f"{MARGIN}x; `python benchmarks/{SCRIPT}`. Second model: {second['source']}."]
    return "\n".join(lines) + "\n"


BLOCKS = [(REPO / "docs" / "checkpoints.md", "limit-forms", render)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="put the table into docs/checkpoints.md")
    doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=parser.parse_args().write)


if __name__ == "__main__":
    main()
