import json
import subprocess

import pytest

from pipeline import changes, layout
from pipeline.errors import BadInput
from tests.test_report import gate_result


def with_check(result, name, value, limit, verdict):
    result["checks"] = [{"name": name, "value": value, "limit": limit, "verdict": verdict}]
    return result


def spread(result, stdev):
    result["speed"]["spread"] = {"decode_tok_s": {"stdev": stdev}, "prefill_tok_s": {"stdev": stdev}}
    return result


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository whose first commit holds three gate results."""
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git + ["init", "-q"], check=True)
    base = [spread(with_check(gate_result("q8", 0.004, 100.0), "max_mean_kld", 0.004, 0.01, "pass"), 1.0),
            spread(with_check(gate_result("q4", 0.05, 150.0), "max_mean_kld", 0.05, 0.08, "pass"), 1.0),
            gate_result("gone", 0.1, None)]
    for result in base:
        (layout.GATES_DIR / f"{result['recipe']}.json").parent.mkdir(parents=True, exist_ok=True)
        (layout.GATES_DIR / f"{result['recipe']}.json").write_text(json.dumps(result))
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    return tmp_path


def head(*results):
    for path in layout.GATES_DIR.glob("*.json"):
        path.unlink()
    for result in results:
        (layout.GATES_DIR / f"{result['recipe']}.json").write_text(json.dumps(result))


def test_each_recipe_shows_its_change_ties_within_noise_and_what_crossed_a_limit(repo):
    q8 = spread(with_check(gate_result("q8", 0.004, 101.0), "max_mean_kld", 0.004, 0.01, "pass"), 1.0)
    q4 = with_check(gate_result("q4", 0.09, 120.0, verdict="fail"), "max_mean_kld", 0.09, 0.08, "fail")
    q4["artifact"]["sha256"] = "another"
    spread(q4, 1.0)
    head(q8, q4, gate_result("new", 0.02, None))
    text = changes.against("HEAD", "md", log=lambda _: None)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| q8 | same artifact | 1.0 (=) |" in lines["q8"] and "101.0 (+1.0, tie)" in lines["q8"]
    assert "| q4 | rebuilt |" in lines["q4"] and "120.0 (−30.0) |" in lines["q4"]  # 30 > 2 x hypot(1, 1)
    assert "pass → fail" in lines["q4"] and "max_mean_kld failed (0.09 vs 0.08)" in lines["q4"]
    assert "| new | added |" in lines["new"] and "| gone | removed |" in lines["gone"]
    entries = json.loads(changes.against("HEAD", "json", log=lambda _: None))["recipes"]
    q4_entry = next(e for e in entries if e["recipe"] == "q4")
    assert q4_entry["columns"]["mean_kld"] == {"base": 0.05, "head": 0.09, "differs": True}


def test_a_fixed_check_and_an_unknown_revision(repo):
    q4 = spread(with_check(gate_result("q4", 0.05, 150.0), "max_mean_kld", 0.05, 0.08, "pass"), 1.0)
    head(q4)
    assert changes.crossed(with_check(gate_result("q4", 0.09, 1.0), "max_mean_kld", 0.09, 0.08, "fail"), q4) == \
        ["max_mean_kld passes"]
    with pytest.raises(BadInput, match="unknown revision 'nope'"):
        changes.against("nope", "md", log=lambda _: None)
    with pytest.raises(BadInput, match="unknown output format"):
        changes.against("HEAD", "csv", log=lambda _: None)
