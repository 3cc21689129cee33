"""The CI flow of docs/ci.md, played with real DVC, real qpipe stages and a directory remote.

- The base commit is reproduced once and pushed, with its dvc.lock committed (the main branch).
- A pull request then tightens one recipe's limit. Its jobs run in clones of the repository:
  - a shared job reproduces source, corpus and reference;
  - two runners each reproduce one recipe and push. The second plays another machine: its
    bandwidth cache says another figure, so its host.json differs, as two runners' do.
- A third clone plays the report job: it pulls the run-cache, restores every stage of both
  runners with `qpipe ci gather` (each under its runner's host.json) and reproduces the report.
  No build or gate stage runs there (DVC says each was restored, and in that job a stage
  command refuses to run). It then prints the pull-request comparison against the base.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tracked_files, write
from tests.test_pipeline import LOOSE_GATES, SMALL_PARAMS, run

pytestmark = pytest.mark.integration

RECIPES = ("gguf-q8_0", "gguf-q4_0")
GIT = ["git", "-c", "user.name=qpipe-test", "-c", "user.email=test@example.invalid"]


def ran(output):
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared")
    origin = base / "origin"
    for name in tracked_files():
        if not name.startswith(("tests/", "artifacts/")) and name != "dvc.lock":
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, origin / name)
    params = (SMALL_PARAMS.split("recipes:")[0] + "recipes:\n" + "".join(f"  - {r}\n" for r in RECIPES)
              + "limits: {}\nsensitivity: {formats: []}\ntasks: []\n")
    write(origin / "params.yaml", params)
    for name in RECIPES:
        recipe = origin / "recipes" / f"{name}.yaml"
        recipe.write_text(recipe.read_text().split("gates:")[0] + LOOSE_GATES)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("XDG_CACHE_HOME", None)

    def in_origin(*command):
        result = subprocess.run(list(command), cwd=origin, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    in_origin(*GIT, "init", "-q", "-b", "main")
    in_origin("dvc", "remote", "add", "-d", "shared", str(base / "remote"))
    in_origin("dvc", "repro")            # the main branch: reproduced, pushed, its dvc.lock committed
    in_origin("dvc", "push", "--run-cache")
    in_origin(*GIT, "add", "-A")
    in_origin(*GIT, "commit", "-qm", "base")
    q4 = origin / "recipes" / "gguf-q4_0.yaml"
    q4.write_text(q4.read_text().replace("max_mean_kld: 0.5", "max_mean_kld: 0.000001"))
    in_origin(*GIT, "commit", "-qam", "pull request: a limit gguf-q4_0 cannot meet")

    host = json.loads((origin / "artifacts" / "host.json").read_text())
    other_machine = base / "machine-b-cache"
    measured = dict(host["bandwidth"], gb_s=round(host["bandwidth"]["gb_s"] * 1.5, 1))
    write(other_machine / "qpipe" / f"bandwidth-{host['fingerprint']}.json", json.dumps(measured))
    return base, env, {"XDG_CACHE_HOME": str(other_machine)}


def in_clone(base, env, name, *commands):
    """Clone the origin as job `name` and run each command there; their stdout and stderr."""
    clone = base / name
    run(["git", "clone", "-q", str(base / "origin"), str(clone)], env)
    said = []
    for command in commands:
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"{name}: {command} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        said.append(result.stdout + result.stderr)
    return clone, "\n".join(said)


def test_the_report_job_gathers_every_runner_without_re_running_a_stage_and_compares(flow):
    base, env, machine_b = flow
    push = ["dvc", "push", "--run-cache"]

    _, shared = in_clone(base, env, "shared", ["dvc", "repro", "--pull", "source", "corpus", "reference"], push)
    assert not {"source", "corpus", "reference"} & set(ran(shared)), shared  # unchanged since main: restored

    def runner(recipe, runner_env):
        targets = [f"{stage}@{recipe}" for stage in ("recipe", "build", "engine", "gate")]
        clone, said = in_clone(base, runner_env, f"runner-{recipe}", ["dvc", "repro", "--pull", *targets], push)
        return clone, said

    q8, q8_said = runner("gguf-q8_0", env)
    # the same machine as main's run: every stage restored, but formats, which reads the recipe
    # files the pull request edited; it wrote the same formats.json, so nothing after it ran
    assert ran(q8_said) == ["host", "formats"], q8_said
    q4, q4_said = runner("gguf-q4_0", {**env, **machine_b})
    assert "build@gguf-q4_0" not in ran(q4_said)  # a build does not depend on the host
    assert {"baseline", "gate@gguf-q4_0"} <= set(ran(q4_said)), q4_said  # its own host, its own speed figures
    hosts = {name: (clone / "artifacts" / "host.json").read_bytes() for name, clone in
             (("gguf-q8_0", q8), ("gguf-q4_0", q4))}
    assert hosts["gguf-q8_0"] != hosts["gguf-q4_0"]

    for name, host_bytes in hosts.items():  # what the CI artifacts hand on
        (base / "ci-hosts").mkdir(exist_ok=True)
        (base / "ci-hosts" / f"{name}.json").write_bytes(host_bytes)
    clone, said = in_clone(base, env, "report", ["dvc", "pull", "--run-cache", "--allow-missing"],
                           ["qpipe", "ci", "gather", "--hosts", str(base / "ci-hosts")],
                           ["dvc", "repro", "--single-item", "report"])
    assert not [stage for stage in ran(said) if stage != "report"], said
    for recipe in RECIPES:
        for stage in ("build", "gate"):
            assert f"Stage '{stage}@{recipe}' is cached - skipping run" in said or \
                f"Stage '{stage}@{recipe}' didn't change, skipping" in said, said
        runner_clone = q8 if recipe == "gguf-q8_0" else q4
        assert (clone / "artifacts" / "gates" / f"{recipe}.json").read_bytes() == \
            (runner_clone / "artifacts" / "gates" / f"{recipe}.json").read_bytes()
    assert "gathered 2 recipes from 2 runner host(s) without re-running a stage" in said

    check = subprocess.run(["qpipe", "check"], cwd=clone, env=env, capture_output=True, text=True)
    assert check.returncode == 1 and "did not pass: gguf-q4_0 |" in check.stderr and "pass  gguf-q8_0" in check.stderr
    comparison = subprocess.run(["qpipe", "compare", "--against", "HEAD~1", "--format", "md"], cwd=clone, env=env,
                                capture_output=True, text=True, check=True).stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in comparison.splitlines() if line.startswith("| gguf")}
    assert "| same artifact |" in rows["gguf-q8_0"] and "pass |" in rows["gguf-q8_0"]
    assert "| same artifact |" in rows["gguf-q4_0"] and "pass → fail" in rows["gguf-q4_0"]
    assert "max_mean_kld failed" in rows["gguf-q4_0"]
    comment = subprocess.run(["qpipe", "ci", "comment", "--against", "HEAD~1"], cwd=clone, env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "Changes against `HEAD~1`" in comment and "![quality vs speed](artifacts/report/pareto.png)" in comment


def test_without_a_runners_push_the_report_job_stops_instead_of_gating_here(flow):
    base, env, _ = flow
    hosts = base / "lonely-hosts"
    hosts.mkdir()
    for name in RECIPES:  # a host no runner ran on: nothing in the run-cache matches
        (hosts / f"{name}.json").write_text(json.dumps({"fingerprint": "elsewhere", "cpu": {}, "gpus": []}))
    clone = base / "lonely-report"
    run(["git", "clone", "-q", str(base / "origin"), str(clone)], env)
    result = subprocess.run(["qpipe", "ci", "gather", "--hosts", str(hosts)], cwd=clone, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "would run in a job that only restores stages" in result.stderr
    assert not list(clone.glob("artifacts/gates/*.json"))
