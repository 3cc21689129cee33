"""The task tables of the docs, from the committed task benchmarks (benchmarks/results/, written
by benchmarks/task_gate.py with --out; the commands are in the files).

    python benchmarks/task_table.py            # print them
    python benchmarks/task_table.py --write    # put them into the docs (`make docs` runs this)

- docs/tasks.md "The embedded model's recovery": per recipe and task, recovery against the unquantized model and its
  paired 95 % interval; a recovery whose interval excludes 1 is marked, the rest are within
  the noise of that many documents.
- docs/tasks.md "What it costs": seconds per document, per task and model, of both benchmarks.

A test checks that the docs hold what this prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS)]

import doc_blocks  # noqa: E402 (beside this script)

SCRIPT = Path(__file__).name
RESULTS = BENCHMARKS / "results" / "tasks-smollm2-135m.json"
COST_RESULTS = BENCHMARKS / "results" / "task-cost-smollm2-135m.json"  # MMLU and GSM8K, a few documents
TITLES = {"arc_easy": "ARC-Easy", "hellaswag": "HellaSwag", "lambada_openai": "LAMBADA", "winogrande": "WinoGrande",
          "piqa": "PIQA", "mmlu_high_school_mathematics": "MMLU (5-shot, one subject)", "gsm8k": "GSM8K (5-shot)"}


def beyond_noise(task: dict) -> bool:
    interval = task.get("recovery_ci95")
    return bool(interval) and not interval["low"] <= 1.0 <= interval["high"]


def _recovery_cell(task: dict) -> str:
    if task.get("recovery") is None:
        return "n/a"
    interval = task.get("recovery_ci95")
    cell = f"{task['recovery']:.3f}" + (f" ({interval['low']:.2f}–{interval['high']:.2f})" if interval else "")
    return f"**{cell}**" if beyond_noise(task) else cell


def table(results: dict) -> str:
    base, *recipes = results["models"]
    names = [task["name"] for task in base["tasks"]]
    titles = [TITLES.get(name, name) for name in names]
    lines = ["| model | " + " | ".join(titles) + " | gate s |", "|---" * (len(names) + 2) + "|"]
    scores = [f"{task['score']:.3f} ({task['ci95']['low']:.2f}–{task['ci95']['high']:.2f})" if task.get("ci95")
              else f"{task['score']:.3f}" for task in base["tasks"]]
    lines.append(f"| unquantized (score) | {' | '.join(scores)} | {base['seconds']:.0f} |")
    for model in recipes:
        by_name = {task["name"]: task for task in model["tasks"]}
        cells = [_recovery_cell(by_name[name]) if name in by_name else "not run" for name in names]
        lines.append(f"| {model['model']} | {' | '.join(cells)} | {model['seconds']:.0f} |")
    marked = [f"{model['model']} {TITLES.get(task['name'], task['name'])}" for model in recipes
              for task in model["tasks"] if beyond_noise(task)]
    metrics = ", ".join(sorted({f"{TITLES.get(t['name'], t['name'])} {t['metric'].split(',')[0]}"
                                for t in base["tasks"]}))
    samples = sorted({task["samples"] for task in base["tasks"]})
    lines += ["", f"{'–'.join(map(str, samples))} documents a task ({metrics}); {results['threads']} threads, "
                  f"{results['host']}; `{results['command']}`. "
              + ("Beyond the noise (interval excludes 1, in bold): " + ", ".join(marked) + "." if marked
                 else "No recovery is beyond the noise: every interval includes 1.")]
    return "\n".join(lines) + "\n"


def cost_table(results: list[dict]) -> str:
    """Seconds per document of every task and model of the benchmark results, one row a model."""
    names = list(dict.fromkeys(task["name"] for result in results for task in result["models"][0]["tasks"]))
    lines = ["| model | runtime | " + " | ".join(TITLES.get(name, name) for name in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    rows: dict[str, dict] = {}
    for result in results:
        for model in result["models"]:
            row = rows.setdefault(model["model"], {"runtime": model["runtime"].split(" (")[0].split(":")[0]})
            row.update({task["name"]: task["seconds"] / task["samples"] for task in model["tasks"]})
    for model, row in rows.items():
        cells = [f"{row[name]:.2f}" if name in row else "" for name in names]
        lines.append(f"| {model} | {row['runtime']} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per document (model load excluded); " + "; ".join(
        f"{'–'.join(map(str, sorted({t['samples'] for t in r['models'][0]['tasks']})))} documents a task: "
        f"`{r['command']}`" for r in results)
        + f" ({results[0]['threads']} threads, {results[0]['host']})."]
    return "\n".join(lines) + "\n"


def render_recovery() -> str:
    return table(json.loads(RESULTS.read_text()))


def render_cost() -> str:
    return cost_table([json.loads(RESULTS.read_text()), json.loads(COST_RESULTS.read_text())])


# (doc, name of the block, the function that renders it)
BLOCKS = [(REPO / "docs/tasks.md", "tasks", render_recovery), (REPO / "docs/tasks.md", "cost", render_cost)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the tables in the docs")
    args = parser.parse_args()
    doc_blocks.show_or_write(BLOCKS, SCRIPT, write_them=args.write)


if __name__ == "__main__":
    main()
