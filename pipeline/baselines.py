"""The formats and baseline stages: the unquantized model's speed in each format that `recipes`
uses, for decode_speedup.

The formats stage writes the formats `recipes` uses to artifacts/formats.json, the baseline
stage's input: a recipe set of the same formats leaves that file, and so the baseline and every
gate, as they were. A format no recipe uses is not measured (on a GPU host a GGUF-only run
would otherwise build a TensorRT-LLM engine of the whole model). Each format measures its
unquantized model on the runtime its artifacts' speed gate uses, with the same prompt and
settings, into artifacts/baselines/<format>.json. A baseline that cannot run here, or that fails, records
``not_run`` and why: the gates of that format then leave their speedup unjudged, and every
other gate goes on. How speedups are computed: docs/methodology.md.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import layout


def formats_used(recipe_names: list[str]) -> list[str]:
    """The registered formats of the recipes named, in registry order."""
    from pipeline import formats

    used = {formats.load_recipe(name).format for name in recipe_names}
    return [name for name in formats.FORMATS if name in used]


def write_formats_used(recipe_names: list[str]) -> list[str]:
    """The formats stage: artifacts/formats.json."""
    from pipeline.files import write_json

    used = formats_used(recipe_names)
    write_json(layout.FORMATS_USED_FILE, {"formats": used})
    return used


def run_baselines(speed_params, log=print) -> dict[str, Any]:
    from pipeline import formats, reference
    from pipeline.errors import BadInput
    from pipeline.files import atomic_dir, read_json
    from pipeline.gates import speed

    host_info, threads = speed.host_and_threads(speed_params)
    if not layout.FORMATS_USED_FILE.is_file():
        raise BadInput("no list of the formats to measure", where=str(layout.FORMATS_USED_FILE),
                       fix="run `qpipe formats` (or `dvc repro`) first")
    prompt = speed.speed_prompt(reference.load(layout.REFERENCE_DIR), speed_params)
    results = {}
    with atomic_dir(layout.BASELINES_DIR) as staging:
        for name in read_json(layout.FORMATS_USED_FILE)["formats"]:
            results[name] = measure(formats.module(name), prompt, speed_params, host_info, threads, log)
            (staging / f"{name}.json").write_text(json.dumps(results[name], indent=2) + "\n")
    return results


def measure(fmt, prompt: list[int], speed_params, host_info: dict[str, Any], threads: int, log) -> dict[str, Any]:
    """One format's baseline record: measured, or not_run with the reason it could not be."""
    from pipeline.gates import speed
    from pipeline.host import has_usable_gpu

    name = fmt.INFO.name
    reason = fmt.speed_unavailable_reason(None)
    if reason:
        return {"format": name, "status": "not_run", "reason": reason}
    log(f"baseline {name}: unquantized speed, {len(prompt)}-token prompt, {speed_params.gen_tokens} tokens")
    try:
        measured, lock_record = speed.measure_uncontended(
            lambda: fmt.baseline_speed(layout.SOURCE_DIR, prompt, speed_params, threads=threads),
            cpu_runtime=not has_usable_gpu(host_info), log=log)
    except Exception as error:  # any failure: the gates of this format go on without a speedup
        first_line = (str(error).strip().splitlines() or [""])[0]
        log(f"baseline {name}: not measured ({type(error).__name__}: {first_line})")
        return {"format": name, "status": "not_run",
                "reason": f"the unquantized baseline failed: {type(error).__name__}: {first_line}"}
    result = {"format": name, "status": "ok", "runtime": fmt.runtime_name(None), "threads": threads,
              "prompt_tokens": len(prompt), "gen_tokens": speed_params.gen_tokens, **measured}
    log(f"baseline {name}: decode {measured['decode_tok_s']:.1f} tok/s, prefill {measured['prefill_tok_s']:.0f} tok/s")
    return speed.contended(result, lock_record, cpu_runtime=not has_usable_gpu(host_info))
