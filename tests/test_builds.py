import json

import pytest

from pipeline import builds, formats, layout
from pipeline.errors import BadInput
from pipeline.formats import load_recipe
from tests.conftest import write


def test_write_build_spec(project):
    builds.write_build_spec("gguf-q8_0")
    written = json.loads(layout.recipe_spec("gguf-q8_0").read_text())
    assert written == {"recipe": "gguf-q8_0", "build": formats.build_spec(load_recipe("gguf-q8_0"))}


def test_build_spec_of_a_calibrating_format_records_the_calibration_device(project):
    write(layout.HOST_FILE, json.dumps({"gpus": [{"name": "NVIDIA H100"}], "torch_cuda": True}))
    spec = builds.write_build_spec("awq-w4a16")
    assert spec["host"] == {"calibration_device": "cuda"}
    write(layout.HOST_FILE, json.dumps({"gpus": []}))
    assert builds.write_build_spec("awq-w4a16")["host"] == {"calibration_device": "cpu"}
    assert "host" not in builds.write_build_spec("gguf-q8_0")


def test_interrupted_build_leaves_no_artifact(project, monkeypatch):
    write(layout.SOURCE_DIR / "source.json", json.dumps({"origin": {}, "files": {}, "parameters": 1000, "largest_tensor": 100}))
    write(layout.SOURCE_DIR / "config.json", json.dumps({"vocab_size": 10}))
    write(layout.CALIBRATION_TEXT, "calibration")
    gguf = formats.module("gguf")

    def dies_midway(recipe, *, out_dir, **_):
        (out_dir / "model.gguf").write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "build", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        builds.run_build("gguf-q8_0", threads=1, log=lambda _: None)
    assert list(layout.BUILDS_DIR.iterdir()) == []


def test_a_recipe_that_cannot_apply_to_the_model_is_recorded_and_stops_nothing(project, tiny_llama, qpipe_env):
    """AWQ group size 128 on a width-64 model: refused before loading weights, build.json says
    why, the stage exits 0 (the other recipes go on), the gate says refused, check fails."""
    import shutil
    import subprocess

    from pipeline.config import Params
    from pipeline.gates import run_gate

    shutil.copytree(tiny_llama, layout.SOURCE_DIR)
    write(layout.SOURCE_DIR / "source.json", json.dumps({"origin": {"kind": "local"}, "files": {}}))
    write(layout.CALIBRATION_TEXT, (tiny_llama.parent / "calibration.txt").read_text())
    write(project / "recipes/awq-g128.yaml", "format: awq\ngroup_size: 128\n")
    record = builds.run_build("awq-g128", threads=1, log=lambda _: None)
    assert record["status"] == "refused"
    assert "group_size 128 does not divide the input width 64" in record["reason"]
    assert record["where"] == "recipes/awq-g128.yaml: group_size" and "32, 64" in record["fix"]
    assert sorted(p.name for p in layout.build_dir("awq-g128").iterdir()) == ["build.json"]
    write(layout.HOST_FILE, json.dumps({"cpu": {"model": "test", "physical_cores": 1}, "gpus": [],
                                        "bandwidth": {"gb_s": 1.0}, "fingerprint": "x"}))
    result = run_gate("awq-g128", params=Params(recipes=["awq-g128"]), log=lambda _: None)
    assert result["verdict"] == "refused" and result["accuracy"]["status"] == "not_run"
    assert "refused for this model: group_size 128" in result["reasons"][0]
    write(project / "params.yaml", "recipes:\n  - awq-g128\n")
    write(layout.REFERENCE_DIR / "reference.json", json.dumps({"ppl": 2.0}))
    made = subprocess.run(["qpipe", "report"], capture_output=True, text=True, env=qpipe_env)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "| awq-g128 | not run |" in (project / "artifacts/report/tradeoff.md").read_text()
    check = subprocess.run(["qpipe", "check"], capture_output=True, text=True, env=qpipe_env)
    assert check.returncode == 1 and "REFUSED awq-g128" in check.stdout + check.stderr


