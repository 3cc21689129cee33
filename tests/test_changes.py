import json
import shutil
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


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
# a gate stage of qpipe's shape: the result is a cached DVC metric (dvc.yaml in the project)
CACHED_GATES = """stages:
  gate:
    foreach: [q8, q4, gone]
    do:
      cmd: python copy.py ${item}
      deps:
        - results/${item}.json
      metrics:
        - artifacts/gates/${item}.json
"""
COPY = "import shutil, sys\nshutil.copy(f'results/{sys.argv[1]}.json', f'artifacts/gates/{sys.argv[1]}.json')\n"


def base_results():
    return [spread(with_check(gate_result("q8", 0.004, 100.0), "max_mean_kld", 0.004, 0.01, "pass"), 1.0),
            spread(with_check(gate_result("q4", 0.05, 150.0), "max_mean_kld", 0.05, 0.08, "pass"), 1.0),
            gate_result("gone", 0.1, None)]


def reproduce_base(root, dvc_yaml: str, remote=None) -> None:
    """A git + DVC project in `root` (the working directory) whose stage copies the three base
    results into artifacts/gates/, reproduced; with `remote`, a directory remote as its default."""
    subprocess.run(GIT + ["init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
    if remote is not None:
        subprocess.run(["dvc", "remote", "add", "-q", "-d", "shared", str(remote)], check=True)
    (root / "dvc.yaml").write_text(dvc_yaml)
    (root / "copy.py").write_text(COPY)
    (root / "params.yaml").write_text("recipes: [q8, q4, new]\n")  # qpipe's: the head side is judged against it
    (root / "recipes").mkdir()
    for name in ("q8", "q4", "new"):
        (root / "recipes" / f"{name}.yaml").write_text("format: gguf\ntype: Q8_0\n")
    (root / "results").mkdir()
    layout.GATES_DIR.mkdir(parents=True)
    for result in base_results():
        (root / "results" / f"{result['recipe']}.json").write_text(json.dumps(result))
    subprocess.run(["dvc", "repro", "-q"], check=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A DVC project whose first commit records three gate results, cached and pushed to a
    directory remote; the local cache is then emptied, so the base side comes from the remote."""
    monkeypatch.chdir(tmp_path)
    reproduce_base(tmp_path, CACHED_GATES, remote=tmp_path / "remote")
    subprocess.run(["dvc", "push", "-q"], check=True)
    subprocess.run(GIT + ["add", "-A"], check=True)
    subprocess.run(GIT + ["commit", "-qm", "base"], check=True)
    tracked = subprocess.run(["git", "ls-files", str(layout.GATES_DIR)], capture_output=True, text=True).stdout
    assert tracked.split() == [f"{layout.GATES_DIR}/.gitignore"]  # DVC's; the results are not in git
    shutil.rmtree(tmp_path / ".dvc" / "cache")
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
    said = []
    text = changes.against("HEAD", "md", log=said.append)
    assert said == [f"workspace {name} is stale: it records no hash of the params and limits it was judged against "
                    "(written by an older qpipe); run `dvc repro` (it re-runs what changed)" for name in ("new", "q4", "q8")]
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


def test_a_base_result_in_neither_the_cache_nor_the_remote_is_named(repo):
    head(gate_result("q8", 0.004, 100.0))
    shutil.rmtree(repo / "remote")
    with pytest.raises(BadInput, match="the gate result artifacts/gates/gone.json of HEAD cannot be read"):
        changes.against("HEAD", "md", log=lambda _: None)


def test_a_revision_that_committed_its_results_to_git_is_read_from_git(tmp_path, monkeypatch):
    """Before the gate results were cached, they were `cache: false` metrics in git."""
    monkeypatch.chdir(tmp_path)
    reproduce_base(tmp_path, CACHED_GATES.replace(
        "- artifacts/gates/${item}.json", "- artifacts/gates/${item}.json:\n            cache: false"))
    subprocess.run(GIT + ["add", "-A"], check=True)
    subprocess.run(GIT + ["commit", "-qm", "base"], check=True)
    head(gate_result("q8", 0.004, 100.0))
    base = {result["recipe"]: result["accuracy"]["mean_kld"] for _, result in changes.results_at("HEAD")}
    assert base == {"q8": 0.004, "q4": 0.05, "gone": 0.1}
