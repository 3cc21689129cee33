import json

import pytest

from pipeline import compare
from pipeline.errors import BadInput
from tests.test_report import gate_result


def exp_show(workspace, experiments=(), commit=()):
    """The shape `dvc exp show --json` prints (recorded from DVC 3.67): workspace first, then
    each baseline commit with its experiments; unreadable metrics carry an `error`."""

    def data(results):
        return {"params": {}, "metrics": {f"artifacts/gates/{r['recipe']}.json": {"data": r} for r in results}}

    missing = {"metrics": {"artifacts/gates/x.json": {"error": {"type": "FileNotFoundError", "msg": "no file"}}}}
    return [
        {"rev": "workspace", "name": None, "data": data(workspace), "error": None, "experiments": None},
        {"rev": "d610d361cc2017e4c49ee71b2263a8f76df65709", "name": "main", "data": data(commit) if commit else missing,
         "error": None,
         "experiments": [{"revs": [{"rev": "515c3dc40f640f1e5b0e3b00a75a81990876e459", "name": name,
                                    "data": data(results), "error": None, "experiments": None}],
                          "executor": None, "name": name} for name, results in experiments]},
    ]


def sized(result, megabytes):
    result["artifact"]["bytes"] = int(megabytes * 1e6)
    return result


def rows_of(*entries):
    return compare.compare_rows([(label, result) for label, result in entries])


def test_gate_results_are_read_from_every_experiment_and_errors_skipped():
    shown = exp_show([gate_result("a", 0.01, 50.0)], experiments=[("fast", [gate_result("b", 0.2, 90.0)])])
    assert [(label, r["recipe"]) for label, r in compare.gate_results(shown)] == [("workspace", "a"), ("fast", "b")]


def test_the_same_result_in_two_experiments_is_one_row():
    same = gate_result("a", 0.01, 50.0)
    rows = compare.compare_rows(compare.gate_results(exp_show([same], commit=[same])))
    assert len(rows) == 1 and rows[0]["experiment"] == "workspace, main"


def test_pareto_front_spans_experiments_and_skips_not_run():
    rows = rows_of(("workspace", gate_result("q8", 0.004, 78.0)), ("exp1", gate_result("q4", 0.23, 110.0)),
                   ("exp1", gate_result("q5", 0.06, 76.0)), ("exp2", gate_result("awq", 0.12, None)))
    assert [r["pareto"] for r in rows] == [True, True, False, None]


def test_sort_by_any_column_with_unmeasured_last():
    rows = rows_of(("w", gate_result("a", 0.05, 80.0)), ("w", gate_result("b", 0.01, None)),
                   ("w", gate_result("c", 0.2, 100.0)))
    assert [r["recipe"] for r in compare.sort_rows(rows, "decode_tok_s", descending=True)] == ["c", "a", "b"]
    assert [r["recipe"] for r in compare.sort_rows(rows, "mean_kld")] == ["b", "a", "c"]
    with pytest.raises(BadInput, match="unknown column 'speed'") as info:
        compare.sort_rows(rows, "speed")
    assert "decode_tok_s" in info.value.fix


def test_render_markdown_csv_json():
    rows = rows_of(("w", gate_result("a", 0.05, 80.0)), ("w", gate_result("b", 0.01, None)))
    markdown = compare.render(rows, "md")
    assert "| w | b | gguf |" in markdown and "not run" in markdown and "n/a" in markdown
    lines = compare.render(rows, "csv").splitlines()
    assert lines[0].startswith("experiment,recipe,format,size_mb") and len(lines) == 3
    assert json.loads(compare.render(rows, "json"))[1]["decode_tok_s"] is None
    with pytest.raises(BadInput, match="unknown output format 'xml'"):
        compare.render(rows, "xml")


def test_parse_size():
    assert compare.parse_size("120MB") == 120e6
    assert compare.parse_size("1.5 GiB") == 1.5 * 2**30
    assert compare.parse_size("2e8") == 2e8
    with pytest.raises(BadInput, match="not a size"):
        compare.parse_size("big")


def constraint(flag, column, limit, at_most=True):
    return compare.Constraint(flag, column, limit, at_most)


def test_recommend_names_the_best_and_why_each_other_lost():
    rows = rows_of(("w", sized(gate_result("q8", 0.004, 78.0), 145)), ("w", sized(gate_result("q4", 0.23, 110.0), 92)),
                   ("w", sized(gate_result("iq4", 0.07, 120.0), 91)), ("w", sized(gate_result("awq", 0.12, None), 118)),
                   ("w", sized(gate_result("bad", 0.01, 200.0, verdict="fail"), 90)))
    choice = compare.recommend(rows, [constraint("--max-size", "bytes", 120e6), constraint("--max-kld", "mean_kld", 0.1)],
                               "decode")
    assert choice["best"]["recipe"] == "iq4"
    reasons = {entry["row"]["recipe"]: entry["reason"] for entry in choice["lost"]}
    assert reasons["bad"] == "verdict fail"
    assert reasons["q8"].startswith("size 145.0 MB breaks --max-size")
    assert reasons["q4"] == "mean_kld 0.23 breaks --max-kld 0.1"
    assert reasons["awq"].startswith("mean_kld 0.12 breaks")
    assert "best: iq4 (w)" in compare.explain(choice)


