"""`qpipe ci init`: the written workflows parse, validate against the platform's published
schema (check-jsonschema vendors SchemaStore's GitHub workflow schema and GitLab's CI schema),
list params.yaml's recipes on the runner each format needs, and run the commands the flow in
docs/ci.md relies on (played with real DVC in tests/test_shared_remote.py)."""

import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import ci, formats
from pipeline.ci import github, gitlab
from pipeline.cli import app
from pipeline.config import load_params
from tests.conftest import write

runner = CliRunner()
SCHEMAS = {"github": "vendor.github-workflows", "gitlab": "vendor.gitlab-ci"}


@pytest.fixture
def remote_project(project):
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "remote", "add", "-q", "-d", "shared", "s3://bucket/qpipe"], check=True)
    return project


def init(platform, *options):
    result = runner.invoke(app, ["ci", "init", platform, *options])
    return result


def expected_runners():
    """recipe -> (runner, extras), from each recipe's format, not from this test."""
    found = {}
    for name in load_params().recipes:
        gpu_runtime = formats.module(formats.load_recipe(name).format).INFO.gpu_runtime
        found[name] = ("gpu" if gpu_runtime else "cpu", ",".join([*ci.base_extras(), *([gpu_runtime] if gpu_runtime else [])]))
    return found


@pytest.mark.parametrize("platform", ci.PLATFORMS)
def test_the_written_workflow_validates_against_the_platform_schema(remote_project, platform):
    result = init(platform)
    assert result.exit_code == 0, result.output
    path = ci.platform_module(platform).PATH
    validated = subprocess.run(["check-jsonschema", "--builtin-schema", SCHEMAS[platform], path],
                               capture_output=True, text=True)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    broken = yaml.safe_load(open(path))
    broken["jobs" if platform == "github" else "report"]["needs"] = 7  # the schema must catch this
    write(remote_project / "broken.yml", yaml.safe_dump(broken))
    assert subprocess.run(["check-jsonschema", "--builtin-schema", SCHEMAS[platform], "broken.yml"],
                          capture_output=True).returncode != 0


def test_github_matrix_labels_and_commands(remote_project):
    assert init("github", "--gpu-labels", "self-hosted,linux,h100").exit_code == 0
    jobs = yaml.safe_load(open(github.PATH))["jobs"]
    runners = expected_runners()
    assert {"gguf-q4_k_m", "awq-w4a16", "trtllm-fp8"} <= set(runners)
    assert jobs["gate-cpu"]["strategy"]["matrix"]["recipe"] == [r for r, (k, _) in runners.items() if k == "cpu"]
    assert jobs["gate-gpu"]["strategy"]["matrix"]["include"] == [
        {"recipe": r, "extras": extras} for r, (k, extras) in runners.items() if k == "gpu"]
    assert runners["awq-w4a16"] == ("gpu", "awq,modelopt,tasks,vllm") and runners["trtllm-fp8"][1].endswith(",trtllm")
    assert jobs["gate-cpu"]["runs-on"] == "ubuntu-latest"
    assert jobs["gate-gpu"]["runs-on"] == ["self-hosted", "linux", "h100"]
    runs = {name: [step.get("run", "") for step in job["steps"]] for name, job in jobs.items()}
    assert "dvc repro --pull source corpus reference sensitivity task_base" in runs["shared"]
    assert "qpipe ci init github --check" in runs["shared"]
    for gate in ("gate-cpu", "gate-gpu"):
        assert jobs[gate]["needs"] == "shared"
        r = "${{ matrix.recipe }}"
        assert f"dvc repro --pull recipe@{r} build@{r} engine@{r} gate@{r}" in runs[gate]
        assert runs[gate].index("dvc push --run-cache") > runs[gate].index(f"dvc repro --pull recipe@{r} build@{r} "
                                                                           f"engine@{r} gate@{r}")
        assert any("AWS_SECRET_ACCESS_KEY" in name for name in jobs[gate]["env"])
    report = "\n".join(runs["report"])
    assert jobs["report"]["needs"] == ["shared", "gate-cpu", "gate-gpu"]
    for command in ("qpipe ci gather --hosts ci-hosts", "dvc repro --single-item report",
                    "qpipe ci comment --against origin/${{ github.base_ref }}", "cml comment create --publish",
                    'qpipe publish --to "$QPIPE_PUBLISH_TO" --gto-tag', "git push origin --tags", "qpipe check"):
        assert command in report
    assert report.index("qpipe ci gather") < report.index("dvc repro --single-item report") < report.index("qpipe check")


