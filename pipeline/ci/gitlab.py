"""The GitLab CI pipeline `qpipe ci init gitlab` writes (docs/ci.md).

The same jobs as the GitHub workflow (pipeline/ci/github.py), as GitLab stages: ``shared``,
then ``gate-cpu`` and ``gate-gpu`` as ``parallel: matrix`` jobs on runners with the given tags,
then ``report``, which receives every runner's host.json as job artifacts. The merge-request
comment goes through CML with GitLab's own uploads (``--native``); publishing and tags need a
project access token in ``QPIPE_GIT_TOKEN``. Validated against the CI schema check-jsonschema
vendors from GitLab (``vendor.gitlab-ci``).
"""

from __future__ import annotations

from typing import Any

from pipeline.ci import HOSTS_DIR, Job, RemoteSetup, base_extras, install_commands, stage_plan

PATH = ".gitlab-ci.yml"
DEFAULT_CPU_LABELS: tuple[str, ...] = ()   # no tags: any runner that takes untagged jobs
DEFAULT_GPU_LABELS = ("gpu",)
MERGE_REQUEST = '$CI_PIPELINE_SOURCE == "merge_request_event"'
DEFAULT_BRANCH = "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH"


def _template(remote: RemoteSetup) -> dict[str, Any]:
    return {
        "image": "python:3.11",
        "variables": {"PIP_CACHE_DIR": "$CI_PROJECT_DIR/.cache/pip", "QPIPE_EXTRAS": ",".join(base_extras())},
        "cache": {"key": {"files": ["pyproject.toml"], "prefix": "$QPIPE_EXTRAS"}, "paths": [".cache/pip"]},
        "before_script": [
            "command -v make >/dev/null || { apt-get update -qq && apt-get install -y -qq make cmake; }",
            *install_commands("$QPIPE_EXTRAS", remote),
            'export PATH="$PWD/.venv/bin:$PATH"',
            *remote.commands,
        ],
    }


def document(jobs: list[Job], cpu_labels: list[str], gpu_labels: list[str], remote: RemoteSetup,
             main_branch: str = "main") -> dict[str, Any]:
    del main_branch  # GitLab names it: $CI_DEFAULT_BRANCH
    tags = {"cpu": {"tags": cpu_labels} if cpu_labels else {}, "gpu": {"tags": gpu_labels} if gpu_labels else {}}
    cpu = [job for job in jobs if not job.gpu_runtime]
    gpu = [job for job in jobs if job.gpu_runtime]
    gate_script = ["dvc repro --pull recipe@$RECIPE build@$RECIPE engine@$RECIPE gate@$RECIPE",
                   "dvc push --run-cache",
                   f"mkdir -p {HOSTS_DIR} && cp artifacts/host.json {HOSTS_DIR}/$RECIPE.json"]
    document: dict[str, Any] = {
        "workflow": {"rules": [{"if": MERGE_REQUEST}, {"if": DEFAULT_BRANCH}]},
        "stages": ["shared", "gate", "report"],
        ".qpipe": _template(remote),
        "shared": {"extends": ".qpipe", "stage": "shared", **tags["cpu"],
                   "script": ["qpipe ci init gitlab --check", f"dvc repro --pull {' '.join(stage_plan().shared)}",
                              "dvc push --run-cache"]},
    }
    if cpu:
        document["gate-cpu"] = {"extends": ".qpipe", "stage": "gate", **tags["cpu"],
                                "parallel": {"matrix": [{"RECIPE": [job.recipe for job in cpu]}]},
                                "script": gate_script, "artifacts": {"paths": [f"{HOSTS_DIR}/"]}}
    if gpu:
        by_runtime: dict[str, list[str]] = {}
        for job in gpu:
            by_runtime.setdefault(job.extras, []).append(job.recipe)
        document["gate-gpu"] = {"extends": ".qpipe", "stage": "gate", **tags["gpu"],
                                "parallel": {"matrix": [{"RECIPE": names, "QPIPE_EXTRAS": [extras]}
                                                        for extras, names in by_runtime.items()]},
                                "script": gate_script, "artifacts": {"paths": [f"{HOSTS_DIR}/"]}}
    push_url = "https://oauth2:${QPIPE_GIT_TOKEN}@${CI_SERVER_HOST}/${CI_PROJECT_PATH}.git"
    document["report"] = {
        "extends": ".qpipe", "stage": "report", **tags["cpu"],
        "needs": ["shared", *(name for name in ("gate-cpu", "gate-gpu") if name in document)],
        "variables": {"GIT_DEPTH": "0"},
        "script": [
            f"qpipe ci gather --hosts {HOSTS_DIR}",
            "dvc repro --single-item report",
            'if [ "$CI_PIPELINE_SOURCE" = merge_request_event ]; then '
            "git fetch -q origin $CI_MERGE_REQUEST_TARGET_BRANCH_NAME && "
            "qpipe ci comment --against origin/$CI_MERGE_REQUEST_TARGET_BRANCH_NAME > comment.md && "
            "apt-get install -y -qq nodejs npm && npm install -g --silent @dvcorg/cml && "
            "cml comment create --publish --native comment.md; fi",
            'if [ "$CI_COMMIT_BRANCH" = "$CI_DEFAULT_BRANCH" ]; then '
            'git config user.name qpipe-ci && git config user.email qpipe-ci@invalid && '
            'qpipe publish --to "$QPIPE_PUBLISH_TO" --gto-tag && '
            f'git push "{push_url}" --tags && '
            '{ git diff --quiet dvc.lock || { git commit -m "qpipe: gate results of $CI_COMMIT_SHORT_SHA [skip ci]" '
            f'dvc.lock && git push "{push_url}" HEAD:$CI_DEFAULT_BRANCH; }}; }}; fi',
            "qpipe check",
        ],
        "artifacts": {"when": "always", "paths": ["artifacts/report/"]},
    }
    return document


def matrix_of(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(recipe, runner) of every gate job in a written pipeline."""
    found = set()
    for job, runner in (("gate-cpu", "cpu"), ("gate-gpu", "gpu")):
        for entry in ((document.get(job) or {}).get("parallel") or {}).get("matrix") or []:
            found |= {(name, runner) for name in entry.get("RECIPE", [])}
    return found


def labels_of(document: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """The CPU and GPU runner tags of a written pipeline (a job without tags: none); None where
    it has no job that says."""

    def tags(job: str) -> list[str] | None:
        return list(document[job].get("tags") or []) if isinstance(document.get(job), dict) else None

    return tags("shared"), tags("gate-gpu")
