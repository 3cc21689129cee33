"""The gate@R stage: score the artifact as written to disk, measure its speed, check limits.

Writes artifacts/gates/R.json (a DVC metrics file) with the schema in docs/design.md:
schema_version, recipe, format, artifact, accuracy, speed, tasks, checks, verdict, judged_against
(``gates.stale``), host.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from pipeline import layout


def run_gate(name: str, *, params, log=print) -> dict[str, Any]:
    """Gate recipe `name` under `params` (params.yaml: speed settings and `limits` overrides)."""
    from pipeline import formats, host, reference
    from pipeline.config import effective_limits
    from pipeline.errors import BadInput
    from pipeline.files import read_json, verify_artifact, write_json
    from pipeline.gates import tasks as task_gate
    from pipeline.gates import verdict
    from pipeline.gates import speed as speed_gate
    from pipeline.gates.speed import host_and_threads
    from pipeline.gates.stale import judged_against

    recipe = formats.load_recipe(name)
    limits, set_in = effective_limits(recipe, name, params)
    against = judged_against(recipe, limits, params)
    check_keyed_limits(limits, params, set_in)
    speed_params = params.speed
    fmt = formats.module(recipe.format)
    build_dir = layout.build_dir(name)
    if not (build_dir / "build.json").is_file():
        raise BadInput(f"no build for recipe {name}", where=str(build_dir), fix=f"run `qpipe build {name}` first")
    build = read_json(build_dir / "build.json")
    host_info, threads = host_and_threads(speed_params)
    if build.get("status") == "refused":
        return _write_refused(name, recipe.format, limits.require, build, host_info, against, log)
    # everything up to the speed measurement is heavy work (hashing the artifact, loading the
    # model, lm-eval's task index, scoring): it holds the host lock shared, so another process's
    # speed figure is never taken meanwhile; the speed measurement then holds it alone
    with contextlib.ExitStack() as session_scope:
        with speed_gate.heavy_work():
            verify_artifact(build_dir, build)
            ref = reference.load(layout.REFERENCE_DIR)
            artifact = {
                "path": str(fmt.artifact_path(build_dir)),
                "bytes": build["artifact"]["bytes"],
                "sha256": build["artifact"]["sha256"],
                "bits_per_weight": fmt.bits_per_weight(build_dir),
            }
            memory_record = check_gate_memory(fmt.INFO, artifact["bytes"], ref, host_info)
            accuracy_reason = fmt.accuracy_unavailable_reason(build_dir)
            speed_reason = fmt.speed_unavailable_reason(build_dir)
            task_plan = task_gate.plan(params.tasks, accuracy_reason)  # before the model loads: a bad task stops here
            session = None
            if not (accuracy_reason and speed_reason):
                session = session_scope.enter_context(fmt.open_session(build_dir, threads, speed_params))
            accuracy = run_accuracy(session, fmt, build_dir, ref, accuracy_reason,
                                    params.reference.position_buckets)
            tasks = run_tasks(session, task_plan, log)
        speed = run_speed(session, fmt, build_dir, ref, speed_params, host_info, threads, speed_reason, log)
    sections = {"accuracy": accuracy, "speed": speed, "tasks": tasks}
    checks = verdict.evaluate(limits, sections, set_in)
    outcome, reasons = verdict.overall(limits.require, sections, checks)
    result = {
        "schema_version": layout.SCHEMA_VERSION,
        "recipe": name,
        "format": recipe.format,
        "artifact": artifact,
        "accuracy": accuracy,
        "speed": speed,
        "tasks": tasks,
        "checks": checks,
        "require": limits.require,
        "verdict": outcome,
        "reasons": reasons,
        "judged_against": against,
        "host": host.summary(host_info),
        "memory": memory_record,
    }
    write_json(layout.gate_file(name), result)
    log(f"gate {name}: {outcome}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return result


def _write_refused(name: str, format_name: str, require: list[str], build: dict[str, Any],
                   host_info: dict[str, Any], against: dict[str, str], log) -> dict[str, Any]:
    """The gate result of a build refused for this model: nothing ran, verdict ``refused``."""
    from pipeline import host
    from pipeline.files import write_json

    reason = f"the build was refused for this model: {build['reason']} (fix: {build['fix']})"
    result = {
        "schema_version": layout.SCHEMA_VERSION,
        "recipe": name,
        "format": format_name,
        "artifact": {"path": None, "bytes": None, "sha256": None, "bits_per_weight": None},
        "accuracy": {"status": "not_run", "reason": reason},
        "speed": {"status": "not_run", "reason": reason},
        "tasks": {"status": "not_run", "reason": reason},
        "checks": [],
        "require": require,
        "verdict": "refused",
        "reasons": [reason],
        "judged_against": against,
        "host": host.summary(host_info),
    }
    write_json(layout.gate_file(name), result)
    log(f"gate {name}: refused ({build['reason']})")
    return result


def check_gate_memory(info, artifact_bytes: int, ref, host_info: dict[str, Any]) -> dict[str, Any]:
    """Refuse a gate the host cannot hold (exit 3). Only on a CPU host: on a GPU host the
    gates run in vLLM or TensorRT-LLM, which size their own memory pools."""
    from pipeline import memory
    from pipeline.host import has_usable_gpu

    if has_usable_gpu(host_info):
        return {"estimate_gb": None, "reason": "a GPU host: the GPU runtimes size their own memory"}
    need = gate_memory_need(info, memory.ModelSize.of(layout.SOURCE_DIR), window_tokens=int(ref.tokens.shape[1]),
                            artifact_bytes=artifact_bytes)
    return memory.ensure_fits(need, stage=f"the {info.name} gate", fix="run the gates on a host with more memory "
                       "or a GPU, or lower reference.window_tokens (the logits of one window are held at once)")


def gate_memory_need(info, size, *, window_tokens: int, artifact_bytes: int):
    """What a gate of format `info` needs on the CPU (``memory.Need``): its factors, the artifact
    where its runtime maps it whole, and one window of the reference's log-probs."""
    from pipeline import memory, reference

    return memory.Need(info.gate_memory, size, window_tokens=window_tokens,
                       mapped_bytes=(artifact_bytes if info.gate_maps_artifact else 0)
                       + reference.log_probs_bytes(1, window_tokens, size.vocabulary))


