"""The engine@R stage: a TensorRT engine from a ModelOpt build's TensorRT-LLM checkpoint.

Runs for every recipe and writes artifacts/engines/R/engine.json, so that gate@R can depend
on it uniformly:

- ``ok``: ``trtllm-build`` (TensorRT-LLM 1.2.x) built the engine into
  ``artifacts/engines/R/<sm>-trt<TensorRT version>/`` (engines are tied to both), with the
  tokenizer files beside it;
- ``not_run`` with the reason (no CUDA GPU, TensorRT-LLM absent or >= 1.3, or the recipe's
  ``engine.build: never``): the gate then scores the checkpoint through the emulation and
  reports speed as ``not_run`` with this reason;
- ``not_applicable`` for formats other than modelopt.

The stage depends on host.json, so moving to a GPU host re-runs it. ``engine.build:
required`` turns ``not_run`` into an error (exit 3).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline import layout

RECORD = "engine.json"


def read_record(recipe: str) -> dict[str, Any] | None:
    from pipeline.files import read_json

    path = layout.engine_dir(recipe) / RECORD
    return read_json(path) if path.is_file() else None


def engine_path(recipe: str, record: dict[str, Any]) -> Path:
    return layout.engine_dir(recipe) / record["path"]


def run_engine(name: str, log=print) -> dict[str, Any]:
    from pipeline.config import load_recipe
    from pipeline.files import atomic_dir, write_json

    recipe = load_recipe(name)
    with atomic_dir(layout.engine_dir(name)) as staging:
        record = {"recipe": name, "format": recipe.format, **_engine(recipe, name, staging, log)}
        write_json(staging / RECORD, record)
    log(f"engine {name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""))
    return record


def _engine(recipe, name: str, staging: Path, log) -> dict[str, Any]:
    from pipeline.errors import BadInput, HostLacks
    from pipeline.files import artifact_bytes, read_json, verify_artifact

    if recipe.format != "modelopt":
        return {"status": "not_applicable",
                "reason": f"format {recipe.format} has no TensorRT engine; TensorRT engines are built for format modelopt"}
    if recipe.engine.build == "never":
        return {"status": "not_run", "reason": "the recipe says engine.build: never"}
    from pipeline.runtimes import tensorrt_llm

    host_info = read_json(layout.HOST_FILE) if layout.HOST_FILE.is_file() else {}
    reason = tensorrt_llm.unavailable_reason(has_gpu=bool(host_info.get("gpus")))
    if reason:
        if recipe.engine.build == "required":
            raise HostLacks(f"an engine was required, but {reason}", where=recipe.where("engine.build"),
                            fix="set engine.build: auto (the gate then scores the checkpoint through the emulation) "
                                "or run on a CUDA host with `qpipe[trtllm]`")
        return {"status": "not_run", "reason": reason}

    from pipeline.formats import modelopt

    build_dir = layout.build_dir(name)
    if not (build_dir / "build.json").is_file():
        raise BadInput(f"no build for recipe {name}", where=str(build_dir), fix=f"run `qpipe build {name}` first")
    build = read_json(build_dir / "build.json")
    if build.get("status") == "refused":
        return {"status": "not_run", "reason": f"the build was refused: {build['reason']}"}
    if "trtllm" not in build["exports"]:
        reason = (f"ModelOpt wrote no TensorRT-LLM checkpoint for {build['modelopt']['architecture']}, so there is "
                  f"nothing for trtllm-build; its unified checkpoint ({modelopt.HF_DIR}/) runs on "
                  f"{build['exports']['hf']['runs_on']}")
        if recipe.engine.build == "required":
            raise BadInput(f"an engine was required, but {reason}", where=recipe.where("engine.build"),
                           fix="set engine.build: auto for this model")
        return {"status": "not_run", "reason": reason}

    verify_artifact(build_dir, build)
    target = tensorrt_llm.engine_target()
    engine_dir = staging / tensorrt_llm.engine_dir_name(target)
    started = time.perf_counter()
    built = tensorrt_llm.build_engine(modelopt.artifact_path(build_dir), engine_dir, recipe.engine, log=log)
    modelopt.copy_tokenizer(modelopt.artifact_path(build_dir), engine_dir)
    return {"status": "ok", "path": engine_dir.name, **target, **built,
            "knobs": recipe.engine.model_dump(), "bytes": artifact_bytes(engine_dir),
            "wall_s": round(time.perf_counter() - started, 2)}
