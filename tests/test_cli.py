import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline import layout
from pipeline.cli import app
from tests.conftest import write

runner = CliRunner()


def test_help_lists_every_stage_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["host", "source", "corpus", "reference", "recipe", "build", "baseline", "gate", "report",
                    "check", "doctor", "setup-converter", "engine", "task-base"]:
        assert command in result.output


def test_doctor_reports_host_runtimes_and_tools():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for line in ["CPU", "memory", "GPU", "runtimes", "llama_cpp 0.3", "converter", "can build  gguf, awq, modelopt",
                 "can gate   awq accuracy via", "can gate   modelopt accuracy via the checkpoint emulation",
                 "offload    no, this llama.cpp is a CPU build", "tasks      lm-eval 0.4.13: task gates"]:
        assert line in result.output


def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(project):
    write(project / "recipes" / "broken.yaml", "format: gguf\ntype: Q4_K_M\nbits: 4\n")
    result = runner.invoke(app, ["build", "broken"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'bits'" in lines[0] and "broken.yaml" in lines[0]
    assert not (project / "artifacts" / "builds").exists()


def test_gate_without_build_exits_2(project):
    result = runner.invoke(app, ["gate", "gguf-q8_0"])
    assert result.exit_code == 2
    assert "qpipe build gguf-q8_0" in result.output


def test_doctor_says_which_stages_a_checkpoint_fits_before_anything_loads(project, tiny_llama, monkeypatch):
    from pipeline import memory, reference

    write(project / "params.yaml", (project / "params.yaml").read_text().replace(
        "  - gguf-q6_k\n", "").replace("  - trtllm-int8-sq ", "  # "))
    result = runner.invoke(app, ["doctor", "--checkpoint", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"checkpoint {tiny_llama}: 0.00B parameters, vocabulary 130")
    assert lines[1].startswith("reference (float32)") and lines[1].endswith(": fits")
    stages = [line.split()[:2] for line in lines[2:]]
    assert ["build", "gguf-q8_0"] in stages and ["gate", "trtllm-fp8"] in stages
    assert ["build", "gguf-q6_k"] not in stages and ["gate", "trtllm-int8-sq"] not in stages  # params' recipes only
    assert not any(line.startswith("sensitivity") for line in lines)  # no format searched
    write(project / "params.yaml", (project / "params.yaml").read_text().replace(
        "sensitivity:\n  formats: []", "sensitivity:\n  formats: [gguf]"))
    result = runner.invoke(app, ["doctor", "--checkpoint", str(tiny_llama)])
    assert result.output.splitlines()[2].startswith("sensitivity (float32)"), result.output
    # the default 40 x 512 windows of its 130-token vocabulary, 2 bytes a log-prob
    assert lines[-1].startswith(f"reference log-probs          needs     0.0 GB of disk") and lines[-1].endswith(": fits")
    monkeypatch.setattr(reference, "free_disk_bytes", lambda out_dir: 40 * 511 * 130 * 2 - 1)
    result = runner.invoke(app, ["doctor", "--checkpoint", str(tiny_llama)])
    assert result.exit_code == 3 and result.output.splitlines()[-1].endswith("does not fit")
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 600 * 2**20)  # 0.6 GB: only the smallest fit
    result = runner.invoke(app, ["doctor", "--checkpoint", str(tiny_llama)])
    assert result.exit_code == 3
    assert any(line.endswith("0.6 GB free: does not fit") for line in result.output.splitlines())
    result = runner.invoke(app, ["doctor", "--checkpoint", str(project / "nothing")])
    assert result.exit_code == 2 and "no config.json in the checkpoint" in result.output


def test_baseline_without_host_exits_2(project):
    result = runner.invoke(app, ["baseline"])
    assert result.exit_code == 2
    assert "qpipe host" in result.output


def test_build_without_source_exits_2(project):
    result = runner.invoke(app, ["build", "gguf-q8_0"])
    assert result.exit_code == 2
    assert "qpipe source" in result.output


def test_reference_without_source_exits_2(project):
    write(project / "params.yaml", "reference:\n  windows: 1000\n  window_tokens: 512\nrecipes: []\n")
    write(project / "artifacts" / "corpus" / "evaluation.txt", "just a few words")
    result = runner.invoke(app, ["reference"])
    # with no source checkpoint the stage refuses before tokenising; either way it is bad input
    assert result.exit_code == 2


def gate_result(recipe, limits, accuracy_kld=0.04, speed_ran=True):
    """A gate result as the gate stage writes its checks, verdict and what it was judged against
    (gates.verdict, gates.stale), its limits written as recipes/RECIPE.yaml; params.yaml first."""
    import yaml

    from pipeline.config import load_params
    from pipeline.gates import stale, verdict

    gates = limits.model_dump(mode="json", exclude_none=True)
    write(Path("recipes") / f"{recipe}.yaml", yaml.safe_dump({"format": "gguf", "type": "Q8_0", "gates": gates}))
    sections = {"accuracy": {"status": "ok", "mean_kld": accuracy_kld, "ppl_ratio": 1.05},
                "speed": {"status": "ok", "decode_tok_s": 90.0} if speed_ran else {"status": "not_run",
                                                                                   "reason": "no GPU"}}
    checks = verdict.evaluate(limits, sections)
    outcome, reasons = verdict.overall(limits.require, sections, checks)
    return {"recipe": recipe, "checks": checks, "require": limits.require, "verdict": outcome, "reasons": reasons,
            "judged_against": stale.current(recipe, load_params()), **sections}


def write_gate_results(*results):
    for result in results:
        write(layout.gate_file(result["recipe"]), json.dumps(result))


def test_check_fails_naming_each_recipe_that_did_not_pass(project):
    from pipeline.config import GateLimits

    write(project / "params.yaml", "recipes: [a, b, c]\n")
    write_gate_results(gate_result("a", GateLimits(max_mean_kld=0.1)), gate_result("b", GateLimits(max_mean_kld=0.01)),
                       gate_result("c", GateLimits(max_mean_kld=0.1), speed_ran=False))
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 1
    assert "pass  a" in result.output
    assert "FAIL  b: max_mean_kld: mean_kld 0.04 > limit 0.01" in result.output
    assert "INCOMPLETE c: required gate speed did not run: no GPU" in result.output
    assert "2 of 3 artifacts did not pass: b, c" in result.output


def test_check_passes_when_all_pass(project):
    from pipeline.config import GateLimits

    write(project / "params.yaml", "recipes: [a]\n")
    write_gate_results(gate_result("a", GateLimits(max_mean_kld=0.1)))
    assert runner.invoke(app, ["check"]).exit_code == 0


def test_check_judges_relative_limits_and_one_not_judged_fails_unless_allowed(project):
    from pipeline.config import GateLimits

    write(project / "params.yaml", "recipes: [q8, q4]\n")
    q4_limits = GateLimits(max_mean_kld={"relative_to": "q8", "factor": 2})
    write_gate_results(gate_result("q8", GateLimits(max_mean_kld=0.001), accuracy_kld=0.004),
                       gate_result("q4", q4_limits, accuracy_kld=0.246))
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 1
    assert "NOT JUDGED q4: max_mean_kld: relative to q8, whose verdict is fail" in result.output
    assert "2 of 2 artifacts did not pass: q8, q4" in result.output
    allowed = runner.invoke(app, ["check", "--allow-not-judged"])
    assert allowed.exit_code == 1 and "1 of 2 artifacts did not pass: q8" in allowed.output  # q8 still fails
    write_gate_results(gate_result("q8", GateLimits(max_mean_kld=0.01), accuracy_kld=0.004))
    failed = runner.invoke(app, ["check"])
    assert failed.exit_code == 1 and "FAIL  q4: max_mean_kld: mean_kld 0.246 > limit 0.008 = 2 x q8's 0.004" \
        in failed.output
    write_gate_results(gate_result("q4", q4_limits, accuracy_kld=0.006))
    assert runner.invoke(app, ["check"]).exit_code == 0
    write(project / "params.yaml", "recipes: [q4]\n")  # its anchor left out of the run
    alone = runner.invoke(app, ["check"])
    assert alone.exit_code == 1 and "NOT JUDGED q4: max_mean_kld: relative to q8, which has no gate result" in alone.output
    assert runner.invoke(app, ["check", "--allow-not-judged"]).exit_code == 0


def test_check_names_a_result_judged_against_other_limits_or_params_as_stale(project):
    from pipeline.config import GateLimits

    write(project / "params.yaml", "recipes: [a, b]\n")
    write_gate_results(gate_result("a", GateLimits(max_mean_kld=0.1)), gate_result("b", GateLimits(max_mean_kld=0.1)))
    assert runner.invoke(app, ["check"]).exit_code == 0
    write(project / "params.yaml", "recipes: [a, b]\nlimits:\n  a: {max_mean_kld: 0.01}\n")  # no dvc repro after
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 1
    assert "STALE a (verdict pass under what it was judged against): it was judged against other limits " \
           "(recipes/a.yaml gates, params.yaml limits.a) than now" in result.output
    assert "pass  b" in result.output
    assert "1 of 2 artifacts did not pass (1 stale): a" in result.output and "fix: run `dvc repro`" in result.output
    write(project / "params.yaml", "recipes: [a, b]\nspeed: {repeats: 5}\n")
    assert "judged against other params.yaml `speed` than now" in runner.invoke(app, ["check"]).output
    write(project / "params.yaml", "recipes: [a, b]\n")
    old = json.loads(layout.gate_file("b").read_text())
    del old["judged_against"]  # a result from before results recorded it
    write(layout.gate_file("b"), json.dumps(old))
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 1 and "STALE b" in result.output and "written by an older qpipe" in result.output


def test_check_without_gate_results_names_the_missing_one(project):
    write(project / "params.yaml", "recipes: [a]\n")
    result = runner.invoke(app, ["check"])
    assert result.exit_code == 2 and "artifacts/gates/a.json" in result.output


def test_an_unforeseen_tool_failure_is_one_line_with_its_message_and_exit_4(project, monkeypatch):
    from pipeline import corpus

    def tool_raises(*_, **__):
        raise RuntimeError("llama_model_load: tensor 'blk.0.attn_q.weight' data is not within the file bounds\nmore")

    monkeypatch.setattr(corpus, "run", tool_raises)
    monkeypatch.delenv("QPIPE_DEBUG", raising=False)
    result = runner.invoke(app, ["corpus"])
    assert result.exit_code == 4
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "RuntimeError: llama_model_load: tensor 'blk.0.attn_q.weight'" in lines[0]
    assert "qpipe corpus" in lines[0] and "QPIPE_DEBUG=1" in lines[0]
    monkeypatch.setenv("QPIPE_DEBUG", "1")
    assert isinstance(runner.invoke(app, ["corpus"]).exception, RuntimeError)


def test_out_of_disk_space_is_said_with_the_path_and_exit_3(project, monkeypatch):
    import errno

    from pipeline import corpus

    def disk_full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device", "artifacts/corpus/calibration.txt")

    monkeypatch.setattr(corpus, "run", disk_full)
    monkeypatch.delenv("QPIPE_DEBUG", raising=False)
    result = runner.invoke(app, ["corpus"])
    assert result.exit_code == 3
    assert "no space left on the device while writing artifacts/corpus/calibration.txt" in result.output
    assert "df -h artifacts" in result.output


def test_a_truncated_artifact_is_named_by_the_gate_with_exit_2(project):
    from pipeline import layout
    from pipeline.files import sha256_artifact

    build_dir = layout.build_dir("gguf-q8_0")
    write(build_dir / "model.gguf", "GGUF" + "x" * 60)
    record = {"recipe": "gguf-q8_0", "format": "gguf",
              "artifact": {"file": "model.gguf", "bytes": 64, "sha256": sha256_artifact(build_dir / "model.gguf")}}
    write(build_dir / "build.json", json.dumps(record))
    write(layout.HOST_FILE, json.dumps({"cpu": {"physical_cores": 2, "model": "x"}, "bandwidth": {"gb_s": 10}}))
    (build_dir / "model.gguf").write_text("GGUF" + "x" * 10)  # cut short after the build
    result = runner.invoke(app, ["gate", "gguf-q8_0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is 14 bytes and build.json records 64" in result.output and "dvc repro build@gguf-q8_0" in result.output