def test_recommend_ties_go_to_the_smaller_file():
    rows = rows_of(("w", sized(gate_result("big", 0.05, 100.0), 120)), ("w", sized(gate_result("small", 0.05, 100.0), 90)))
    choice = compare.recommend(rows, [], "decode")
    assert choice["best"]["recipe"] == "small"
    assert choice["lost"][0]["reason"].startswith("ties with the best on decode_tok_s")


def test_recommend_without_a_speed_figure_says_so():
    rows = rows_of(("w", gate_result("awq", 0.12, None)), ("w", gate_result("q4", 0.2, 100.0)))
    choice = compare.recommend(rows, [], "decode")
    assert {e["row"]["recipe"]: e["reason"] for e in choice["lost"]}["awq"] == "decode_tok_s not measured (objective decode)"
    assert compare.recommend(rows, [], "kld")["best"]["recipe"] == "awq"


def test_constraints_nobody_meets_name_the_one_that_excluded_the_last_candidate():
    rows = rows_of(("w", gate_result("q8", 0.004, 78.0)), ("w", gate_result("q4", 0.23, 110.0)))
    with pytest.raises(BadInput, match=r"--min-decode 200 excluded the last candidates \(q8 \(w\)\)"):
        compare.recommend(rows, [constraint("--max-kld", "mean_kld", 0.1), constraint("--min-decode", "decode_tok_s", 200, False)],
                          "decode")
    with pytest.raises(BadInput, match="unknown objective"):
        compare.recommend(rows, [], "fastest")


def with_noise(result, decode_sd=None, per_window_kld=None):
    if decode_sd is not None:
        result["speed"]["spread"] = {"decode_tok_s": {"stdev": decode_sd}, "prefill_tok_s": {"stdev": 1.0}}
    if per_window_kld is not None:
        result["accuracy"]["per_window"] = {"mean_kld": per_window_kld, "top1_agreement": [0.9] * len(per_window_kld),
                                            "mean_nll": [2.0] * len(per_window_kld),
                                            "mean_reference_nll": [1.95] * len(per_window_kld)}
    return result


def test_one_file_measured_in_two_runs_is_one_candidate_with_the_spread_between_runs():
    main, workspace = gate_result("q4", 0.05, 104.9), gate_result("q4", 0.05, 88.8)
    for result in (main, workspace):
        with_noise(result, decode_sd=1.0)
    workspace["accuracy"]["seconds"] = 30.0  # timings differ between runs; the figures do not
    other = with_noise(gate_result("q5", 0.04, 70.0), decode_sd=1.0)
    rows = rows_of(("main", main), ("workspace", workspace), ("main", other))
    assert [r["recipe"] for r in rows] == ["q4", "q5"]
    assert rows[0]["experiment"] == "main, workspace" and rows[0]["runs"] == 2
    assert rows[0]["decode_tok_s"] == pytest.approx((104.9 + 88.8) / 2)
    assert rows[0]["speed_noise"]["decode_tok_s"] == pytest.approx(11.38, abs=0.01)  # stdev of the two runs
    choice = compare.recommend(rows, [], "decode")
    assert choice["best"]["recipe"] == "q4" and [e["row"]["recipe"] for e in choice["lost"]] == ["q5"]


def test_a_speed_difference_within_the_noise_is_a_tie_on_the_pareto_front():
    q8 = with_noise(gate_result("q8", 0.0036, 140.8), decode_sd=1.0)
    q6 = with_noise(gate_result("q6", 0.0081, 141.8), decode_sd=1.0)
    q4 = with_noise(gate_result("q4", 0.047, 180.0), decode_sd=1.0)
    assert [r["pareto"] for r in rows_of(("w", q8), ("w", q6), ("w", q4))] == [True, False, True]
    # the same figures measured without spread differ exactly, as before
    assert [r["pareto"] for r in rows_of(("w", gate_result("q8", 0.0036, 140.8)),
                                         ("w", gate_result("q6", 0.0081, 141.8)))] == [True, True]


def test_accuracy_figures_tie_when_their_paired_per_window_difference_is_noise():
    from pipeline import report

    rng = __import__("numpy").random.default_rng(0)
    windows = rng.uniform(0.03, 0.07, size=40)
    noise = rng.normal(0, 0.002, size=40)
    a = report.row(with_noise(gate_result("a", float(windows.mean()), 100.0), per_window_kld=windows.tolist()), None)
    b = report.row(with_noise(gate_result("b", float((windows + noise).mean()), 100.0),
                              per_window_kld=(windows + noise).tolist()), None)
    c = report.row(with_noise(gate_result("c", float((windows + 0.004 + noise).mean()), 100.0),
                              per_window_kld=(windows + 0.004 + noise).tolist()), None)
    assert not report.differs(a, b, "mean_kld")
    assert report.differs(a, c, "mean_kld")  # 0.004 apart on every window: far beyond the paired error
    assert not report.differs(a, b, "ppl_ratio") and not report.differs(a, a, "decode_tok_s")


