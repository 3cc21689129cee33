"""The README's table of the default run, from that run's own outputs: artifacts/report/tradeoff.md
(written by `dvc repro`'s report stage) and the unquantized f16 GGUF's speed
(artifacts/baselines/gguf.json); and docs/checkpoints.md's table of the limits that
`qpipe limits suggest` fits to that run (artifacts/gates/), beside the shipped ones.

    python benchmarks/results_table.py            # print it
    python benchmarks/results_table.py --write    # put it into the README (`make docs` runs this
                                                  # when a run's artifacts are there)

The KLD and its interval share a column, the decode speed and its spread too; nothing is
re-measured or re-rounded beyond what the report wrote.
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

SCRIPT = Path(__file__).name
DOC = REPO / "README.md"
LIMITS_DOC = REPO / "docs" / "checkpoints.md"
REPORT = REPO / "artifacts/report/tradeoff.md"
BASELINE = REPO / "artifacts/baselines/gguf.json"
HEADER = ("| recipe | size MB | bits/w | ppl ratio | mean KLD (95 % CI) | top-1 | prefill tok/s | decode tok/s (± sd) "
          "| vs f16 | roofline | verdict | Pareto |")


def report_rows(report: str) -> list[list[str]]:
    """The cells of the report's tradeoff table (its first table), header and rule left out."""
    lines = report.split("\n| recipe |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def table(report: str, baseline: dict) -> str:
    lines = [HEADER, "|---" * 12 + "|"]
    for recipe, size, bits, ppl, kld, interval, top1, prefill, decode, sd, vs, roofline, verdict, pareto in \
            report_rows(report):
        kld_cell = f"{kld} ({interval.replace('-', '–')})" if interval else kld
        decode_cell = f"{decode} ± {sd}" if sd else decode
        lines.append(f"| {recipe} | {size} | {bits} | {ppl} | {kld_cell} | {top1} | {prefill} | {decode_cell} | {vs} "
                     f"| {roofline} | {verdict} | {pareto} |")
    if baseline.get("status") == "ok":
        lines += ["", f"Unquantized f16 GGUF: decode {baseline['decode_tok_s']:.1f} ± "
                      f"{baseline['spread']['decode_tok_s']['stdev']:.1f} tok/s, prefill "
                      f"{baseline['prefill_tok_s']:.0f} tok/s ({baseline['timing_source'].split(';')[0]})."]
    return "\n".join(lines) + "\n"


def render() -> str:
    return table(REPORT.read_text(), json.loads(BASELINE.read_text()))


# the accuracy limits `qpipe limits suggest` fits, with the interval bound each is fitted to
SUGGESTED = (("max_mean_kld", "mean KLD"), ("max_ppl_ratio", "ppl ratio"), ("min_top1_agreement", "top-1"))


def suggested_table(results: list[dict]) -> str:
    """Per recipe and accuracy limit: the figure's 95 % bound, the limit the run was judged by
    and where it was set, and the one `qpipe limits suggest` (margin 1.5) fits to the run."""
    from pipeline.config import LIMIT_BY_KEY
    from pipeline.gates.verdict import figure_value
    from pipeline.limits import DEFAULT_MARGIN, suggest

    fitted, _ = suggest(results, DEFAULT_MARGIN)
    lines = ["| recipe | " + " | ".join(f"{label}: 95 % bound / shipped / suggested" for _, label in SUGGESTED) + " |",
             "|---" * (1 + len(SUGGESTED)) + "|"]
    for result in results:
        checks = {check["name"]: check for check in result["checks"]}
        cells = []
        for key, _ in SUGGESTED:
            spec = LIMIT_BY_KEY[key]
            interval = figure_value(result.get(spec.gate) or {}, spec.interval) or {}
            bound = interval.get("high" if spec.comparison == "<=" else "low")
            shipped = checks.get(key, {}).get("limit")
            suggested = fitted.get(result["recipe"], {}).get(key)
            cells.append(" / ".join("—" if value is None else f"{value:.4g}" for value in (bound, shipped, suggested)))
        lines.append(f"| {result['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nMargin {DEFAULT_MARGIN:g}; shipped: the limit the run was judged by (a relative one " \
        "resolved); `qpipe limits suggest` on the default run, `python benchmarks/results_table.py`.\n"


def render_suggested() -> str:
    from pipeline.config import load_params
    from pipeline.gates import load_results

    return suggested_table(load_results(load_params().recipes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the table in the README")
    args = parser.parse_args()
    if not REPORT.is_file() or not BASELINE.is_file():
        print(f"no {REPORT.relative_to(REPO)} or {BASELINE.relative_to(REPO)}: run `make repro` first", file=sys.stderr)
        return 2
    doc_blocks.show_or_write([(DOC, "results", render), (LIMITS_DOC, "suggested-limits", render_suggested)], SCRIPT,
                             write_them=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
