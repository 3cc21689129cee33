import pytest

from pipeline.config import GateLimits
from pipeline.gates import verdict

OK_ACCURACY = {"status": "ok", "ppl_ratio": 1.05, "mean_kld": 0.04, "top1_agreement": 0.9, "tokenizer_mismatch": 0.0}
OK_SPEED = {"status": "ok", "decode_tok_s": 90.0, "roofline_fraction": 0.3}
NOT_RUN = {"status": "not_run", "reason": "needs a CUDA GPU"}


def judge(limits, accuracy=OK_ACCURACY, speed=OK_SPEED):
    sections = {"accuracy": accuracy, "speed": speed}
    checks = verdict.evaluate(limits, sections)
    return checks, verdict.overall(limits.require, sections, checks)


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


def result(recipe, limits, accuracy=OK_ACCURACY, speed=OK_SPEED):
    sections = {"accuracy": accuracy, "speed": speed}
    checks = verdict.evaluate(limits, sections, {"max_mean_kld": f"recipes/{recipe}.yaml: gates.max_mean_kld"})
    outcome, reasons = verdict.overall(limits.require, sections, checks)
    return {"recipe": recipe, "checks": checks, "verdict": outcome, "reasons": reasons,
            "require": limits.require, **sections}


RELATIVE = {"relative_to": "q8", "factor": 10}
Q8_ACCURACY = {**OK_ACCURACY, "mean_kld": 0.005}


def test_a_failing_check_says_where_its_limit_is_set():
    _, reasons = verdict.overall(["accuracy"], {}, result("q4", GateLimits(max_mean_kld=0.01))["checks"])
    assert reasons == ["max_mean_kld: mean_kld 0.04 > limit 0.01 (set in recipes/q4.yaml: gates.max_mean_kld)"]


def test_a_relative_limit_waits_for_its_recipe_then_is_judged_against_its_figure():
    q4 = result("q4", GateLimits(max_mean_kld=RELATIVE))
    assert q4["verdict"] == "pending" and q4["checks"][0]["limit"] is None
    q8 = result("q8", GateLimits(max_mean_kld=0.01), accuracy=Q8_ACCURACY)
    q4_resolved, q8_resolved = verdict.resolve([q4, q8])
    assert q8_resolved == q8
    check = q4_resolved["checks"][0]
    assert check["limit"] == pytest.approx(0.05) and check["anchor_value"] == 0.005
    assert check["verdict"] == "pass" and q4_resolved["verdict"] == "pass"
    assert q4["verdict"] == "pending"  # the inputs are not modified


def test_a_relative_limit_fails_and_names_the_recipe_it_is_relative_to():
    q4 = result("q4", GateLimits(max_mean_kld={"relative_to": "q8", "factor": 4}))
    q8 = result("q8", GateLimits(), accuracy=Q8_ACCURACY)
    (judged, _) = verdict.resolve([q4, q8])
    assert judged["verdict"] == "fail"
    assert judged["reasons"] == ["max_mean_kld: mean_kld 0.04 > limit 0.02 = 4 x q8's 0.005 "
                                 "(set in recipes/q4.yaml: gates.max_mean_kld)"]


@pytest.mark.parametrize("anchor, reason", [
    (None, "no gate result"),
    ("failing", "whose verdict is fail"),
    ("unmeasured", "did not measure mean_kld"),
])
def test_a_relative_limit_is_not_judged_when_its_recipe_cannot_vouch(anchor, reason):
    q4 = result("q4", GateLimits(max_mean_kld=RELATIVE))
    others = {
        None: [],
        "failing": [result("q8", GateLimits(max_mean_kld=0.001), accuracy=Q8_ACCURACY)],
        "unmeasured": [result("q8", GateLimits(require=["speed"]), accuracy=NOT_RUN)],
    }[anchor]
    (judged, *_) = verdict.resolve([q4, *others])
    assert judged["checks"][0]["verdict"] == "not_judged" and reason in judged["checks"][0]["reason"]
    assert judged["verdict"] == "not_judged"
    assert judged["reasons"] == [f"max_mean_kld: {judged['checks'][0]['reason']}"]


def test_a_relative_limit_not_judged_counts_even_on_a_gate_require_leaves_out():
    q4 = result("q4", GateLimits(min_roofline_fraction={"relative_to": "q8", "factor": 0.5}, require=["accuracy"]))
    (judged,) = verdict.resolve([q4])
    assert judged["verdict"] == "not_judged"


def test_a_required_gate_not_run_is_incomplete_and_names_the_unjudged_limit_too():
    q4 = result("q4", GateLimits(max_mean_kld=RELATIVE), speed=NOT_RUN)
    assert q4["verdict"] == "incomplete"
    (judged,) = verdict.resolve([q4])
    assert judged["verdict"] == "incomplete"
    assert any("speed did not run" in r for r in judged["reasons"])
    assert any(r.startswith("max_mean_kld: relative to q8") for r in judged["reasons"])