def test_results_of_every_schema_up_to_this_one_are_compared_and_a_newer_one_is_left_out_by_name(monkeypatch):
    from pipeline import layout

    old = gate_result("old", 0.01, 50.0)  # no schema_version: written before there was one
    current = {**gate_result("current", 0.02, 60.0), "schema_version": layout.SCHEMA_VERSION}
    newer = {**gate_result("newer", 0.03, 70.0), "schema_version": layout.SCHEMA_VERSION + 1}
    monkeypatch.setattr(compare, "dvc_exp_show", lambda: exp_show([], experiments=[("e1", [old, current, newer])]))
    said = []
    rows = compare.load_rows(workspace_only=False, log=said.append)
    assert sorted(row["recipe"] for row in rows) == ["current", "old"]
    assert len(said) == 1 and "newer" in said[0] and f"schema version {layout.SCHEMA_VERSION + 1}" in said[0]
    monkeypatch.setattr(compare, "dvc_exp_show", lambda: exp_show([newer]))
    with pytest.raises(BadInput, match="no gate results this qpipe can read"):
        compare.load_rows(workspace_only=False, log=said.append)


def test_recommend_with_min_recovery_drops_what_lost_the_tasks_or_never_ran_them():
    from tests.test_report import with_tasks

    rows = rows_of(("w", with_tasks(gate_result("q4", 0.05, 110.0), {"arc_easy": (0.55, 0.64)})),
                   ("w", with_tasks(gate_result("q8", 0.01, 80.0), {"arc_easy": (0.63, 0.64)})),
                   ("w", gate_result("iq4", 0.04, 120.0)))
    choice = compare.recommend(rows, [constraint("--min-recovery", "task_recovery", 0.95, False)], "decode")
    assert choice["best"]["recipe"] == "q8"
    reasons = {entry["row"]["recipe"]: entry["reason"] for entry in choice["lost"]}
    assert reasons["q4"] == "task_recovery 0.8594 breaks --min-recovery 0.95"
    assert reasons["iq4"] == "task_recovery not measured (--min-recovery needs it)"


def test_a_stale_workspace_result_is_marked_and_never_recommended_unless_fresh_elsewhere():
    fresh, old = gate_result("q8", 0.004, 100.0), gate_result("q4", 0.05, 150.0)
    why = {"q4": "it was judged against other limits than now"}
    rows = compare.compare_rows([("workspace", fresh), ("workspace", old)], why)
    assert [(row["recipe"], row["stale"]) for row in rows] == [("q8", None), ("q4", why["q4"])]
    choice = compare.recommend(rows, [], "decode")
    assert choice["best"]["recipe"] == "q8"
    assert choice["lost"][0]["reason"] == f"stale: {why['q4']}"
    rows = compare.compare_rows([("workspace", old), ("e1", gate_result("q4", 0.05, 150.0))], why)
    assert len(rows) == 1 and rows[0]["stale"] is None  # the same result is fresh in experiment e1


def test_compare_names_each_stale_workspace_result(monkeypatch, tmp_path):
    from pipeline import layout
    from tests.conftest import write

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "params.yaml", "recipes: [q8]\n")
    write(tmp_path / "recipes" / "q8.yaml", "format: gguf\ntype: Q8_0\n")
    write(layout.gate_file("q8"), json.dumps(gate_result("q8", 0.004, 100.0)))  # records no judged_against
    said = []
    (row,) = compare.load_rows(workspace_only=True, log=said.append)
    assert row["stale"] and said == [f"workspace q8 is stale: {row['stale']}; run `dvc repro` (it re-runs what changed)"]


def test_recommend_constrains_the_gate_limits_figures_the_way_the_gates_hold_them():
    from pipeline.config import LIMITS

    columns = compare.constraint_columns()
    for limit in LIMITS:
        if limit.recommend_flag:
            assert columns[limit.recommend_flag] == (limit.column, limit.comparison == "<=")
        assert limit.column is None or limit.column in compare.COLUMNS
    made = compare.constraints({"--max-size": "120MB", "--max-kld": 0.1, "--min-top1": None, "--min-recovery": 0.9})
    assert [(c.flag, c.column, c.limit, c.at_most) for c in made] == [
        ("--max-size", "bytes", 120e6, True), ("--max-kld", "mean_kld", 0.1, True),
        ("--min-recovery", "task_recovery", 0.9, False)]


def test_the_recommend_command_offers_every_constraint():
    import typer.main

    from pipeline.cli import app

    command = typer.main.get_command(app).commands["recommend"]
    flags = {option for param in command.params for option in param.opts}
    assert set(compare.constraint_columns()) <= flags
