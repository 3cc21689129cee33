"""Runners that share a DVC remote: one reproduces the shared stages, each other one its own
recipe, and each pushes its outputs and run-cache; a last clone pulls the run-cache and
reproduces the whole pipeline without re-running a shared stage, a build or a gate. Real DVC,
a directory remote, clones of one repository on this machine (so every clone's host.json is
the same: the bandwidth is kept per machine).
"""

import shutil
import subprocess

import pytest

from tests.conftest import REPO, tracked_files, write
from tests.test_pipeline import LOOSE_GATES, SMALL_PARAMS, run

pytestmark = pytest.mark.integration

RECIPES = ("gguf-q8_0", "gguf-q4_0")


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    import os
    import sys
    from pathlib import Path

    base = tmp_path_factory.mktemp("shared")
    root = base / "origin"
    for name in tracked_files():
        if not name.startswith(("tests/", "artifacts/gates/", "artifacts/runs/")) and name != "dvc.lock":
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = SMALL_PARAMS.split("recipes:")[0] + "recipes:\n" + "".join(f"  - {r}\n" for r in RECIPES) + "limits: {}\n"
    write(root / "params.yaml", params)
    for name in RECIPES:
        recipe = root / "recipes" / f"{name}.yaml"
        recipe.write_text(recipe.read_text().split("gates:")[0] + LOOSE_GATES)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    git = ["git", "-c", "user.name=qpipe-test", "-c", "user.email=test@example.invalid"]
    run(git + ["-C", str(root), "init", "-q"], env)
    subprocess.run(["dvc", "remote", "add", "-d", "shared", str(base / "remote")], cwd=root, env=env, check=True)
    run(git + ["-C", str(root), "add", "-A"], env)
    run(git + ["-C", str(root), "commit", "-qm", "base"], env)
    return base, env


def in_clone(base, env, name, *commands):
    """Clone the origin as runner `name` and run each command there; their stdout, joined."""
    clone = base / name
    run(["git", "clone", "-q", str(base / "origin"), str(clone)], env)
    said = []
    for command in commands:
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        if result.returncode != 0 and command[:2] != ["dvc", "pull"]:  # a first pull finds no outputs yet
            raise AssertionError(f"{name}: {command} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        said.append(result.stdout)
    return clone, "\n".join(said)


def ran(output):
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_runners_share_the_shared_stages_the_builds_and_the_gates_through_the_remote(origin):
    base, env = origin
    pull, push = ["dvc", "pull", "--run-cache"], ["dvc", "push", "--run-cache"]
    _, shared = in_clone(base, env, "shared", pull, ["dvc", "repro", "--pull", "source", "corpus", "reference"], push)
    assert {"source", "corpus", "reference"} <= set(ran(shared))
    outputs = {}
    for recipe in RECIPES:
        _, outputs[recipe] = in_clone(base, env, f"runner-{recipe}", pull,
                                      ["dvc", "repro", "--pull", f"build@{recipe}", f"engine@{recipe}", f"gate@{recipe}"], push)
        assert {f"build@{recipe}", f"gate@{recipe}"} <= set(ran(outputs[recipe]))
        assert not {"source", "corpus", "reference"} & set(ran(outputs[recipe])), outputs[recipe]
    last, report = in_clone(base, env, "report", pull, ["dvc", "repro", "--pull"])
    assert not [stage for stage in ran(report)
                if stage.startswith(("source", "corpus", "reference", "build@", "gate@"))], report
    for recipe in RECIPES:
        assert f"Stage 'build@{recipe}' is cached - skipping run" in report
        assert f"Stage 'gate@{recipe}' is cached - skipping run" in report
        assert (last / "artifacts" / "runs" / f"build@{recipe}.json").is_file()  # the run record came along
        assert (last / "artifacts" / "gates" / f"{recipe}.json").read_bytes() == \
            (base / f"runner-{recipe}" / "artifacts" / "gates" / f"{recipe}.json").read_bytes()
    assert {"report", "check"} <= set(ran(report))
