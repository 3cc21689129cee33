"""The needle probe's documents, and the shipped task through lm-eval on the embedded model."""

import json
import shutil

import pytest

from pipeline.gates import needle
from tests.conftest import REPO


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The embedded model as the source stage writes it, and an evaluation text."""
    from pydoc_data import topics

    from pipeline import source

    root = tmp_path_factory.mktemp("needle")
    source.run("embedded:smollm2-135m", None, root / "artifacts" / "source", log=lambda message: None)
    (root / "artifacts" / "corpus").mkdir(parents=True)
    (root / "artifacts" / "corpus" / "evaluation.txt").write_text("\n\n".join(topics.topics.values()))
    return root


def test_each_needle_sits_at_its_depth_of_a_context_of_the_asked_length(project):
    from transformers import AutoTokenizer

    paths = {"evaluation_text": str(project / "artifacts/corpus/evaluation.txt"),
             "tokenizer": str(project / "artifacts/source")}
    rows = needle.documents(context_tokens=300, depths=[0.2, 0.8], per_depth=2, **paths)["test"]
    assert [row["depth"] for row in rows] == [0.2, 0.8, 0.2, 0.8]  # a limit keeps every depth
    tokenizer = AutoTokenizer.from_pretrained(project / "artifacts/source")
    for row in rows:
        whole = tokenizer(row["context"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
        assert 280 <= len(whole) <= 300
        assert row["context"].count(row["answer"]) == 1 and len(row["answer"]) == 7
        before, after = row["context"].removeprefix(needle.PREFIX).split(
            needle.NEEDLE.format(key=row["key"], value=row["answer"]))
        after = after.removesuffix(needle.QUESTION.format(key=row["key"]))
        placed, rest = (len(tokenizer(part, add_special_tokens=False)["input_ids"]) for part in (before, after))
        assert placed / (placed + rest) == pytest.approx(row["depth"], abs=0.02)
        assert row["context"].endswith(f"The special magic number for {row['key']} mentioned in the provided text is")
    assert list(needle.documents(context_tokens=300, depths=[0.2, 0.8], per_depth=2, **paths)["test"]) == list(rows)
    assert len({row["context"] for row in rows}) == 4


def test_a_context_too_short_for_a_haystack_names_the_task_key(project):
    from pipeline.errors import BadInput

    with pytest.raises(BadInput, match="leaves no room for a haystack") as info:
        needle.documents(context_tokens=60, evaluation_text=str(project / "artifacts/corpus/evaluation.txt"),
                         tokenizer=str(project / "artifacts/source"))
    assert info.value.where == "tasks/qpipe_needle.yaml: dataset_kwargs.context_tokens"


@pytest.mark.integration
def test_the_shipped_task_asks_each_number_back_and_the_model_retrieves_it(project, monkeypatch):
    """lm-eval loads tasks/qpipe_needle.yaml as shipped (at a 256-token context here), asks for
    each number as a continuation, and the unquantized model copies it from the context."""
    from pipeline.config import Params
    from pipeline.gates import tasks

    shutil.copytree(REPO / "tasks", project / "tasks", dirs_exist_ok=True)
    shipped = (REPO / "tasks/qpipe_needle.yaml").read_text()
    assert "context_tokens: 4096" in shipped
    (project / "tasks/qpipe_needle.yaml").write_text(shipped.replace("context_tokens: 4096", "context_tokens: 256"))
    monkeypatch.chdir(project)
    params = Params.model_validate({"tasks": [{"name": "qpipe_needle"}]})
    record = tasks.run_base(params, threads=2, log=lambda message: None)
    (entry,) = record["tasks"]
    assert (entry["name"], entry["metric"], entry["samples"]) == ("qpipe_needle", "acc,none", 20)
    assert entry["score"] >= 0.8, entry
    _, [(_, task)] = tasks.prepare(params.tasks)
    task.build_all_requests()
    for instance in task.instances:
        assert instance.arguments[1] == " " + instance.doc["answer"]
    json.dumps(record)  # the record is plain JSON