def test_relative_limits_chain_and_a_cycle_is_not_judged():
    a = result("a", GateLimits(max_mean_kld={"relative_to": "b", "factor": 10}))
    b = result("b", GateLimits(max_mean_kld={"relative_to": "c", "factor": 10}), accuracy=Q8_ACCURACY)
    c = result("c", GateLimits(max_mean_kld=0.01), accuracy={**OK_ACCURACY, "mean_kld": 0.001})
    assert [r["verdict"] for r in verdict.resolve([a, b, c])] == ["pass", "pass", "pass"]
    x = result("x", GateLimits(max_mean_kld={"relative_to": "y", "factor": 10}))
    y = result("y", GateLimits(max_mean_kld={"relative_to": "x", "factor": 10}))
    judged = verdict.resolve([x, y])
    assert [r["verdict"] for r in judged] == ["not_judged", "not_judged"]
    assert "cycle" in judged[0]["checks"][0]["reason"]


WITH_INTERVALS = {**OK_ACCURACY, "ci95": {"mean_kld": {"low": 0.035, "high": 0.046},
                                          "ppl_ratio": {"low": 1.04, "high": 1.06},
                                          "top1_agreement": {"low": 0.88, "high": 0.92}}}


def test_a_limit_on_the_interval_bound_judges_the_bound_not_the_point_value():
    checks, (outcome, reasons) = judge(GateLimits(max_mean_kld=0.045, max_mean_kld_upper=0.045),
                                       accuracy=WITH_INTERVALS)
    assert [c["verdict"] for c in checks] == ["pass", "fail"]
    assert checks[1]["figure"] == "ci95.mean_kld.high" and checks[1]["value"] == 0.046
    assert outcome == "fail" and reasons == ["max_mean_kld_upper: ci95.mean_kld.high 0.046 > limit 0.045"]
    checks, (outcome, _) = judge(GateLimits(max_ppl_ratio_upper=1.06, min_top1_agreement_lower=0.88),
                                 accuracy=WITH_INTERVALS)
    assert outcome == "pass" and [c["value"] for c in checks] == [1.06, 0.88]


def test_a_bound_limit_on_a_result_without_intervals_is_not_run():
    checks, (outcome, _) = judge(GateLimits(max_mean_kld_upper=0.1))
    assert checks[0]["verdict"] == "not_run" and "ci95.mean_kld.high was not measured" in checks[0]["reason"]
    assert outcome == "incomplete"


OK_TASKS = {"status": "ok", "recovery": {"arc_easy": 0.97, "gsm8k": 0.91}, "min_recovery": 0.91}


def judge_tasks(limits, tasks=OK_TASKS):
    sections = {"accuracy": OK_ACCURACY, "speed": OK_SPEED, "tasks": tasks}
    checks = verdict.evaluate(limits, sections, {"min_task_recovery": "recipes/r.yaml: gates.min_task_recovery"})
    return checks, verdict.overall(limits.require, sections, checks)


def test_one_task_recovery_limit_judges_the_lowest_recovery():
    checks, (outcome, reasons) = judge_tasks(GateLimits(min_task_recovery=0.95))
    assert outcome == "fail" and [c["figure"] for c in checks] == ["min_recovery"]
    assert reasons == ["min_task_recovery: min_recovery 0.91 < limit 0.95 (set in recipes/r.yaml: gates.min_task_recovery)"]
    _, (outcome, _) = judge_tasks(GateLimits(min_task_recovery=0.9))
    assert outcome == "pass"


def test_a_recovery_limit_per_task_makes_one_check_per_task():
    checks, (outcome, reasons) = judge_tasks(GateLimits(min_task_recovery={"arc_easy": 0.95, "gsm8k": 0.9}))
    assert [(c["name"], c["figure"], c["verdict"]) for c in checks] == [
        ("min_task_recovery.arc_easy", "recovery.arc_easy", "pass"), ("min_task_recovery.gsm8k", "recovery.gsm8k", "pass")]
    assert outcome == "pass"
    _, (outcome, reasons) = judge_tasks(GateLimits(min_task_recovery={"arc_easy": 0.99}))
    assert outcome == "fail" and reasons[0].startswith("min_task_recovery.arc_easy: recovery.arc_easy 0.97 < limit 0.99")