def check_keyed_limits(limits, params, set_in: dict[str, str]) -> None:
    """A limit per task must name a task of params.yaml `tasks`, one per position bucket a bucket
    of `reference.position_buckets` (a typo would leave its check not_run for ever)."""
    from pipeline.config import KEYED_LIMIT_KEYS, LIMIT_BY_KEY
    from pipeline.errors import BadInput

    known = {"task": [task.name for task in params.tasks], "position bucket": params.reference.bucket_labels()}
    for key in KEYED_LIMIT_KEYS:
        keyed = getattr(limits, key) if isinstance(getattr(limits, key), dict) else {}
        kind = LIMIT_BY_KEY[key].keyed_by
        unknown = [name for name in keyed if name not in known[kind]]
        if unknown:
            where = "params.yaml `tasks`" if kind == "task" else "params.yaml `reference.position_buckets`"
            raise BadInput(f"{key} names {', '.join(unknown)}, which {where} does not list",
                           where=set_in[key], fix=f"use one of: {', '.join(known[kind]) or f'(no {kind}s named)'}")


def run_tasks(session, task_plan, log) -> dict[str, Any]:
    """The task section (inside the gate's heavy work)."""
    from pipeline.gates import tasks

    if isinstance(task_plan, dict):  # not_run, with its reason
        return task_plan
    return tasks.section(task_plan, session, log=log)


def run_accuracy(session, fmt, build_dir, ref, reason: str | None, position_buckets: list[int]) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.gates import accuracy

    if reason:
        return {"status": "not_run", "reason": reason}
    started = time.perf_counter()
    in_runtime = [0.0]
    with tqdm(total=len(ref.tokens), desc="accuracy windows", unit="win", leave=False) as bar:
        figures = accuracy.score(timed(session.window_logits(ref.tokens), in_runtime), ref,
                                 progress=lambda n: bar.update(1), position_buckets=position_buckets)
    tokenizer = accuracy.tokenizer_mismatch(ref.text_tokens.tolist(),
                                            fmt.tokenize(build_dir, _evaluation_text()))
    return {"status": "ok", "runtime": session.runtime, "device": session.device, **figures,
            "tokenizer_mismatch": tokenizer["mismatch"], "tokenizer": tokenizer,
            "seconds": round(time.perf_counter() - started, 2), "runtime_seconds": round(in_runtime[0], 2)}


def timed(items, total: list[float]):
    """`items`, adding the seconds spent producing each one to total[0] (a gate's time in its
    runtime, loading included, apart from its own scoring)."""
    iterator, end = iter(items), object()
    while True:
        started = time.perf_counter()
        item = next(iterator, end)
        total[0] += time.perf_counter() - started
        if item is end:
            return
        yield item


def run_speed(session, fmt, build_dir, ref, speed_params, host_info, threads: int, reason: str | None,
              log) -> dict[str, Any]:
    from pipeline.gates import speed
    from pipeline.host import has_usable_gpu

    if reason:
        return {"status": "not_run", "reason": reason}
    prompt = speed.speed_prompt(ref, speed_params)
    log(f"speed: {len(prompt)}-token prompt, {speed_params.gen_tokens} generated tokens, "
        f"{speed_params.warmup} warm-up + {speed_params.repeats} runs, {threads} threads")
    cpu_runtime = not has_usable_gpu(host_info)
    measured, lock_record = speed.measure_uncontended(lambda: session.measure_speed(prompt, speed_params),
                                               cpu_runtime=cpu_runtime, log=log)
    bytes_per_token = fmt.decode_bytes_per_token(
        build_dir, speed.mean_decode_context(len(prompt), speed_params.gen_tokens))
    section = speed.section(measured, runtime=session.runtime, prompt_tokens=len(prompt),
                            gen_tokens=speed_params.gen_tokens, threads=threads,
                            bandwidth=speed.roofline_bandwidth(host_info, measured.get("device", "cpu")),
                            bytes_per_token=bytes_per_token)
    baseline = _baseline(fmt.INFO.name)
    if speed_params.depths:
        section["by_depth"] = speed.by_depth(
            measured, depths=speed_params.depths, gen_tokens=speed_params.gen_tokens,
            bandwidth_gb_s=section["bandwidth_gb_s"], baseline=baseline,
            bytes_at=lambda context: fmt.decode_bytes_per_token(build_dir, context))
    section = speed.with_speedup(section, baseline)
    return speed.contended(section, lock_record, cpu_runtime=cpu_runtime)


def _baseline(format_name: str) -> dict[str, Any] | None:
    path = layout.baseline_file(format_name)
    return json.loads(path.read_text()) if path.is_file() else None


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
