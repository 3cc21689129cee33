"""The formats and baseline stages: which formats are measured, and a baseline that cannot run."""

import types

from pipeline import baselines
from pipeline.config import SpeedParams


def test_only_the_formats_the_recipes_use_are_listed_in_registry_order(project):
    assert baselines.formats_used(["trtllm-fp8", "gguf-q8_0", "gguf-q4_0"]) == ["gguf", "modelopt"]
    assert baselines.formats_used([]) == []
    assert baselines.write_formats_used(["awq-w4a16"]) == ["awq"]
    assert (project / "artifacts/formats.json").read_text() == '{\n  "formats": [\n    "awq"\n  ]\n}\n'


def fake_format(baseline_speed, unavailable=None):
    return types.SimpleNamespace(INFO=types.SimpleNamespace(name="fake"), baseline_speed=baseline_speed,
                                 speed_unavailable_reason=lambda build_dir: unavailable,
                                 runtime_name=lambda build_dir: "fake runtime")


def test_a_baseline_that_fails_or_cannot_run_is_not_run_with_its_reason(project):
    def export_refused(*args, **kwargs):
        raise NotImplementedError("Gemma3 is not supported by the legacy export\nsecond line")

    said = []
    result = baselines.measure(fake_format(export_refused), [1, 2, 3], SpeedParams(), {}, 1, said.append)
    assert result == {"format": "fake", "status": "not_run", "reason": "the unquantized baseline failed: "
                      "NotImplementedError: Gemma3 is not supported by the legacy export"}
    assert said[-1] == "baseline fake: not measured (NotImplementedError: Gemma3 is not supported by the legacy export)"
    result = baselines.measure(fake_format(export_refused, unavailable="needs a CUDA GPU"), [1], SpeedParams(), {}, 1,
                               said.append)
    assert result == {"format": "fake", "status": "not_run", "reason": "needs a CUDA GPU"}


def test_a_measured_baseline_hands_the_speed_params_whole_and_records_what_it_measured(project, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    handed = []

    def baseline_speed(source_dir, prompt, speed, *, threads):
        handed.append((source_dir, prompt, speed, threads))
        return {"artifact": "fake f16", "prefill_tok_s": 100.0, "decode_tok_s": 10.0, "device": "cpu"}

    monkeypatch.setattr("pipeline.gates.speed.CONTENDED_PAUSE_S", 0.0)
    speed = SpeedParams(gen_tokens=16, repeats=2)
    result = baselines.measure(fake_format(baseline_speed), [1, 2, 3], speed, {"gpus": []}, 3, lambda _: None)
    measurement = result.pop("measurement")
    assert handed[0] == (baselines.layout.SOURCE_DIR, [1, 2, 3], speed, 3) and handed[0][2] is speed
    assert handed == handed[:1] * measurement["tries"]  # a contended try is measured again, the same way
    assert set(measurement) == {"lock_wait_s", "other_cpu_cores", "held_from", "held_until", "tries"}
    assert result.pop("status") in ("ok", "contended")  # contended while other processes keep the CPUs busy
    result.pop("reason", None)
    assert result == {"format": "fake", "runtime": "fake runtime", "threads": 3, "prompt_tokens": 3, "gen_tokens": 16,
                      "artifact": "fake f16", "prefill_tok_s": 100.0, "decode_tok_s": 10.0, "device": "cpu"}
