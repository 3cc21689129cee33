"""The gate stage's orchestration: one session per gate for accuracy, tasks and speed."""

import json
import time
import types

import numpy as np

from pipeline import layout
from pipeline.config import Params, TaskSpec
from pipeline.runtimes import Session
from tests.conftest import write
from tests.gates import StoredLogProbs

VOCAB, WINDOW = 12, 8


class CountingSession(Session):
    runtime, device = "counting runtime", "cpu"
    opened: list["CountingSession"] = []

    def __init__(self, speed=None):
        self.closed, self.asked, self.opened_with, self.measured_with = False, [], speed, None
        CountingSession.opened.append(self)

    def window_logits(self, windows):
        self.asked.append("window_logits")
        return iter(np.zeros((len(windows), WINDOW, VOCAB), dtype=np.float32))

    def measure_speed(self, prompt, speed):
        self.asked.append("measure_speed")
        self.measured_with = speed
        return {"prefill_tok_s": 100.0, "decode_tok_s": 10.0, "ttft_ms": 1.0, "itl_ms": 1.0, "runs": [],
                "device": "cpu"}

    def close(self):
        self.closed = True


def fake_format(speed_reason=None):
    from pipeline.formats import gguf

    return types.SimpleNamespace(
        INFO=gguf.INFO, Recipe=gguf.Recipe, artifact_path=lambda build_dir: build_dir / "model.gguf", bits_per_weight=lambda d: 8.5,
        accuracy_unavailable_reason=lambda d: None, speed_unavailable_reason=lambda d: speed_reason,
        open_session=lambda build_dir, threads, speed: CountingSession(speed),
        tokenize=lambda build_dir, text: [1, 2, 3],
        decode_bytes_per_token=lambda d, context: {"weights": 1.0, "kv_cache": 0.0, "total": 1.0})


def gate_project(monkeypatch, fmt):
    from pipeline import formats, gates, reference

    write(layout.build_dir("gguf-q8_0") / "build.json", json.dumps({"artifact": {"bytes": 1, "sha256": "x"}}))
    write(layout.HOST_FILE, json.dumps({"cpu": {"model": "test", "physical_cores": 1}, "gpus": [],
                                        "bandwidth": {"gb_s": 1.0, "method": "test"}, "fingerprint": "x"}))
    write(layout.EVALUATION_TEXT, "text")
    ref = types.SimpleNamespace(
        tokens=np.ones((2, WINDOW), dtype=np.int32), nll=np.ones((2, WINDOW - 1), dtype=np.float32),
        top1=np.zeros((2, WINDOW - 1), dtype=np.int32), text_tokens=np.arange(1, 600), meta={"vocabulary": VOCAB},
        log_probs=lambda: StoredLogProbs(np.full((2, WINDOW - 1, VOCAB), -np.log(VOCAB), dtype=np.float16)))
    monkeypatch.setattr(reference, "load", lambda directory: ref)
    monkeypatch.setattr(formats, "module", lambda name: fmt)
    monkeypatch.setattr("pipeline.files.verify_artifact", lambda build_dir, build: None)
    monkeypatch.setattr(gates, "check_gate_memory", lambda *args: {})
    CountingSession.opened = []


def test_a_gate_opens_its_artifact_once_for_accuracy_tasks_and_speed_after_preparing_its_tasks(
        project, monkeypatch):
    from pipeline import gates
    from pipeline.gates import tasks

    gate_project(monkeypatch, fake_format())
    events = []
    monkeypatch.setattr(tasks, "plan", lambda specs, reason: events.append(("plan", len(CountingSession.opened)))
                        or tasks.TaskPlan(prepared=(None, []), base={"tasks": []}))
    monkeypatch.setattr(tasks, "section", lambda plan, session, log: events.append(("section", session))
                        or {"status": "ok", "runtime": session.runtime})
    params = Params(recipes=["gguf-q8_0"], tasks=[TaskSpec(name="qpipe_mc")])
    result = gates.run_gate("gguf-q8_0", params=params, log=lambda _: None)
    (session,) = CountingSession.opened
    assert events == [("plan", 0), ("section", session)]  # tasks prepared before the model loads
    assert session.asked == ["window_logits", "measure_speed"] and session.closed
    assert session.opened_with is session.measured_with is params.speed  # the speed settings, whole
    assert result["accuracy"]["runtime"] == result["speed"]["runtime"] == "counting runtime"
    assert result["accuracy"]["status"] == result["speed"]["status"] == "ok"
    assert 0 <= result["accuracy"]["runtime_seconds"] <= result["accuracy"]["seconds"]


