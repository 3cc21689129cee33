import importlib
import types

import pipeline.runtimes as runtimes


def test_every_runtime_meets_the_runtime_protocol_and_the_timing_ones_sessions_measure_speed():
    for name in runtimes.RUNTIMES:
        module = importlib.import_module(f"pipeline.runtimes.{name}")
        assert runtimes.contract_problems(module) == [], name
        sessions = [value for value in vars(module).values() if isinstance(value, type)
                    and issubclass(value, runtimes.Session) and value is not runtimes.Session]
        times = any(session.measure_speed is not runtimes.Session.measure_speed for session in sessions)
        assert times == (name in runtimes.SPEED_RUNTIMES), name


def test_the_check_names_a_drifted_signature():
    drifted = types.ModuleType("drifted")
    drifted.version = lambda: None
    drifted.name = lambda checkpoint_dir: "x"
    drifted.unavailable_reason = lambda: None
    drifted.open_session = lambda model, *, threads, tokenizer_dir=None, batch: None
    problems = runtimes.contract_problems(drifted)
    assert any(p.startswith("name(checkpoint_dir)") for p in problems)
    assert any(p.startswith("open_session(") for p in problems)