def test_gitlab_matrix_tags_and_commands(remote_project):
    assert init("gitlab", "--cpu-labels", "docker", "--gpu-labels", "gpu,cuda").exit_code == 0
    document = yaml.safe_load(open(gitlab.PATH))
    runners = expected_runners()
    assert gitlab.matrix_of(document) == {(r, k) for r, (k, _) in runners.items()}
    gpu_matrix = document["gate-gpu"]["parallel"]["matrix"]
    assert {(r, entry["QPIPE_EXTRAS"][0]) for entry in gpu_matrix for r in entry["RECIPE"]} == \
        {(r, extras) for r, (k, extras) in runners.items() if k == "gpu"}
    assert document["gate-cpu"]["tags"] == ["docker"] and document["gate-gpu"]["tags"] == ["gpu", "cuda"]
    assert "dvc repro --pull recipe@$RECIPE build@$RECIPE engine@$RECIPE gate@$RECIPE" in document["gate-cpu"]["script"]
    assert document["gate-cpu"]["artifacts"]["paths"] == ["ci-hosts/"]
    assert document["report"]["needs"] == ["shared", "gate-cpu", "gate-gpu"]
    script = "\n".join(document["report"]["script"])
    for command in ("qpipe ci gather --hosts ci-hosts", "cml comment create --publish --native", "--gto-tag",
                    "qpipe check"):
        assert command in script
    assert "make setup EXTRAS=$QPIPE_EXTRAS" in document[".qpipe"]["before_script"]


@pytest.mark.parametrize("platform", ci.PLATFORMS)
def test_check_says_when_the_matrix_no_longer_matches_params(remote_project, platform):
    assert init(platform).exit_code == 0
    assert init(platform, "--check").exit_code == 0
    params = (remote_project / "params.yaml").read_text()
    write(remote_project / "params.yaml", params.replace("  - gguf-q4_0\n", ""))
    result = init(platform, "--check")
    assert result.exit_code == 2
    assert "stale: it lists gguf-q4_0 (cpu) that params.yaml does not" in result.output
    assert f"qpipe ci init {platform} --force" in result.output


def test_an_existing_workflow_needs_force_and_a_remote_is_required(project):
    subprocess.run(["git", "init", "-q"], check=True)
    result = init("github")
    assert result.exit_code == 2 and "no default DVC remote" in result.output and "dvc remote add -d" in result.output
    subprocess.run(["dvc", "remote", "add", "-q", "-d", "shared", "/srv/qpipe-remote"], check=True)
    assert init("github").exit_code == 0
    result = init("github")
    assert result.exit_code == 2 and "--force" in result.output
    assert init("github", "--force").exit_code == 0
    assert init("jenkins").exit_code == 2


@pytest.mark.parametrize("url, secrets, command", [
    ("s3://bucket/qpipe", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), None),
    ("gs://bucket/qpipe", ("GCP_SERVICE_ACCOUNT_KEY",), "credentialpath"),
    ("azure://container/qpipe", ("AZURE_STORAGE_CONNECTION_STRING",), None),
    ("ssh://ci@store/srv/qpipe", ("QPIPE_SSH_KEY",), "keyfile"),
    ("/srv/qpipe-remote", (), None),
])
def test_each_remote_kind_gets_its_plugin_and_credentials(project, url, secrets, command):
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "remote", "add", "-q", "-d", "shared", url], check=True)
    name, kind = ci.remote_kind()
    setup = ci.remote_setup(name, kind)
    assert setup.secrets == secrets
    assert (setup.plugin is None) == (kind == "local")
    assert (command is None) == (not setup.commands)
    if command:
        assert any(f"dvc remote modify --local shared {command}" in line for line in setup.commands)
    assert init("github").exit_code == 0
    shared = yaml.safe_load(open(github.PATH))["jobs"]["shared"]
    assert sorted(shared["env"]) == sorted(secrets)


def test_a_stage_refuses_to_run_in_a_job_that_only_restores(project, monkeypatch):
    monkeypatch.setenv(ci.RESTORE_ONLY_ENV, "1")
    result = runner.invoke(app, ["gate", "gguf-q8_0"])
    assert result.exit_code == 3 and "would run in a job that only restores stages" in result.output
    assert not (project / "artifacts" / "gates").exists()
    result = runner.invoke(app, ["report"])  # the report job runs report and check itself
    assert "only restores" not in result.output


def test_gather_names_a_recipe_whose_runner_handed_on_no_host(project):
    (project / "ci-hosts").mkdir()
    (project / "ci-hosts" / "gguf-q8_0.json").write_text("{}")
    with pytest.raises(ci.BadInput, match="no host.json from the runner of gguf-q6_k"):
        ci.gather(["gguf-q8_0", "gguf-q6_k"], project / "ci-hosts", log=lambda _: None)