def test_a_limit_at_a_position_bucket_judges_that_buckets_figure():
    section = {"status": "ok", "mean_kld": 0.05, "top1_agreement": 0.9,
               "by_position": {"0-511": {"mean_kld": 0.03, "top1_agreement": 0.93},
                               "512-2047": {"mean_kld": 0.08, "top1_agreement": 0.86}}}
    limits = GateLimits(max_mean_kld_at={"0-511": 0.05, "512-2047": 0.05, "2048+": 0.1},
                        min_top1_agreement_at={"512-2047": 0.85}, require=["accuracy"])
    checks = verdict.evaluate(limits, {"accuracy": section})
    assert [(c["name"], c["figure"], c["verdict"]) for c in checks] == [
        ("max_mean_kld_at.0-511", "by_position.0-511.mean_kld", "pass"),
        ("max_mean_kld_at.512-2047", "by_position.512-2047.mean_kld", "fail"),
        ("max_mean_kld_at.2048+", "by_position.2048+.mean_kld", "not_run"),  # a window too short to reach it
        ("min_top1_agreement_at.512-2047", "by_position.512-2047.top1_agreement", "pass")]
    outcome, reasons = verdict.overall(["accuracy"], {"accuracy": section}, checks)
    assert outcome == "fail" and reasons[0].startswith("max_mean_kld_at.512-2047: by_position.512-2047.mean_kld 0.08")


def test_the_lower_bound_limit_judges_the_paired_interval_overall_and_per_task():
    section = {"status": "ok", "recovery": {"a": 0.97, "b": 0.99}, "min_recovery": 0.97,
               "recovery_ci95": {"a": {"low": 0.91, "high": 1.0}, "b": None}, "min_recovery_low": None,
               "min_recovery_low_reason": "b: no per-document scores"}
    checks = verdict.evaluate(GateLimits(min_task_recovery_lower=0.9), {"tasks": section})
    assert [(c["name"], c["verdict"], c["reason"]) for c in checks] == [
        ("min_task_recovery_lower", "not_run", "b: no per-document scores")]
    checks = verdict.evaluate(GateLimits(min_task_recovery_lower={"a": 0.92}), {"tasks": section})
    assert [(c["figure"], c["value"], c["verdict"]) for c in checks] == [("recovery_ci95.a.low", 0.91, "fail")]
    section.update(min_recovery_low=0.91)
    assert verdict.evaluate(GateLimits(min_task_recovery_lower=0.9), {"tasks": section})[0]["verdict"] == "pass"


def test_a_task_gate_that_did_not_run_is_never_a_pass():
    not_run = {"status": "not_run", "reason": "params.yaml names no task (tasks: [])"}
    checks, (outcome, reasons) = judge_tasks(GateLimits(min_task_recovery=0.95), tasks=not_run)
    assert checks[0]["verdict"] == "not_run" and outcome == "pass"  # tasks are not required ...
    _, (outcome, reasons) = judge_tasks(GateLimits(min_task_recovery=0.95, require=["accuracy", "speed", "tasks"]),
                                        tasks=not_run)
    assert outcome == "incomplete"  # ... until require names them
    assert "required gate tasks did not run: params.yaml names no task (tasks: [])" in reasons


def test_a_relative_limit_broken_by_a_result_with_a_gate_missing_fails_it():
    q4 = result("q4", GateLimits(max_mean_kld={"relative_to": "q8", "factor": 4}), speed=NOT_RUN)
    q8 = result("q8", GateLimits(), accuracy=Q8_ACCURACY)
    (judged, _) = verdict.resolve([q4, q8])
    assert judged["checks"][0]["verdict"] == "fail" and judged["verdict"] == "fail"


def test_every_limit_is_checked_on_its_table_figure_the_table_way():
    from pipeline.config import LIMITS

    sections = {"accuracy": {"status": "ok", "ppl_ratio": 1.0, "mean_kld": 1.0, "top1_agreement": 1.0,
                             "tokenizer_mismatch": 1.0, "ci95": {"ppl_ratio": {"high": 1.0}, "mean_kld": {"high": 1.0},
                                                                  "top1_agreement": {"low": 1.0}},
                             "by_position": {"0-511": {"mean_kld": 1.0, "top1_agreement": 1.0}}},
                "speed": {"status": "ok", "decode_speedup": 1.0, "roofline_fraction": 1.0},
                "tasks": {"status": "ok", "min_recovery": 1.0, "min_recovery_low": 1.0}}

    def limit_of(limit, value):  # a limit held only per position bucket names one
        return value if limit.figure else {"0-511": value}

    def checked(limit):
        return (limit.key, limit.gate, limit.figure) if limit.figure else \
            (f"{limit.key}.0-511", limit.gate, limit.keyed_figure.format(key="0-511"))

    below = verdict.evaluate(GateLimits(**{limit.key: limit_of(limit, 0.5) for limit in LIMITS}), sections)
    above = verdict.evaluate(GateLimits(**{limit.key: limit_of(limit, 1.0 if limit.high else 2.0)
                                           for limit in LIMITS}), sections)
    assert [(c["name"], c["gate"], c["figure"]) for c in below] == [checked(l) for l in LIMITS]
    # a value of 1 passes a limit of 0.5 held with >= and fails one held with <=, and the other way at 2
    assert [c["verdict"] for c in below] == ["pass" if l.comparison == ">=" else "fail" for l in LIMITS]
    assert [c["verdict"] for c in above if c["limit"] == 2.0] == [
        "fail" if l.comparison == ">=" else "pass" for l in LIMITS if not l.high]