def test_timed_adds_the_seconds_spent_producing_each_item():
    from pipeline.gates import timed

    def slow():
        for item in range(3):
            time.sleep(0.01)
            yield item

    total = [0.0]
    assert list(timed(slow(), total)) == [0, 1, 2] and total[0] >= 0.03


def test_a_gate_with_nothing_to_run_opens_nothing(project, monkeypatch):
    from pipeline import gates

    fmt = fake_format(speed_reason="needs llama.cpp")
    fmt.accuracy_unavailable_reason = lambda d: "needs llama.cpp"
    gate_project(monkeypatch, fmt)
    result = gates.run_gate("gguf-q8_0", params=Params(recipes=["gguf-q8_0"]), log=lambda _: None)
    assert CountingSession.opened == []
    assert result["accuracy"] == result["speed"] == {"status": "not_run", "reason": "needs llama.cpp"}


def test_a_gate_records_what_it_was_judged_against_and_is_fresh_until_params_change(project, monkeypatch):
    from pipeline import gates
    from pipeline.gates import stale

    fmt = fake_format(speed_reason="needs llama.cpp")
    fmt.accuracy_unavailable_reason = lambda d: "needs llama.cpp"
    gate_project(monkeypatch, fmt)
    params = Params(recipes=["gguf-q8_0"])
    result = gates.run_gate("gguf-q8_0", params=params, log=lambda _: None)
    assert result["judged_against"] == stale.current("gguf-q8_0", params)
    assert stale.stale_reason(result, params) is None
    assert "params.yaml `speed`" in stale.stale_reason(result, Params(recipes=["gguf-q8_0"], speed={"repeats": 9}))


def lock_probe() -> dict[str, bool]:
    """Whether another holder could take the host lock now, shared and alone (a new open file:
    flock locks of separate opens conflict even within one process)."""
    import fcntl

    from pipeline.gates import speed

    speed.lock_path().parent.mkdir(parents=True, exist_ok=True)
    free = {}
    for mode in ("LOCK_SH", "LOCK_EX"):
        with open(speed.lock_path(), "a") as handle:
            try:
                fcntl.flock(handle, getattr(fcntl, mode) | fcntl.LOCK_NB)
                free[mode] = True
            except BlockingIOError:
                free[mode] = False
    return free


def test_a_gate_holds_the_host_lock_shared_from_its_first_heavy_step_and_alone_for_its_speed(
        project, monkeypatch, tmp_path):
    """Two queued experiments on one host: the other's speed figure must never be taken while
    this gate hashes, loads, indexes lm-eval's tasks or scores."""
    from pipeline import gates
    from pipeline.gates import tasks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen = {}
    fmt = fake_format()

    class ProbingSession(CountingSession):
        def measure_speed(self, prompt, speed):
            seen["speed"] = lock_probe()
            return super().measure_speed(prompt, speed)

    def open_session(build_dir, threads, speed):
        seen["open_session"] = lock_probe()
        return ProbingSession()

    fmt.open_session = open_session
    gate_project(monkeypatch, fmt)
    monkeypatch.setattr("pipeline.files.verify_artifact", lambda build_dir, build: seen.update(verify=lock_probe()))
    monkeypatch.setattr(tasks, "plan", lambda specs, reason: seen.update(plan=lock_probe())
                        or tasks.TaskPlan(prepared=(None, []), base={"tasks": []}))
    monkeypatch.setattr(tasks, "section", lambda plan, session, log: {"status": "ok", "runtime": session.runtime})
    gates.run_gate("gguf-q8_0", params=Params(recipes=["gguf-q8_0"], tasks=[TaskSpec(name="qpipe_mc")]),
                   log=lambda _: None)
    shared = {"LOCK_SH": True, "LOCK_EX": False}
    assert seen == {"verify": shared, "plan": shared, "open_session": shared,
                    "speed": {"LOCK_SH": False, "LOCK_EX": False}}
