from pipeline.config import GateLimits
from pipeline.gates import verdict

OK_ACCURACY = {"status": "ok", "ppl_ratio": 1.05, "mean_kld": 0.04, "top1_agreement": 0.9, "tokenizer_mismatch": 0.0}
OK_SPEED = {"status": "ok", "decode_tok_s": 90.0, "roofline_fraction": 0.3}
NOT_RUN = {"status": "not_run", "reason": "needs a CUDA GPU"}


def judge(limits, accuracy=OK_ACCURACY, speed=OK_SPEED):
    sections = {"accuracy": accuracy, "speed": speed}
    checks = verdict.evaluate(limits, sections)
    return checks, verdict.overall(limits, sections, checks)


def test_all_within_limits_passes():
    checks, (outcome, reasons) = judge(GateLimits(max_ppl_ratio=1.1, max_mean_kld=0.05, min_top1_agreement=0.85,
                                                  min_roofline_fraction=0.2))
    assert outcome == "pass" and reasons == []
    assert [c["verdict"] for c in checks] == ["pass"] * 4


def test_a_broken_limit_fails_and_names_it():
    checks, (outcome, reasons) = judge(GateLimits(max_mean_kld=0.01))
    assert outcome == "fail"
    assert "max_mean_kld" in reasons[0] and "mean_kld" in reasons[0]
    assert checks[0]["value"] == 0.04 and checks[0]["limit"] == 0.01


def test_limits_are_inclusive():
    _, (outcome, _) = judge(GateLimits(max_mean_kld=0.04, min_top1_agreement=0.9))
    assert outcome == "pass"


def test_required_gate_not_run_is_incomplete_never_pass():
    checks, (outcome, reasons) = judge(GateLimits(min_roofline_fraction=0.1), speed=NOT_RUN)
    assert outcome == "incomplete"
    assert checks[0]["verdict"] == "not_run" and checks[0]["reason"] == "needs a CUDA GPU"
    assert any("speed did not run" in r for r in reasons)


def test_gate_not_required_may_be_absent():
    _, (outcome, _) = judge(GateLimits(max_mean_kld=0.05, require=["accuracy"]), speed=NOT_RUN)
    assert outcome == "pass"


def test_unmeasured_figure_is_not_run_with_its_reason():
    speed = {**OK_SPEED, "decode_speedup": None, "decode_speedup_reason": "no baseline measured"}
    checks, (outcome, _) = judge(GateLimits(min_decode_speedup=1.5), speed=speed)
    assert checks[0]["verdict"] == "not_run" and checks[0]["reason"] == "no baseline measured"
    assert outcome == "incomplete"


def test_decode_speedup_is_checked():
    checks, (outcome, _) = judge(GateLimits(min_decode_speedup=1.2), speed={**OK_SPEED, "decode_speedup": 1.1})
    assert checks[0]["verdict"] == "fail" and outcome == "fail"


def test_failure_wins_over_incomplete():
    _, (outcome, _) = judge(GateLimits(max_mean_kld=0.001), speed=NOT_RUN)
    assert outcome == "fail"