def test_the_stage_plan_follows_dvc_yaml(tmp_path):
    """The shared, per-recipe and restored stages come from dvc.yaml's inputs: a stage that reads
    host.json is no longer shared, and a new per-recipe stage joins every runner and the restore list."""
    from tests.conftest import REPO

    plan = ci.stage_plan(REPO / "dvc.yaml")
    assert plan.shared == ("source", "corpus", "reference", "sensitivity", "task_base")
    assert plan.per_recipe == ("recipe", "build", "engine") and plan.per_run == ("formats", "baseline")
    assert set(plan.restored) == {*plan.shared, *plan.per_recipe, "baseline", ci.GATE_STAGE}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages["stages"]["reference"]["deps"].append("artifacts/host.json")
    stages["stages"]["sign"] = {"foreach": "${recipes}", "do": {"cmd": "qpipe sign ${item}",
                                "deps": ["artifacts/builds/${item}"], "outs": ["artifacts/signed/${item}"]}}
    stages["stages"]["gate"]["do"]["deps"].append("artifacts/signed/${item}")
    changed = ci.stage_plan(write(tmp_path / "dvc.yaml", yaml.safe_dump(stages, sort_keys=False)))
    assert "reference" not in changed.shared and "reference" in changed.per_run
    assert changed.per_recipe == ("recipe", "build", "engine", "sign") and "sign" in changed.restored


def test_every_runner_installs_every_formats_extra_and_the_task_gates():
    extras = ci.base_extras()
    for name in formats.FORMATS:
        assert formats.module(name).INFO.extra in (*extras, None)
    assert "tasks" in extras


@pytest.mark.parametrize("platform", ci.PLATFORMS)
def test_the_labels_a_workflow_was_written_with_are_read_back(platform):
    module = ci.platform_module(platform)
    matrix = [ci.Job("gguf-q8_0", "gguf", None), ci.Job("awq-w4a16", "awq", "vllm")]
    remote = ci.RemoteSetup(None, (), ())
    for cpu, gpu in ((["ubuntu-latest"], ["self-hosted", "gpu"]), (["docker", "x64"], ["h100"])):
        assert module.labels_of(module.document(matrix, cpu, gpu, remote)) == (cpu, gpu)
    assert module.labels_of(module.document(matrix[:1], ["cpu"], ["gpu"], remote))[1] is None  # no GPU job to say


def test_add_recipe_rewrites_each_written_workflow_with_its_own_labels(remote_project):
    assert init("github", "--cpu-labels", "linux,x64", "--gpu-labels", "self-hosted,h100").exit_code == 0
    assert init("gitlab", "--cpu-labels", "docker", "--gpu-labels", "gpu,cuda").exit_code == 0
    result = runner.invoke(app, ["add-recipe", "awq-g32", "--from", "awq-w4a16", "--description", "AWQ, groups of 32"])
    assert result.exit_code == 0, result.output
    assert f"wrote {github.PATH}" in result.output and f"wrote {gitlab.PATH}" in result.output
    for platform in ci.PLATFORMS:
        assert init(platform, "--check").exit_code == 0
    jobs = yaml.safe_load(open(github.PATH))["jobs"]
    assert {"recipe": "awq-g32", "extras": "awq,modelopt,tasks,vllm"} in jobs["gate-gpu"]["strategy"]["matrix"]["include"]
    assert jobs["gate-cpu"]["runs-on"] == ["linux", "x64"] and jobs["gate-gpu"]["runs-on"] == ["self-hosted", "h100"]
    pipeline = yaml.safe_load(open(gitlab.PATH))
    assert ("awq-g32", "gpu") in gitlab.matrix_of(pipeline)
    assert pipeline["gate-cpu"]["tags"] == ["docker"] and pipeline["gate-gpu"]["tags"] == ["gpu", "cuda"]


def test_check_names_a_recipe_dvc_yaml_lacks_and_add_recipe_writes_its_entry(remote_project):
    assert init("github").exit_code == 0
    dvc = (remote_project / "dvc.yaml").read_text()
    entry = dvc[dvc.index("  gguf-q4_0:\n"):dvc.index("  gguf-iq4_xs:\n")]
    write(remote_project / "dvc.yaml", dvc.replace(entry, ""))
    result = init("github", "--check")
    assert result.exit_code == 2
    assert "dvc.yaml `artifacts:` lacks gguf-q4_0" in result.output and "`qpipe add-recipe NAME`" in result.output
    result = runner.invoke(app, ["add-recipe", "gguf-q4_0"])
    assert result.exit_code == 0 and result.output.strip() == "wrote dvc.yaml"
    assert init("github", "--check").exit_code == 0


def test_make_setup_installs_the_extras_every_runner_builds_with():
    import re

    from pipeline.ci import base_extras
    from tests.conftest import REPO

    default = re.search(r"^EXTRAS \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert default.split(",") == ["dev", *base_extras()], \
        "the Makefile's EXTRAS must be dev plus pipeline.ci.base_extras(), which the CI runners install"
