"""The GitHub Actions workflow `qpipe ci init github` writes (docs/ci.md).

Jobs: ``shared`` reproduces source, corpus and reference once; ``gate-cpu`` and ``gate-gpu``
reproduce one recipe each on the runner its format needs and push to the shared remote;
``report`` gathers every runner's stages from the run-cache, comments on the pull request
(CML) and, on the main branch, publishes what passed, tags each new version in GTO's
``name@vX.Y.Z`` and commits the gathered dvc.lock. Validated against the workflow schema that
check-jsonschema vendors from SchemaStore (``vendor.github-workflows``).
"""

from __future__ import annotations

from typing import Any

from pipeline.ci import HOSTS_DIR, Job, RemoteSetup, base_extras, install_commands, stage_plan

PATH = ".github/workflows/qpipe.yml"
DEFAULT_CPU_LABELS = ("ubuntu-latest",)
DEFAULT_GPU_LABELS = ("self-hosted", "gpu")
HOST_ARTIFACT = "qpipe-host-"


def _install(extras: str, remote: RemoteSetup, history: bool = False) -> list[dict[str, Any]]:
    steps = [
        {"uses": "actions/checkout@v4", **({"with": {"fetch-depth": 0}} if history else {})},
        {"uses": "actions/setup-python@v5", "with": {"python-version": "3.11"}},
        {"name": "pip cache (llama-cpp-python is built from source once, then its wheel is reused)",
         "uses": "actions/cache@v4",
         "with": {"path": "~/.cache/pip", "key": f"pip-${{{{ runner.os }}}}-{extras}-${{{{ hashFiles('pyproject.toml') }}}}"}},
        {"name": "install qpipe", "run": "\n".join([*install_commands(extras, remote),
                                                     'echo "$PWD/.venv/bin" >> "$GITHUB_PATH"'])},
    ]
    if remote.commands:
        steps.append({"name": "DVC remote credentials", "run": "\n".join(remote.commands)})
    return steps


def _secrets(remote: RemoteSetup) -> dict[str, str]:
    return {name: f"${{{{ secrets.{name} }}}}" for name in remote.secrets}


def _gate_steps(recipe: str, extras: str, remote: RemoteSetup) -> list[dict[str, Any]]:
    targets = " ".join(f"{stage}@{recipe}" for stage in ("recipe", "build", "engine", "gate"))
    return [
        *_install(extras, remote),
        {"name": "reproduce the recipe (restoring what the run-cache has)", "run": f"dvc repro --pull {targets}"},
        {"name": "push outputs and run-cache", "run": "dvc push --run-cache"},
        {"name": "hand this runner's host.json to the report job",
         "run": f"mkdir -p {HOSTS_DIR} && cp artifacts/host.json {HOSTS_DIR}/{recipe}.json"},
        {"uses": "actions/upload-artifact@v4",
         "with": {"name": f"{HOST_ARTIFACT}{recipe}", "path": f"{HOSTS_DIR}/{recipe}.json"}},
    ]


