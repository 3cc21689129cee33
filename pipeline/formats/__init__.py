"""Formats, registered by name. One module per format.

A format module owns everything about its format and exposes:

- ``Recipe``: the pydantic recipe model (subclass of ``config.RecipeBase``) with its knobs;
- ``build(recipe, *, source_dir, calibration_text, out_dir, threads, log)``: source checkpoint
  -> artifact files in a staging directory, returning the format-specific part of build.json;
- ``artifact_path(build_dir)``: the file (or directory) a runtime loads; ``runtime_name(build_dir)``:
  what the gates ran;
- ``window_logits(...)``, ``tokenize(...)``, ``measure_speed(...)``: run the native runtime
  (or a declared emulation, for accuracy only); ``accuracy_unavailable_reason(build_dir)`` and
  ``speed_unavailable_reason(build_dir)`` say why not, so the gate records ``not_run`` (the
  baseline stage asks with ``build_dir=None``);
- ``baseline_speed(...)``: the unquantized model's speed on the same runtime, for the
  ``baseline`` stage and ``decode_speedup``;
- ``decode_bytes_per_token(...)`` and ``bits_per_weight(...)`` for the roofline and report;
- optionally ``host_build_knobs(host_info)``: host facts its build depends on.

A build that finds, before any heavy work, that its recipe cannot apply to the model (a group
size that does not divide a width, an export the tool lacks for the architecture) raises
``errors.RecipeNotApplicable``: ``run_build`` then writes a ``refused`` build.json with the reason
and succeeds, so the other recipes still build and gate, and ``check`` fails on it.

Module import must stay light: heavy packages are imported inside the functions.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FORMATS: dict[str, str] = {
    "gguf": "pipeline.formats.gguf",
    "awq": "pipeline.formats.awq",
    "modelopt": "pipeline.formats.modelopt",
}


def module(name: str) -> ModuleType:
    return importlib.import_module(FORMATS[name])


def recipe_class(name: str):
    return module(name).Recipe


def build_spec(recipe) -> dict:
    """What a build depends on: the recipe without its gate limits, description and engine
    settings, so that tuning a limit re-runs the gate (an engine setting, the engine stage),
    not the build."""
    return {"format": recipe.format, **recipe.model_dump(exclude={"gates", "description", "format", "engine"})}


def require_installed(versions: dict[str, str | None], distribution: str, extra: str, where: str) -> None:
    """A build's tool must be installed: else exit 3 naming the extra that installs it."""
    from pipeline.errors import HostLacks

    if versions.get(distribution) is None:
        raise HostLacks(f"{distribution} is not installed", where=where,
                        fix=f"pip install 'qpipe[{extra}]' (make setup does)")


def calibration_host_knobs(host_info: dict) -> dict:
    """``host_build_knobs`` of a format that calibrates: on the GPU where there is one."""
    return {"calibration_device": "cuda" if host_info.get("gpus") else "cpu"}


