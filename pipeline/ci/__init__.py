"""qpipe in a team's CI (docs/ci.md): one job per recipe on the runner its format needs, a
shared DVC remote, and a report job that restores every runner's stages instead of re-running
them.

- ``jobs`` is the recipe matrix: params.yaml's recipes, each on a GPU runner when its format
  names a GPU runtime (``FormatInfo.gpu_runtime``), else on a CPU runner.
- ``github`` and ``gitlab`` write each platform's workflow from it (``qpipe ci init``), and
  ``stale_reason`` says when a written workflow no longer matches params.yaml.
- ``gather`` is the report job's step. A speed figure belongs to the host that measured it, so
  gate@R depends on host.json and a report machine's own host.json would miss every runner's
  run-cache entry. Each runner therefore hands its host.json to the report job (a CI artifact
  of a few hundred bytes), and ``gather`` reproduces each runner's stages under that runner's
  host.json with ``dvc repro --pull --single-item``: DVC finds each stage in the run-cache by
  its inputs and restores it. With ``QPIPE_RESTORE_ONLY=1`` a stage command refuses to run, so
  a stage that no runner pushed stops the job instead of being measured on the wrong host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BadInput, HostLacks

RESTORE_ONLY_ENV = "QPIPE_RESTORE_ONLY"
HOSTS_DIR = "ci-hosts"   # the report job's folder of runners' host.json files, one per recipe
PLATFORMS = ("github", "gitlab")
DVC_FILE = Path("dvc.yaml")
GATE_STAGE = "gate"


def base_extras() -> tuple[str, ...]:
    """The qpipe extras every runner builds with (`make setup EXTRAS=...`): each registered
    format's build tool, and lm-eval for the task gate."""
    from pipeline import formats
    from pipeline.gates.tasks import EXTRA as TASKS_EXTRA

    extras = [formats.module(name).INFO.extra for name in formats.FORMATS]
    return (*[extra for extra in extras if extra], TASKS_EXTRA)


@dataclass(frozen=True)
class StagePlan:
    """Which of dvc.yaml's stages each CI job reproduces, derived from the stages' inputs.

    - ``shared``: the stages every gate needs that read neither the recipe set nor the runner's
      host.json (the checkpoint, texts, reference, task base scores): reproduced once;
    - ``per_recipe``: the `foreach` stages before the gate (``GATE_STAGE``), in dvc.yaml's order;
    - ``per_run``: the other stages the gates need (the baseline, and what reads the recipe set);
    - ``restored``: the commands the report job restores from the run-cache and never runs:
      every stage the gates need but the always-changed host probe, which ``gather`` writes,
      and a stage that reads only the repository's recipe set (formats: cheap, and a pull
      request that edits a recipe changes its inputs, so it runs there)."""

    shared: tuple[str, ...]
    per_recipe: tuple[str, ...]
    per_run: tuple[str, ...]
    restored: tuple[str, ...]


