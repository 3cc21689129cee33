import importlib
import types

import pipeline.runtimes as runtimes


def test_every_runtime_meets_the_runtime_protocol_and_the_timing_ones_the_speed_protocol():
    for name in runtimes.RUNTIMES:
        module = importlib.import_module(f"pipeline.runtimes.{name}")
        protocol = runtimes.SpeedRuntime if name in runtimes.SPEED_RUNTIMES else runtimes.Runtime
        assert runtimes.contract_problems(module, protocol) == [], name


def test_the_check_names_a_drifted_signature():
    drifted = types.ModuleType("drifted")
    drifted.version = lambda: None
    drifted.name = lambda checkpoint_dir: "x"
    drifted.unavailable_reason = lambda: None
    drifted.window_logits = lambda model, windows, *, threads, tokenizer_dir=None, batch: iter(())
    problems = runtimes.contract_problems(drifted)
    assert any(p.startswith("name(checkpoint_dir)") for p in problems)
    assert any(p.startswith("window_logits(") for p in problems)
    assert "measure_speed() is missing" in runtimes.contract_problems(drifted, runtimes.SpeedRuntime)
