"""The recipe@R and build@R stages: a validated recipe's build knobs, then its artifact.

build@R writes artifacts/builds/R/ (the artifact and build.json, everything in it a function
of the inputs, so that a byte-identical rebuild leaves every gate cached) and
artifacts/runs/build@R.json (how long it took, its peak memory, when and with how many
threads: a record beside it that nothing depends on). Schemas: docs/design.md.
"""

from __future__ import annotations

from typing import Any

from pipeline import layout



def write_build_spec(name: str) -> dict:
    """The recipe@R stage: validate recipes/R.yaml early and write its build knobs (a searched
    recipe's tensor types solved on the sensitivity measurement), plus the
    host facts a format's build depends on (``host_build_knobs``, e.g. calibrating on a GPU),
    so that moving to another kind of host rebuilds exactly the builds it changes; and, apart,
    its engine settings for the engine@R stage."""
    from pipeline import formats
    from pipeline.files import read_json, write_json

    recipe = formats.load_recipe(name)
    spec = {"recipe": name, "build": formats.build_spec(recipe)}
    if getattr(recipe, "search", None):
        from pipeline import sensitivity

        keys, searched = formats.module(recipe.format).resolve_search(recipe, sensitivity.load(layout.SENSITIVITY_DIR))
        spec["build"].update(keys)
        spec["search"] = {**searched, "sets": sorted(keys)}
    host_build_knobs = getattr(formats.module(recipe.format), "host_build_knobs", None)
    if host_build_knobs:
        spec["host"] = host_build_knobs(read_json(layout.HOST_FILE) if layout.HOST_FILE.is_file() else {})
    write_json(layout.recipe_spec(name), spec)
    write_json(layout.engine_spec(name), formats.engine_spec(recipe))
    return spec


def run_build(name: str, *, threads: int, log=print) -> dict:
    """The build@R stage: recipe R -> artifacts/builds/R/ (artifact files + build.json) and
    its run record. Returns build.json's record."""
    import json
    import time

    from pipeline import formats, runs
    from pipeline.errors import BadInput, RecipeNotApplicable
    from pipeline.files import artifact_bytes, atomic_dir, sha256_artifact
    from pipeline.source import checkpoint_sha256

    recipe, searched = with_searched_types(formats.load_recipe(name), name)
    if not (layout.SOURCE_DIR / "source.json").is_file():
        raise BadInput("no source checkpoint", where=str(layout.SOURCE_DIR), fix="run `qpipe source` first")
    if not layout.CALIBRATION_TEXT.is_file():
        raise BadInput("no calibration text", where=str(layout.CALIBRATION_TEXT), fix="run `qpipe corpus` first")
    fmt = formats.module(recipe.format)
    memory_record = check_build_memory(fmt.INFO, recipe, layout.SOURCE_DIR)
    started = time.perf_counter()
    try:
        with atomic_dir(layout.build_dir(name)) as staging:
            facts = fmt.build(recipe, source_dir=layout.SOURCE_DIR, calibration_text=layout.CALIBRATION_TEXT,
                              out_dir=staging, threads=threads, log=log)
            facts, run_facts = runs.split(facts)
            artifact = fmt.artifact_path(staging)
            artifact_facts = {"file": artifact.name if artifact != staging else ".",
                              "bytes": artifact_bytes(artifact), "sha256": sha256_artifact(artifact)}
            source = json.loads((layout.SOURCE_DIR / "source.json").read_text())
            record = {
                "schema_version": layout.SCHEMA_VERSION,
                "recipe": name,
                "format": recipe.format,
                "resolved_recipe": recipe.model_dump(),
                "source": {"origin": source["origin"], "sha256": checkpoint_sha256(layout.SOURCE_DIR)},
                "artifact": artifact_facts,
                **facts,
                **({"search": searched} if searched else {}),
            }
            (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    except RecipeNotApplicable as refusal:
        record = write_refusal(name, recipe, refusal, log)
        runs.write(f"build@{name}", started, threads=threads, memory=memory_record, status="refused")
        return record
    run = runs.write(f"build@{name}", started, threads=threads, memory=memory_record, status="ok", **run_facts)
    log(f"build {name}: {record['artifact']['bytes'] / 1e6:.1f} MB in {run['wall_s']:.1f} s")
    return record


def with_searched_types(recipe, name: str) -> tuple[Any, dict | None]:
    """A searched recipe with the tensor types its recipe@R stage solved (artifacts/recipes/R.json),
    and what that stage recorded of the search; any other recipe as it is, and None."""
    if not getattr(recipe, "search", None):
        return recipe, None
    from pipeline.errors import BadInput
    from pipeline.files import read_json

    spec_file = layout.recipe_spec(name)
    spec = read_json(spec_file) if spec_file.is_file() else {}
    if "search" not in spec or spec["build"].get("search") != recipe.search.model_dump():
        raise BadInput("the recipe's search has not been solved", where=str(spec_file),
                       fix=f"run `qpipe recipe {name}` (or `dvc repro`) first")
    return recipe.model_copy(update={key: spec["build"][key] for key in spec["search"]["sets"]}), spec["search"]


def build_memory_need(info, recipe, source_dir, *, gpu: bool | None = None):
    """What a build of `recipe` needs (``memory.Need``): a calibrating format calibrates on the
    GPU where there is a usable one (`gpu`; None: this host's answer), so that is the memory
    it needs."""
    from pipeline import memory

    from pipeline.host import has_usable_gpu

    device = "cuda" if info.calibrates and (has_usable_gpu() if gpu is None else gpu) else "cpu"
    return memory.Need(recipe.build_memory(info.build_memory), memory.ModelSize.of(source_dir),
                       window_tokens=recipe.calibration_seq_len if info.calibrates else 0,
                       dtype=recipe.weights_dtype(), device=device)


def check_build_memory(info, recipe, source_dir) -> dict:
    """Refuse a build the host cannot hold (exit 3), before it loads anything."""
    from pipeline import memory

    return memory.ensure_fits(build_memory_need(info, recipe, source_dir), stage=f"the {info.name} build",
                              fix="run the build on a host with more memory" + (" or a GPU" if info.calibrates else ""))


def write_refusal(name: str, recipe, refusal, log=print) -> dict:
    """A recipe that cannot apply to this model: build.json says ``refused`` and why, and the
    stage succeeds, so that every other recipe still builds and gates; the gate records the
    refusal and `qpipe check` (the last stage) fails on it."""
    import json

    from pipeline.files import atomic_dir

    record = {"schema_version": layout.SCHEMA_VERSION, "recipe": name, "format": recipe.format, "status": "refused",
              "reason": refusal.what, "where": refusal.where, "fix": refusal.fix,
              "resolved_recipe": recipe.model_dump()}
    with atomic_dir(layout.build_dir(name)) as staging:
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"build {name}: refused for this model: {refusal.one_line().removeprefix('error: ')}")
    return record