def stage_plan(dvc_file: Path = DVC_FILE) -> StagePlan:
    import yaml

    stages = {name: {**stage.get("do", stage), "foreach": "foreach" in stage}
              for name, stage in yaml.safe_load(Path(dvc_file).read_text())["stages"].items()}

    def outputs(stage: dict) -> list[str]:
        return [next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", []) + stage.get("metrics", [])]

    def producers(stage: dict) -> list[str]:
        return [name for name, other in stages.items() for dep in stage.get("deps", []) for out in outputs(other)
                if dep == out or dep.startswith(out + "/")]

    def upstream(name: str, seen: set[str]) -> set[str]:
        for producer in producers(stages[name]):
            if producer not in seen:
                seen.add(producer)
                upstream(producer, seen)
        return seen

    def reads_host_or_recipe_set(name: str) -> bool:
        """Whether the stage or one before it reads the runner's host.json or the recipe set."""
        return any("artifacts/host.json" in stages[s].get("deps", []) or "recipes" in stages[s].get("params", [])
                   for s in upstream(name, {name}))

    needed = upstream(GATE_STAGE, set())
    ordered = [name for name in stages if name in needed and not stages[name].get("always_changed")]
    shared = tuple(name for name in ordered if not stages[name]["foreach"] and not reads_host_or_recipe_set(name))
    per_recipe = tuple(name for name in ordered if stages[name]["foreach"])
    per_run = tuple(name for name in ordered if not stages[name]["foreach"] and name not in shared)
    recipe_set_only = {name for name in per_run if "recipes" in stages[name].get("params", [])
                       and not any(dep.startswith("artifacts/") for dep in stages[name].get("deps", []))}
    restored = tuple(name for name in [*ordered, GATE_STAGE] if name not in recipe_set_only)
    return StagePlan(shared, per_recipe, per_run, restored)


@dataclass(frozen=True)
class Job:
    """One recipe's runner job."""

    recipe: str
    format: str
    gpu_runtime: str | None   # the extra of the runtime that needs a GPU; None: a CPU runner

    @property
    def runner(self) -> str:
        return "gpu" if self.gpu_runtime else "cpu"

    @property
    def extras(self) -> str:
        return ",".join([*base_extras(), *([self.gpu_runtime] if self.gpu_runtime else [])])

    @property
    def stages(self) -> list[str]:
        """What its runner job reproduces (DVC adds the upstream stages)."""
        return [f"{stage}@{self.recipe}" for stage in (*stage_plan().per_recipe, GATE_STAGE)]


def jobs(recipes: list[str]) -> list[Job]:
    """The matrix: each recipe with its format and the runner that format needs."""
    from pipeline import formats

    return [job(name, formats.load_recipe(name)) for name in recipes]


def job(name: str, recipe) -> Job:
    """Recipe `name`'s job, on the runner its format needs."""
    from pipeline import formats

    return Job(name, recipe.format, formats.module(recipe.format).INFO.gpu_runtime)


def refuse_to_run(command: str) -> None:
    """Stop a stage command in a job that only restores (``gather`` sets the variable)."""
    if os.environ.get(RESTORE_ONLY_ENV) == "1" and command in stage_plan().restored:
        raise HostLacks(f"`qpipe {command.replace('_', '-')}` would run in a job that only restores stages: no runner pushed a run "
                        "with these inputs", where=f"stage {command} ({RESTORE_ONLY_ENV}=1)",
                        fix="let the recipe's runner job finish its `dvc push --run-cache`, and check that it ran "
                            "this commit with the host.json handed to this job")


def runner_hosts(recipes: list[str], hosts_dir: Path) -> dict[bytes, list[str]]:
    """Each runner's host.json bytes -> the recipes gated under it, in params order."""
    by_host: dict[bytes, list[str]] = {}
    missing = [name for name in recipes if not (hosts_dir / f"{name}.json").is_file()]
    if missing:
        raise BadInput(f"no host.json from the runner of {', '.join(missing)}",
                       where=str(hosts_dir / f"{missing[0]}.json"),
                       fix="each gate job copies artifacts/host.json to ci-hosts/RECIPE.json and hands it on as a "
                           "CI artifact (see the workflow `qpipe ci init` writes); did that job fail?")
    for name in recipes:
        by_host.setdefault((hosts_dir / f"{name}.json").read_bytes(), []).append(name)
    return by_host


def gather(recipes: list[str], hosts_dir: Path, log=print) -> list[list[str]]:
    """Restore every recipe's stages from the run-cache, each under its runner's host.json;
    return the `dvc repro` targets run per host. Nothing is re-run (``refuse_to_run``)."""
    from pipeline import layout
    from pipeline.files import write_text

    by_host = runner_hosts(recipes, hosts_dir)
    plan = stage_plan()
    env = {**os.environ, RESTORE_ONLY_ENV: "1"}
    done = []
    for number, (host_bytes, names) in enumerate(by_host.items(), 1):
        write_text(layout.HOST_FILE, host_bytes.decode())
        # --single-item runs the targets in the order given, so each one's inputs come first
        targets = [*plan.shared, *(f"{stage}@{name}" for stage in plan.per_recipe for name in names),
                   *plan.per_run, *(f"{GATE_STAGE}@{name}" for name in names)]
        log(f"host {number} of {len(by_host)} ({', '.join(names)}): dvc repro --pull --single-item {' '.join(targets)}")
        result = subprocess.run(["dvc", "repro", "--pull", "--single-item", *targets], env=env,
                                stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode != 0:
            raise HostLacks(f"`dvc repro --pull --single-item` could not restore the stages of {', '.join(names)} "
                            f"(exit {result.returncode}; DVC's and qpipe's lines above say which)",
                            where=str(hosts_dir), fix="push each runner's run-cache (`dvc push --run-cache`) "
                                                      "and hand on its host.json")
        done.append(targets)
    log(f"gathered {len(recipes)} recipes from {len(by_host)} runner host(s) without re-running a stage")
    return done


def comment(against: str | None, log=print) -> str:
    """The pull-request comment: the report's table, each recipe's change against the base
    revision, and the plot (a local path that `cml comment create --publish` uploads)."""
    from pipeline import changes, layout

    parts = ["## qpipe", "", (layout.REPORT_DIR / "tradeoff.md").read_text().strip(), ""]
    if against:
        parts += [changes.against(against, "md", log=log).strip(), ""]
    parts += [f"![quality vs speed]({layout.REPORT_DIR / 'pareto.png'})", ""]
    return "\n".join(parts)


def write_workflow(platform: str, text: str, path: Path, force: bool) -> None:
    from pipeline.files import write_text

    if path.exists() and not force:
        raise BadInput(f"{path} exists", where=str(path),
                       fix=f"`qpipe ci init {platform} --force` replaces it; `--check` says whether it is current")
    write_text(path, text)


def platform_module(platform: str):
    if platform not in PLATFORMS:
        raise BadInput(f"unknown CI platform {platform!r}", where="qpipe ci init", fix=f"use one of: {', '.join(PLATFORMS)}")
    from importlib import import_module

    return import_module(f"pipeline.ci.{platform}")


def stale_reason(platform: str, path: Path, expected: list[Job]) -> str | None:
    """Why the workflow at `path` no longer matches params.yaml (None: it does)."""
    import yaml

    if not path.is_file():
        return f"{path} does not exist"
    written = platform_module(platform).matrix_of(yaml.safe_load(path.read_text()))
    wanted = {(job.recipe, job.runner) for job in expected}
    if written == wanted:
        return None
    extra = sorted(f"{r} ({k})" for r, k in written - wanted)
    lacking = sorted(f"{r} ({k})" for r, k in wanted - written)
    return "; ".join([*(["it lists " + ", ".join(extra) + " that params.yaml does not"] if extra else []),
                      *(["it lacks " + ", ".join(lacking)] if lacking else [])])


def remote_kind() -> tuple[str, str]:
    """(name, storage kind) of the project's default DVC remote: s3, gs, azure, ssh or local."""
    listed = subprocess.run(["dvc", "remote", "list"], capture_output=True, text=True)
    default = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True)
    name = default.stdout.strip()
    urls = dict(line.split(None, 1) for line in listed.stdout.splitlines() if line.strip())
    if default.returncode != 0 or name not in urls:
        raise BadInput("the project has no default DVC remote for the runners to share", where=".dvc/config",
                       fix="`dvc remote add -d shared <url>` and commit .dvc/config (docs/remote.md)")
    url = urls[name].split()[0]
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    kinds = {"s3": "s3", "gs": "gs", "azure": "azure", "ssh": "ssh", "local": "local", "file": "local"}
    if scheme not in kinds:
        raise BadInput(f"the default DVC remote {name!r} is {scheme}://, which `qpipe ci init` does not set up",
                       where=".dvc/config", fix="use s3, gs, azure, ssh or a directory (docs/remote.md), or edit the "
                                                "written workflow's credentials step")
    return name, kinds[scheme]


@dataclass(frozen=True)
class RemoteSetup:
    """What a job needs to reach the remote: DVC's plugin, the secrets it reads as environment
    variables, and commands that turn a secret into a file DVC is pointed at."""

    plugin: str | None
    secrets: tuple[str, ...]
    commands: tuple[str, ...]


def remote_setup(name: str, kind: str) -> RemoteSetup:
    key_dir = "$HOME/.config/qpipe-ci"  # outside the checkout, so no `git add` can take a key along
    if kind == "s3":
        return RemoteSetup("s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ())
    if kind == "azure":
        return RemoteSetup("azure", ("AZURE_STORAGE_CONNECTION_STRING",), ())
    if kind == "gs":
        return RemoteSetup("gs", ("GCP_SERVICE_ACCOUNT_KEY",), (
            f'mkdir -p "{key_dir}" && printf "%s" "$GCP_SERVICE_ACCOUNT_KEY" > "{key_dir}/gcp.json"',
            f'dvc remote modify --local {name} credentialpath "{key_dir}/gcp.json"'))
    if kind == "ssh":
        return RemoteSetup("ssh", ("QPIPE_SSH_KEY",), (
            f'mkdir -p "{key_dir}" && printf "%s\\n" "$QPIPE_SSH_KEY" > "{key_dir}/ssh-key" && chmod 600 "{key_dir}/ssh-key"',
            f'dvc remote modify --local {name} keyfile "{key_dir}/ssh-key"'))
    return RemoteSetup(None, (), ())


def install_commands(extras: str, remote: RemoteSetup) -> list[str]:
    """Shell lines that install qpipe into .venv on a fresh runner and reach the remote."""
    lines = [f"make setup EXTRAS={extras}"]
    if remote.plugin:
        lines.append(f".venv/bin/python -m pip install --quiet 'dvc[{remote.plugin}]'")
    return lines


def render(document: dict, platform: str) -> str:
    """The workflow as YAML: keys in the order written, shell scripts as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    header = (f"# Written by `qpipe ci init {platform}` from params.yaml and each recipe's format (docs/ci.md).\n"
              f"# `qpipe add-recipe` rewrites it; after other changes to the recipes, run `qpipe ci init {platform} "
              f"--force`: the shared job fails while this file is stale.\n")
    return header + yaml.dump(document, Dumper=Dumper, sort_keys=False, width=1000, default_flow_style=False)


@dataclass(frozen=True)
class Workflow:
    """A platform's workflow as `qpipe ci init` writes it: where, its text, and what it holds."""

    platform: str
    path: Path
    text: str
    summary: str


def workflow(platform: str, matrix: list[Job], cpu_labels: list[str] | None, gpu_labels: list[str] | None) -> Workflow:
    """The platform's workflow for these jobs and the project's default DVC remote (None labels:
    the platform's defaults)."""
    module = platform_module(platform)
    name, kind = remote_kind()
    cpu = list(module.DEFAULT_CPU_LABELS if cpu_labels is None else cpu_labels)
    gpu = list(module.DEFAULT_GPU_LABELS if gpu_labels is None else gpu_labels)
    if platform == "github" and not (cpu and gpu):
        raise BadInput("a GitHub job needs at least one runner label", where="--cpu-labels / --gpu-labels",
                       fix="e.g. --cpu-labels ubuntu-latest --gpu-labels self-hosted,gpu")
    text = render(module.document(matrix, cpu, gpu, remote_setup(name, kind)), platform)
    on_gpu = [job.recipe for job in matrix if job.gpu_runtime]
    return Workflow(platform, Path(module.PATH), text, f"{len(matrix)} recipe jobs ({len(on_gpu)} on GPU runners: "
                                                       f"{', '.join(on_gpu) or 'none'}), DVC remote {name!r} ({kind})")


def init(platform: str, recipes: list[str], cpu_labels: list[str] | None, gpu_labels: list[str] | None,
         force: bool, log=print) -> Path:
    """Write the platform's workflow for these recipes and the project's default DVC remote."""
    written = workflow(platform, jobs(recipes), cpu_labels, gpu_labels)
    write_workflow(platform, written.text, written.path, force)
    log(f"wrote {written.path}: {written.summary}")
    return written.path


def rewritten(matrix: list[Job]) -> list[Workflow]:
    """Each workflow `qpipe ci init` wrote in this project, as it writes it for these jobs, with
    the runner labels the written file has (the defaults where it has no job to say)."""
    import yaml

    found = []
    for platform in PLATFORMS:
        module = platform_module(platform)
        path = Path(module.PATH)
        if path.is_file():
            cpu, gpu = module.labels_of(yaml.safe_load(path.read_text()))
            found.append(workflow(platform, matrix, cpu, gpu))
    return found
