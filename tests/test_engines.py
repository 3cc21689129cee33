import json
import subprocess

import pytest

from pipeline import engines, layout
from pipeline.errors import HostLacks
from pipeline.runtimes import tensorrt_llm
from tests.conftest import write


def write_host(gpus):
    write(layout.HOST_FILE, json.dumps({"gpus": gpus}))


def test_other_formats_get_a_not_applicable_record(project):
    record = engines.run_engine("gguf-q8_0", log=lambda _: None)
    assert record["status"] == "not_applicable" and "format gguf" in record["reason"]
    assert engines.read_record("gguf-q8_0") == record


def test_without_tensorrt_llm_the_engine_is_not_run_and_says_why(project, monkeypatch):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: None)
    write_host([{"name": "NVIDIA H100"}])
    record = engines.run_engine("trtllm-int8-sq", log=lambda _: None)
    assert record == {"recipe": "trtllm-int8-sq", "format": "modelopt", "status": "not_run",
                      "reason": tensorrt_llm.engine_unavailable_reason()}
    assert sorted(p.name for p in layout.engine_dir("trtllm-int8-sq").iterdir()) == ["engine.json"]


def test_a_unified_checkpoint_recipe_needs_no_engine_and_cannot_require_one(project, qpipe_env, monkeypatch):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.1")
    write_host([{"name": "NVIDIA H100"}])
    reason = engines.run_engine("trtllm-fp8", log=lambda _: None)["reason"]
    assert reason.startswith("no engine: FP8_DEFAULT_CFG ships the unified checkpoint (hf_checkpoint/)")
    assert "TensorRT-LLM PyTorch backend" in reason
    recipe = project / "recipes/trtllm-fp8.yaml"
    recipe.write_text(recipe.read_text() + "engine:\n  build: required\n")
    result = subprocess.run(["qpipe", "engine", "trtllm-fp8"], capture_output=True, text=True, env=qpipe_env)
    assert result.returncode == 2 and "an engine was required, but no engine" in result.stderr


def test_without_a_gpu_the_engine_is_not_run(project, monkeypatch):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.0")
    write_host([])
    assert "this host has none" in engines.run_engine("trtllm-int8-sq", log=lambda _: None)["reason"]


def test_a_required_engine_on_a_host_without_one_exits_3_and_writes_nothing(project, qpipe_env):
    recipe = project / "recipes/trtllm-int8-sq.yaml"
    recipe.write_text(recipe.read_text().replace("build: auto", "build: required"))
    write_host([])
    result = subprocess.run(["qpipe", "engine", "trtllm-int8-sq"], capture_output=True, text=True, env=qpipe_env)
    assert result.returncode == HostLacks.exit_code == 3
    assert "an engine was required, but" in result.stderr and "trtllm-int8-sq.yaml: engine.build" in result.stderr
    assert "engine.build: auto" in result.stderr
    assert not layout.engine_dir("trtllm-int8-sq").exists()


def test_never_skips_the_engine(project):
    recipe = project / "recipes/trtllm-int8-wo.yaml"
    recipe.write_text(recipe.read_text().replace("build: auto", "build: never"))
    assert engines.run_engine("trtllm-int8-wo", log=lambda _: None)["reason"] == "the recipe says engine.build: never"


@pytest.mark.parametrize("value", ["sometimes", "yes"])
def test_unknown_engine_build_value_is_bad_input(project, value):
    from pipeline.formats import load_recipe
    from pipeline.errors import BadInput

    recipe = project / "recipes/trtllm-int8-sq.yaml"
    recipe.write_text(recipe.read_text().replace("build: auto", f"build: {value}"))
    with pytest.raises(BadInput) as info:
        load_recipe("trtllm-int8-sq")
    assert info.value.where.endswith("engine.build")
