"""The gate@R stage: score the artifact as written to disk, measure its speed, check limits.

Writes artifacts/gates/R.json (a DVC metrics file) with the schema in DESIGN.md:
recipe, format, artifact, accuracy, speed, checks, verdict, host.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline import layout


def run_gate(name: str, *, params, log=print) -> dict[str, Any]:
    """Gate recipe `name` under `params` (params.yaml: speed settings and `limits` overrides)."""
    from pipeline import formats, host, reference
    from pipeline.config import effective_limits, load_recipe
    from pipeline.errors import BadInput
    from pipeline.files import read_json, verify_artifact, write_json
    from pipeline.gates import verdict

    recipe = load_recipe(name)
    limits, set_in = effective_limits(recipe, name, params)
    speed_params = params.speed
    fmt = formats.module(recipe.format)
    build_dir = layout.build_dir(name)
    if not (build_dir / "build.json").is_file():
        raise BadInput(f"no build for recipe {name}", where=str(build_dir), fix=f"run `qpipe build {name}` first")
    build = read_json(build_dir / "build.json")
    host_info, threads = _host_and_threads(speed_params)
    if build.get("status") == "refused":
        return _write_refused(name, recipe.format, limits.require, build, host_info, log)
    verify_artifact(build_dir, build)
    ref = reference.load(layout.REFERENCE_DIR)

    artifact = {
        "path": str(fmt.artifact_path(build_dir)),
        "bytes": build["artifact"]["bytes"],
        "sha256": build["artifact"]["sha256"],
        "bits_per_weight": fmt.bits_per_weight(build_dir),
    }
    memory_record = check_gate_memory(recipe.format, artifact["bytes"], ref, host_info)
    accuracy = run_accuracy(fmt, build_dir, ref, threads, log)
    speed = run_speed(fmt, recipe.format, build_dir, ref, speed_params, host_info, threads, log)
    sections = {"accuracy": accuracy, "speed": speed}
    checks = verdict.evaluate(limits, sections, set_in)
    outcome, reasons = verdict.overall(limits.require, sections, checks)
    result = {
        "recipe": name,
        "format": recipe.format,
        "artifact": artifact,
        "accuracy": accuracy,
        "speed": speed,
        "checks": checks,
        "require": limits.require,
        "verdict": outcome,
        "reasons": reasons,
        "host": host.summary(host_info),
        "memory": memory_record,
    }
    write_json(layout.gate_file(name), result)
    log(f"gate {name}: {outcome}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return result


def _write_refused(name: str, format_name: str, require: list[str], build: dict[str, Any],
                   host_info: dict[str, Any], log) -> dict[str, Any]:
    """The gate result of a build refused for this model: nothing ran, verdict ``refused``."""
    from pipeline import host
    from pipeline.files import write_json

    reason = f"the build was refused for this model: {build['reason']} (fix: {build['fix']})"
    result = {
        "recipe": name,
        "format": format_name,
        "artifact": {"path": None, "bytes": None, "sha256": None, "bits_per_weight": None},
        "accuracy": {"status": "not_run", "reason": reason},
        "speed": {"status": "not_run", "reason": reason},
        "checks": [],
        "require": require,
        "verdict": "refused",
        "reasons": [reason],
        "host": host.summary(host_info),
    }
    write_json(layout.gate_file(name), result)
    log(f"gate {name}: refused ({build['reason']})")
    return result


def _host_and_threads(speed_params) -> tuple[dict[str, Any], int]:
    """host.json (written by the host stage) and the thread count gates run with."""
    from pipeline import host
    from pipeline.errors import BadInput
    from pipeline.files import read_json

    if not layout.HOST_FILE.is_file():
        raise BadInput("no host description", where=str(layout.HOST_FILE), fix="run `qpipe host` first")
    host_info = read_json(layout.HOST_FILE)
    return host_info, host.worker_threads(speed_params.threads, host_info["cpu"])


def check_gate_memory(format_name: str, artifact_bytes: int, ref, host_info: dict[str, Any]) -> dict[str, Any]:
    """Refuse a gate the host cannot hold (exit 3). Only on a CPU host: on a GPU host the
    gates run in vLLM or TensorRT-LLM, which size their own memory pools."""
    from pipeline import memory

    if host_info.get("gpus"):
        return {"estimate_gb": None, "reason": "a GPU host: the GPU runtimes size their own memory"}
    output_layer_bytes = 4 * ref.meta["vocabulary"] * ref.meta["hidden_size"]  # float32, for the reference logits
    need = memory.estimate(f"gate:{format_name}", memory.ModelSize.of(layout.SOURCE_DIR),
                           window_tokens=int(ref.tokens.shape[1]),
                           mapped_bytes=(artifact_bytes if format_name == "gguf" else 0) + output_layer_bytes)
    return memory.ensure_fits(need, stage=f"the {format_name} gate", fix="run the gates on a host with more memory "
                       "or a GPU, or lower reference.window_tokens (the logits of one window are held at once)")


def run_accuracy(fmt, build_dir, ref, threads: int, log) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.gates import accuracy

    reason = fmt.accuracy_unavailable_reason(build_dir)
    if reason:
        return {"status": "not_run", "reason": reason}
    from pipeline.gates import speed

    started = time.perf_counter()
    with speed.heavy_work(), tqdm(total=len(ref.tokens), desc="accuracy windows", unit="win", leave=False) as bar:
        figures = accuracy.score(fmt.window_logits(build_dir, ref.tokens, threads), ref,
                                 progress=lambda n: bar.update(1))
    tokenizer = accuracy.tokenizer_mismatch(ref.text_tokens.tolist(),
                                            fmt.tokenize(build_dir, _evaluation_text()))
    return {"status": "ok", "runtime": fmt.runtime_name(build_dir), **figures,
            "tokenizer_mismatch": tokenizer["mismatch"], "tokenizer": tokenizer,
            "seconds": round(time.perf_counter() - started, 2)}


def speed_prompt(ref, speed_params) -> list[int]:
    """The first `speed.prompt_tokens` ids of the evaluation text: the same prompt everywhere."""
    prompt = ref.text_tokens[: speed_params.prompt_tokens].tolist()
    if len(prompt) < speed_params.prompt_tokens:
        from pipeline.errors import BadInput

        raise BadInput(f"the evaluation text has only {len(prompt)} tokens for a "
                       f"{speed_params.prompt_tokens}-token speed prompt",
                       where="params.yaml: speed.prompt_tokens", fix="lower it or use a longer text")
    return prompt


def run_speed(fmt, format_name: str, build_dir, ref, speed_params, host_info, threads: int, log) -> dict[str, Any]:
    from pipeline.gates import speed

    reason = fmt.speed_unavailable_reason(build_dir)
    if reason:
        return {"status": "not_run", "reason": reason}
    prompt = speed_prompt(ref, speed_params)
    log(f"speed: {len(prompt)}-token prompt, {speed_params.gen_tokens} generated tokens, "
        f"{speed_params.warmup} warm-up + {speed_params.repeats} runs, {threads} threads")
    with speed.HostLock() as held:
        measured = fmt.measure_speed(build_dir, prompt, gen_tokens=speed_params.gen_tokens,
                                     repeats=speed_params.repeats, warmup=speed_params.warmup, threads=threads,
                                     concurrency=speed_params.concurrency)
    bytes_per_token = fmt.decode_bytes_per_token(
        build_dir, speed.mean_decode_context(len(prompt), speed_params.gen_tokens))
    section = speed.section(measured, runtime=fmt.runtime_name(build_dir), prompt_tokens=len(prompt),
                            gen_tokens=speed_params.gen_tokens, threads=threads,
                            bandwidth_gb_s=host_info["bandwidth"]["gb_s"], bytes_per_token=bytes_per_token)
    section = speed.with_speedup(section, _baseline(format_name))
    return speed.contended(section, held.record(), cpu_runtime=not host_info.get("gpus"))


def _baseline(format_name: str) -> dict[str, Any] | None:
    path = layout.baseline_file(format_name)
    return json.loads(path.read_text()) if path.is_file() else None


def run_baselines(speed_params, log=print) -> dict[str, Any]:
    """The baseline stage: the unquantized model's speed in every registered format, on the
    same runtime, prompt and settings as the gates (`not_run` where the runtime is absent)."""
    from pipeline import formats, reference
    from pipeline.files import atomic_dir

    from pipeline.gates import speed

    host_info, threads = _host_and_threads(speed_params)
    prompt = speed_prompt(reference.load(layout.REFERENCE_DIR), speed_params)
    results = {}
    with atomic_dir(layout.BASELINES_DIR) as staging:
        for name in formats.FORMATS:
            fmt = formats.module(name)
            reason = fmt.speed_unavailable_reason(None)
            if reason:
                result = {"format": name, "status": "not_run", "reason": reason}
            else:
                log(f"baseline {name}: unquantized speed, {len(prompt)}-token prompt, {speed_params.gen_tokens} tokens")
                with speed.HostLock() as held:
                    measured = fmt.baseline_speed(layout.SOURCE_DIR, prompt, gen_tokens=speed_params.gen_tokens,
                                                  repeats=speed_params.repeats, warmup=speed_params.warmup,
                                                  threads=threads, concurrency=speed_params.concurrency)
                result = {"format": name, "status": "ok", "runtime": fmt.runtime_name(None), "threads": threads,
                          "prompt_tokens": len(prompt), "gen_tokens": speed_params.gen_tokens, **measured}
                result = speed.contended(result, held.record(), cpu_runtime=not host_info.get("gpus"))
                log(f"baseline {name}: decode {measured['decode_tok_s']:.1f} tok/s, "
                    f"prefill {measured['prefill_tok_s']:.0f} tok/s")
            (staging / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            results[name] = result
    return results


def _evaluation_text() -> str:
    return layout.EVALUATION_TEXT.read_text()


def load_results(names: list[str]) -> list[dict[str, Any]]:
    """The gate results of recipes `names`, relative limits judged (``verdict.resolve``)."""
    from pipeline.errors import BadInput
    from pipeline.gates import verdict

    results = []
    for name in names:
        path = layout.gate_file(name)
        if not path.is_file():
            raise BadInput(f"no gate result for recipe {name}", where=str(path), fix=f"run `qpipe gate {name}`")
        results.append(json.loads(path.read_text()))
    return verdict.resolve(results)
