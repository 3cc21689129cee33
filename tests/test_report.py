from pipeline import report


def rows(*points):
    return [{"recipe": str(i), "mean_kld": kld, "decode_tok_s": speed} for i, (kld, speed) in enumerate(points)]


def test_pareto_front_on_hand_made_points():
    # (kld, decode): 0 best quality, 3 fastest, 1 dominated by 0, 2 on the front between
    front = report.pareto_front(rows((0.01, 60), (0.02, 55), (0.05, 80), (0.2, 100), (0.25, 90)))
    assert front == [True, False, True, True, False]


def test_ties_are_both_on_the_front():
    assert report.pareto_front(rows((0.05, 80), (0.05, 80))) == [True, True]


def test_equal_on_one_axis_better_on_other_dominates():
    assert report.pareto_front(rows((0.05, 80), (0.05, 90))) == [False, True]


def test_missing_figure_takes_no_part():
    front = report.pareto_front(rows((0.05, None), (0.2, 50), (None, 100)))
    assert front == [None, True, None]


def test_custom_objectives():
    points = [{"size": 100, "kld": 0.01}, {"size": 50, "kld": 0.05}, {"size": 120, "kld": 0.02}]
    assert report.pareto_front(points, {"size": "min", "kld": "min"}) == [True, True, False]


def gate_result(recipe, kld, decode, verdict="pass"):
    return {
        "recipe": recipe, "format": "gguf", "verdict": verdict, "reasons": [],
        "artifact": {"bytes": 1_000_000, "bits_per_weight": 4.5, "sha256": f"sha256-of-{recipe}"},
        "accuracy": {"status": "ok", "runtime": "r", "ppl": 10.0, "ppl_ratio": 1.05, "mean_kld": kld,
                     "top1_agreement": 0.9, "tokenizer_mismatch": 0.0},
        "speed": ({"status": "ok", "runtime": "r", "decode_tok_s": decode, "prefill_tok_s": 400.0,
                   "ttft_ms": 1.0, "itl_ms": 1.0, "roofline_fraction": 0.3}
                  if decode is not None else {"status": "not_run", "reason": "needs a CUDA GPU"}),
    }