def test_with_a_cpu_torch_on_a_gpu_host_the_recipe_and_the_build_both_say_cpu(project, monkeypatch):
    import torch

    from pipeline.formats.contract import calibration_plan

    write(layout.HOST_FILE, json.dumps({"gpus": [{"name": "NVIDIA H100"}], "torch_cuda": False}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("the host stage's answer is used"))
    recipe = load_recipe("awq-w4a16")
    assert builds.write_build_spec("awq-w4a16")["host"] == {"calibration_device": "cpu"}
    assert calibration_plan(recipe, threads=1) == ("cpu", recipe.calibration_samples)


def test_a_limit_edit_changes_neither_the_build_nor_the_engine_inputs(project):
    import yaml

    builds.write_build_spec("trtllm-int8-sq")
    before = [layout.recipe_spec("trtllm-int8-sq").read_bytes(), layout.engine_spec("trtllm-int8-sq").read_bytes()]
    assert json.loads(before[1])["engine"]["max_batch_size"] == 8
    recipe_file = project / "recipes" / "trtllm-int8-sq.yaml"
    raw = yaml.safe_load(recipe_file.read_text())
    raw["gates"]["max_mean_kld"] = 0.5
    recipe_file.write_text(yaml.safe_dump(raw))
    builds.write_build_spec("trtllm-int8-sq")
    assert [layout.recipe_spec("trtllm-int8-sq").read_bytes(), layout.engine_spec("trtllm-int8-sq").read_bytes()] == before
    raw["engine"] = {"max_batch_size": 4}
    recipe_file.write_text(yaml.safe_dump(raw))
    builds.write_build_spec("trtllm-int8-sq")
    assert layout.recipe_spec("trtllm-int8-sq").read_bytes() == before[0]  # an engine setting does not rebuild
    assert layout.engine_spec("trtllm-int8-sq").read_bytes() != before[1]
    # and no stage before the gate reads the recipe file itself
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for name in ("build", "engine"):
        assert not any(dep.startswith("recipes/") for dep in stages[name]["do"]["deps"]), name


def test_a_searched_gguf_recipe_is_solved_at_the_recipe_stage_and_built_with_exactly_those_types(project, convertible_llama):
    """sensitivity -> recipe@R solves the budget -> build@R writes those types (read back from
    the file), and its size is what the search predicted."""
    import shutil

    from pipeline import sensitivity
    from pipeline.config import SensitivityParams
    from pipeline.formats.gguf import tensor_type_mix
    from pipeline.runtimes.llama_cpp import read_header

    shutil.copytree(convertible_llama, layout.SOURCE_DIR)
    write(layout.SOURCE_DIR / "source.json", json.dumps({"origin": {"kind": "local"}, "files": {}}))
    write(layout.CALIBRATION_TEXT, (convertible_llama.parent / "calibration.txt").read_text())
    sensitivity.run(SensitivityParams(formats=["gguf"], windows=2, window_tokens=64), layout.SOURCE_DIR,
                    layout.CALIBRATION_TEXT, layout.SENSITIVITY_DIR, threads=1, log=lambda _: None)
    write(project / "recipes/gguf-searched.yaml", "format: gguf\ntype: Q8_0\nsearch:\n  bits_per_weight: 7\n")
    spec = builds.write_build_spec("gguf-searched")
    tensor_types = spec["build"]["tensor_types"]
    assert len(tensor_types) == 1 + 2 * 4 and spec["search"]["predicted_bits_per_weight"] <= 7
    # a budget between the smallest and the largest choice: some groups kept wider than others
    assert len(set(tensor_types.values())) > 1
    record = builds.run_build("gguf-searched", threads=1, log=lambda _: None)
    assert record["search"] == spec["search"] and record["resolved_recipe"]["tensor_types"] == tensor_types
    assert record["fallback"]["tensor_types_matched"] == 1 + 2 * 7
    types = {t.name: t.type.upper() for t in read_header(layout.build_dir("gguf-searched") / "model.gguf").tensors}
    assert types["token_embd.weight"] == tensor_types[r"^token_embd\.weight$"]
    assert types["blk.1.attn_k.weight"] == tensor_types[r"^blk\.1\.attn_(q|k|v|qkv)\.weight$"]
    mix = tensor_type_mix(layout.build_dir("gguf-searched") / "model.gguf")
    assert mix["bits_per_weight"] == pytest.approx(spec["search"]["predicted_bits_per_weight"], rel=1e-9)


def test_a_searched_recipe_whose_search_was_not_solved_is_refused_at_build(project):
    write(layout.SOURCE_DIR / "source.json", json.dumps({"origin": {}, "files": {}}))
    write(project / "recipes/gguf-searched.yaml", "format: gguf\ntype: Q8_0\nsearch:\n  bits_per_weight: 7\n")
    with pytest.raises(BadInput, match="has not been solved"):
        builds.run_build("gguf-searched", threads=1, log=lambda _: None)