def calibration_plan(recipe, threads: int) -> tuple[str, int]:
    """Seed torch and set its threads; return where a calibrating build runs and how many
    samples it takes there (``gpu_calibration_samples`` on CUDA, else ``calibration_samples``)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        return "cuda", recipe.gpu_calibration_samples
    return "cpu", recipe.calibration_samples


def write_build_spec(name: str) -> dict:
    """The recipe@R stage: validate recipes/R.yaml early and write its build knobs, plus the
    host facts a format's build depends on (``host_build_knobs``, e.g. calibrating on a GPU),
    so that moving to another kind of host rebuilds exactly the builds it changes."""
    from pipeline import layout
    from pipeline.config import load_recipe
    from pipeline.files import read_json, write_json

    recipe = load_recipe(name)
    spec = {"recipe": name, "build": build_spec(recipe)}
    host_build_knobs = getattr(module(recipe.format), "host_build_knobs", None)
    if host_build_knobs:
        spec["host"] = host_build_knobs(read_json(layout.HOST_FILE) if layout.HOST_FILE.is_file() else {})
    write_json(layout.recipe_spec(name), spec)
    return spec


def run_build(name: str, *, threads: int, log=print) -> dict:
    """The build@R stage: recipe R -> artifacts/builds/R/ (artifact files + build.json)."""
    import json
    import resource
    import time
    from datetime import datetime, timezone

    from pipeline import layout
    from pipeline.config import load_recipe
    from pipeline.errors import BadInput, RecipeNotApplicable
    from pipeline.files import artifact_bytes, atomic_dir, sha256_artifact
    from pipeline.source import checkpoint_sha256

    recipe = load_recipe(name)
    if not (layout.SOURCE_DIR / "source.json").is_file():
        raise BadInput("no source checkpoint", where=str(layout.SOURCE_DIR), fix="run `qpipe source` first")
    if not layout.CALIBRATION_TEXT.is_file():
        raise BadInput("no calibration text", where=str(layout.CALIBRATION_TEXT), fix="run `qpipe corpus` first")
    fmt = module(recipe.format)
    memory_record = check_build_memory(recipe, layout.SOURCE_DIR)
    started = time.perf_counter()
    try:
        with atomic_dir(layout.build_dir(name)) as staging:
            facts = fmt.build(recipe, source_dir=layout.SOURCE_DIR, calibration_text=layout.CALIBRATION_TEXT,
                              out_dir=staging, threads=threads, log=log)
            artifact = fmt.artifact_path(staging)
            artifact_facts = {"file": artifact.name if artifact != staging else ".",
                              "bytes": artifact_bytes(artifact), "sha256": sha256_artifact(artifact)}
            peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            source = json.loads((layout.SOURCE_DIR / "source.json").read_text())
            record = {
                "recipe": name,
                "format": recipe.format,
                "resolved_recipe": recipe.model_dump(),
                "source": {"origin": source["origin"], "sha256": checkpoint_sha256(layout.SOURCE_DIR)},
                "artifact": artifact_facts,
                **facts,
                "wall_s": round(time.perf_counter() - started, 2),
                "peak_rss_mb": round(peak_kib / 1024, 1),
                "memory": memory_record,
                "threads": threads,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    except RecipeNotApplicable as refusal:
        return write_refusal(name, recipe, refusal, log)
    log(f"build {name}: {record['artifact']['bytes'] / 1e6:.1f} MB in {record['wall_s']:.1f} s")
    return record


def check_build_memory(recipe, source_dir) -> dict:
    """Refuse a build the host cannot hold (exit 3), before it loads anything. A calibrating
    format calibrates on the GPU where there is one, so that is the memory it needs."""
    from pipeline import memory

    calibrating = hasattr(recipe, "calibration_seq_len")
    device = "cpu"
    if calibrating:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(recipe, "dtype", None) or ("bfloat16" if getattr(recipe, "outtype", "f16") == "bf16" else "float16")
    need = memory.estimate(f"build:{recipe.format}", memory.ModelSize.of(source_dir),
                           window_tokens=recipe.calibration_seq_len if calibrating else 0, dtype=dtype,
                           device=device)
    return memory.ensure_fits(need, stage=f"the {recipe.format} build", device=device,
                              fix="run the build on a host with more memory" + (" or a GPU" if calibrating else ""))


def write_refusal(name: str, recipe, refusal, log=print) -> dict:
    """A recipe that cannot apply to this model: build.json says ``refused`` and why, and the
    stage succeeds, so that every other recipe still builds and gates; the gate records the
    refusal and `qpipe check` (the last stage) fails on it."""
    import json

    from pipeline import layout
    from pipeline.files import atomic_dir

    record = {"recipe": name, "format": recipe.format, "status": "refused", "reason": refusal.what,
              "where": refusal.where, "fix": refusal.fix, "resolved_recipe": recipe.model_dump()}
    with atomic_dir(layout.build_dir(name)) as staging:
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"build {name}: refused for this model: {refusal.one_line().removeprefix('error: ')}")
    return record