def test_markdown_and_plot_handle_not_run(tmp_path):
    results = [gate_result("a", 0.01, 50.0), gate_result("b", 0.05, None, verdict="incomplete")]
    table = report.build_rows(results, tmp_path)
    assert [r["pareto"] for r in table] == [True, None]
    text = report.markdown(table, {"ppl": 13.0, "windows": 2, "window_tokens": 64}, {"cpu": "x"})
    assert "not run" in text and "not_run: needs a CUDA GPU" in text
    report.plot(table, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_markdown_shows_llama_cpp_statistics_and_the_size_plot_takes_every_format(tmp_path):
    from pipeline.gates import accuracy

    scored = gate_result("q8", 0.004, None)
    stats = {label: 0.5 for label in report.LLAMA_CPP_LABELS}
    scored["accuracy"].update(llama_cpp=stats, second_half={"ppl_ratio": 1.0056, "mean_kld": 0.00398},
                              ci95={"mean_kld": {"low": 0.0039, "high": 0.0041}})
    awq = gate_result("awq", 0.12, None)
    awq["format"] = "awq"
    table = report.build_rows([scored, awq], tmp_path)
    text = report.markdown(table, {"ppl": 13.0}, {"cpu": "x"})
    assert "## llama.cpp's statistics" in text and "| q8 | 0.500000 |" in text and "0.003980" in text
    assert "0.0039-0.0041" in text
    assert set(accuracy.KLD_PERCENTILES) <= {label.split()[0] for label in report.LLAMA_CPP_LABELS}
    report.plot_quality_vs_size(table, tmp_path / "size.png")
    assert (tmp_path / "size.png").stat().st_size > 1000


def test_the_position_table_appears_only_where_a_window_reaches_a_second_bucket(tmp_path):
    def bucket(kld):
        return {"mean_kld": kld, "p999_kld": 10 * kld, "top1_agreement": 0.9,
                "ci95": {"mean_kld": {"low": kld - 0.001, "high": kld + 0.001}}}

    short = gate_result("q8", 0.004, None)
    short["accuracy"]["by_position"] = {"0-511": bucket(0.004)}
    assert "## By position" not in report.markdown(report.build_rows([short], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    deep = gate_result("q4", 0.05, None)
    deep["accuracy"]["by_position"] = {"0-511": bucket(0.04), "512-2047": bucket(0.06)}
    text = report.markdown(report.build_rows([short, deep], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    assert "| recipe | positions 0-511 | positions 512-2047 |" in text
    assert "| q4 | 0.0400 (0.0390–0.0410) / 0.400 / 0.900 | 0.0600 (0.0590–0.0610) / 0.600 / 0.900 |" in text
    assert "| q8 |" not in text.split("## By position")[1]


def test_the_depth_table_shows_decode_its_roofline_and_kv_bytes_where_depths_were_measured(tmp_path):
    plain = gate_result("q8", 0.004, 50.0)
    assert "## Decode at depth" not in report.markdown(report.build_rows([plain], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    deep = gate_result("q8-kv8", 0.005, 52.0)
    deep["speed"]["by_depth"] = {"status": "ok", "depths": {"4096": {
        "decode_tok_s": 41.25, "roofline_fraction": 0.31, "kv_cache_bytes": 12_400_000, "bytes_per_token": 1e8}}}
    text = report.markdown(report.build_rows([plain, deep], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    assert "| recipe | depth 4096 |" in text and "| q8-kv8 | 41.2 / 0.31 / 12.4 |" in text
    assert "| q8 |" not in text.split("## Decode at depth")[1]


def with_tasks(result, scores):
    """A tasks section: task -> (score, unquantized score)."""
    entries = [{"name": name, "metric": "acc,none", "samples": 100, "score": score, "base_score": base,
                "base_ci95": {"low": base - 0.1, "high": base + 0.1}, "recovery": score / base}
               for name, (score, base) in scores.items()]
    result["tasks"] = {"status": "ok", "tasks": entries, "recovery": {e["name"]: e["recovery"] for e in entries},
                       "min_recovery": min(e["recovery"] for e in entries)}
    return result


def test_the_task_column_and_table_appear_only_where_a_task_gate_ran(tmp_path):
    plain = report.markdown(report.build_rows([gate_result("a", 0.01, 50.0)], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    assert "task recovery" not in plain and "## Tasks" not in plain
    scored = with_tasks(gate_result("a", 0.01, 50.0), {"arc_easy": (0.6, 0.64), "qpipe_gen": (0.5, 0.5)})
    table = report.build_rows([scored, gate_result("b", 0.05, 60.0)], tmp_path)
    assert table[0]["task_recovery"] == 0.6 / 0.64 and table[1]["task_recovery"] is None
    text = report.markdown(table, {"ppl": 13.0}, {"cpu": "x"})
    assert "| task recovery |" in text and "| 0.938 |" in text
    assert "| a | arc_easy | acc,none | 100 | 0.6000 | 0.6400 (0.540-0.740) | 0.938 |" in text
    scored["tasks"]["tasks"][0]["recovery_ci95"] = {"low": 0.9, "high": 0.97}
    text = report.markdown(report.build_rows([scored], tmp_path), {"ppl": 13.0}, {"cpu": "x"})
    assert "| a | arc_easy | acc,none | 100 | 0.6000 | 0.6400 (0.540-0.740) | 0.938 (0.900-0.970) |" in text


def test_a_stale_result_is_marked_in_the_table_and_says_why_and_the_fix(tmp_path):
    rows = report.build_rows([gate_result("a", 0.01, 50.0), gate_result("b", 0.02, 40.0)], tmp_path)
    rows[1]["stale"] = "it was judged against other params.yaml `speed` than now"
    text = report.markdown(rows, {"ppl": 13.0, "windows": 2, "window_tokens": 64}, {"cpu": "x"})
    table = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert "| pass |" in table[0] and "| pass (stale) |" in table[1]
    assert "  - stale: it was judged against other params.yaml `speed` than now; run `dvc repro`" in text