def document(jobs: list[Job], cpu_labels: list[str], gpu_labels: list[str], remote: RemoteSetup,
             main_branch: str = "main") -> dict[str, Any]:
    shared_extras = ",".join(base_extras())
    cpu = [job for job in jobs if not job.gpu_runtime]
    gpu = [job for job in jobs if job.gpu_runtime]
    runs_on = {"cpu": cpu_labels[0] if len(cpu_labels) == 1 else cpu_labels,
               "gpu": gpu_labels[0] if len(gpu_labels) == 1 else gpu_labels}
    definition: dict[str, Any] = {}
    definition["shared"] = {
        "runs-on": runs_on["cpu"], "env": _secrets(remote),
        "steps": [*_install(shared_extras, remote),
                  {"name": "the workflow lists params.yaml's recipes", "run": "qpipe ci init github --check"},
                  {"name": "the stages every recipe shares, once", "run": f"dvc repro --pull {' '.join(stage_plan().shared)}"},
                  {"name": "push outputs and run-cache", "run": "dvc push --run-cache"}]}
    if cpu:
        definition["gate-cpu"] = {
            "needs": "shared", "runs-on": runs_on["cpu"], "env": _secrets(remote),
            "strategy": {"fail-fast": False, "matrix": {"recipe": [job.recipe for job in cpu]}},
            "steps": _gate_steps("${{ matrix.recipe }}", shared_extras, remote)}
    if gpu:
        definition["gate-gpu"] = {
            "needs": "shared", "runs-on": runs_on["gpu"], "env": _secrets(remote),
            "strategy": {"fail-fast": False, "matrix": {"include": [{"recipe": job.recipe, "extras": job.extras}
                                                                     for job in gpu]}},
            "steps": _gate_steps("${{ matrix.recipe }}", "${{ matrix.extras }}", remote)}
    publish_env = {"QPIPE_PUBLISH_TO": "${{ vars.QPIPE_PUBLISH_TO }}",
                   **{name: f"${{{{ secrets.{name} }}}}" for name in
                      ("QPIPE_REGISTRY_USERNAME", "QPIPE_REGISTRY_PASSWORD", "HF_TOKEN")}}
    definition["report"] = {
        "needs": ["shared", *(name for name in ("gate-cpu", "gate-gpu") if name in definition)],
        "if": "${{ !cancelled() }}", "runs-on": runs_on["cpu"], "env": _secrets(remote),
        "steps": [
            *_install(shared_extras, remote, history=True),
            {"uses": "actions/download-artifact@v4",
             "with": {"pattern": f"{HOST_ARTIFACT}*", "path": HOSTS_DIR, "merge-multiple": True}},
            {"name": "restore every runner's stages from the run-cache (re-runs none)",
             "run": f"qpipe ci gather --hosts {HOSTS_DIR}"},
            {"name": "report", "run": "dvc repro --single-item report"},
            {"uses": "actions/upload-artifact@v4", "if": "${{ always() }}",
             "with": {"name": "qpipe-report", "path": "artifacts/report"}},
            {"uses": "iterative/setup-cml@v2", "if": "${{ github.event_name == 'pull_request' }}"},
            {"name": "comment on the pull request", "if": "${{ github.event_name == 'pull_request' }}",
             "env": {"REPO_TOKEN": "${{ secrets.GITHUB_TOKEN }}"},
             "run": "qpipe ci comment --against origin/${{ github.base_ref }} > comment.md\n"
                    "cml comment create --publish comment.md"},
            {"name": "publish what passed, tag each new version (GTO), record the gate results",
             "if": f"${{{{ github.ref == 'refs/heads/{main_branch}' }}}}", "env": publish_env,
             "run": "\n".join([
                 'git config user.name "qpipe-ci" && git config user.email "qpipe-ci@users.noreply.github.com"',
                 'qpipe publish --to "$QPIPE_PUBLISH_TO" --gto-tag',
                 "git push origin --tags",
                 'git diff --quiet dvc.lock || { git commit -m "qpipe: gate results of ${GITHUB_SHA::7} [skip ci]" '
                 f"dvc.lock && git push origin HEAD:{main_branch}; }}"])},
            {"name": "every required gate passed", "run": "qpipe check"},
        ]}
    return {
        "name": "qpipe",
        "on": {"pull_request": None, "push": {"branches": [main_branch]}},
        "permissions": {"contents": "write", "pull-requests": "write"},
        "concurrency": {"group": "qpipe-${{ github.ref }}",
                        "cancel-in-progress": "${{ github.event_name == 'pull_request' }}"},
        "jobs": definition,
    }


def matrix_of(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(recipe, runner) of every gate job in a written workflow."""
    jobs = document.get("jobs") or {}
    cpu = ((jobs.get("gate-cpu") or {}).get("strategy") or {}).get("matrix", {}).get("recipe") or []
    gpu = ((jobs.get("gate-gpu") or {}).get("strategy") or {}).get("matrix", {}).get("include") or []
    return {(name, "cpu") for name in cpu} | {(entry["recipe"], "gpu") for entry in gpu}


def labels_of(document: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """The CPU and GPU runner labels (`runs-on`) of a written workflow; None where it has no
    job that says."""
    jobs = document.get("jobs") or {}

    def runs_on(job: str) -> list[str] | None:
        labels = (jobs.get(job) or {}).get("runs-on")
        return None if labels is None else [labels] if isinstance(labels, str) else list(labels)

    return runs_on("shared"), runs_on("gate-gpu")
