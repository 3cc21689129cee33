"""The engine@R stage: a runtime engine built from a build, where the recipe's format has one.

Runs for every recipe and writes artifacts/engines/R/engine.json, so that gate@R can depend
on it uniformly. A format with an engine step defines the hook ``build_engine`` (modelopt:
TensorRT engines with trtllm-build); its record says ``ok`` (and where the engine is) or
``not_run`` and why, and the gate then scores the build without it. Every other format gets
``not_applicable``. The stage depends on host.json, so moving to a GPU host re-runs it; its
seconds go to the run record artifacts/runs/engine@R.json. Details: docs/formats/modelopt.md.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline import layout


def read_record(recipe: str) -> dict[str, Any] | None:
    from pipeline.files import read_json

    path = layout.engine_record(recipe)
    return read_json(path) if path.is_file() else None


def run_engine(name: str, log=print) -> dict[str, Any]:
    from pipeline import formats, runs
    from pipeline.files import atomic_dir, write_json

    recipe = formats.load_recipe(name)
    fmt = formats.module(recipe.format)
    hook = getattr(fmt, "build_engine", None)
    started = time.perf_counter()
    with atomic_dir(layout.engine_dir(name)) as staging:
        if hook is None:
            with_engines = [other for other in formats.FORMATS if hasattr(formats.module(other), "build_engine")]
            outcome = {"status": "not_applicable",
                       "reason": f"format {recipe.format} has no engine step (formats with one: "
                                 f"{', '.join(with_engines) or 'none'})"}
        else:
            outcome = hook(recipe, layout.build_dir(name), staging, log)
        outcome, run_facts = runs.split(outcome)
        record = {"recipe": name, "format": recipe.format, **outcome}
        write_json(staging / layout.engine_record(name).name, record)
    runs.write(f"engine@{name}", started, status=record["status"], **run_facts)
    log(f"engine {name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""))
    return record
