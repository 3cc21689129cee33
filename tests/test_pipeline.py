"""The whole pipeline through real DVC on the embedded model, with small params."""

import json
import math
import subprocess

import pytest

from tests import lm_eval_tasks
from tests.conftest import write

pytestmark = pytest.mark.integration

SMALL_PARAMS = """\
model:
  source: embedded:smollm2-135m
corpus:
  source: embedded:pydoc
reference:
  windows: 3
  window_tokens: 128
  position_buckets: [0, 64]
  dtype: float32
speed:
  prompt_tokens: 64
  gen_tokens: 16
  repeats: 1
  warmup: 1
  threads: 0
  concurrency: 8
  n_gpu_layers: -1
  depths: [96]
recipes:
  - gguf-q8_0
  - gguf-q4_0
  - awq-w4a16
  - trtllm-fp8
  - trtllm-int8-sq
limits: {}
sensitivity: {formats: []}
""" + lm_eval_tasks.PARAMS


LOOSE_GATES = """gates:
  min_decode_speedup: 0.3
  max_mean_kld: 0.5
  min_top1_agreement: 0.5
  max_tokenizer_mismatch: 0.01
  require: [accuracy, speed]
"""


# AWQ with a tiny calibration (2 x 64 tokens, a coarse grid) to keep CI fast; speed is not_run
# on a host without vLLM and a GPU, so accuracy alone is required.
TINY_AWQ = """calibration_samples: 2
calibration_seq_len: 64
n_grid: 4
gates:
  max_ppl_ratio: 2.0
  max_tokenizer_mismatch: 0.01
  require: [accuracy]
"""


# ModelOpt with a tiny calibration (2 x 128 tokens) and a 2-window cross-check (the recipe's
# own limits); no engine here.
TINY_MODELOPT = """calibration_samples: 2
calibration_seq_len: 128
crosscheck_windows: 2
gates:
  max_ppl_ratio: 2.0
  max_tokenizer_mismatch: 0.01
  require: [accuracy]
"""


# no dvc call here takes a quarter of this; one that hangs (a queued experiment's worker once did)
# fails the test instead of stalling CI
RUN_TIMEOUT_S = 1800


def run(args, env, check=True):
    try:
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{args} did not finish in {RUN_TIMEOUT_S} s\n{(expired.stdout or b'')[-3000:]!r}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """One temporary repo shared by the tests below: repro is the expensive part."""
    import os
    import shutil
    import sys
    from pathlib import Path

    from tests.conftest import REPO, tracked_files

    root = tmp_path_factory.mktemp("pipeline") / "repo"
    for name in tracked_files():
        if not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    write(root / "params.yaml", SMALL_PARAMS)
    for name in ("gguf-q8_0", "gguf-q4_0"):  # 3 x 128 tokens are noisier than the default 40 x 512
        recipe = root / "recipes" / f"{name}.yaml"
        recipe.write_text(recipe.read_text().split("gates:")[0] + LOOSE_GATES)
    q4_0 = root / "recipes" / "gguf-q4_0.yaml"  # served with a q8_0 KV cache
    q4_0.write_text("kv_cache: q8_0\n" + q4_0.read_text())
    awq = root / "recipes" / "awq-w4a16.yaml"
    knobs = [line for line in awq.read_text().split("gates:")[0].splitlines()
             if not line.startswith(("calibration_samples", "calibration_seq_len"))]
    awq.write_text("\n".join(knobs) + "\n" + TINY_AWQ)
    for name in ("trtllm-fp8", "trtllm-int8-sq"):
        recipe = root / "recipes" / f"{name}.yaml"
        knobs = [line for line in recipe.read_text().split("gates:")[0].splitlines()
                 if not line.startswith(("calibration_samples", "calibration_seq_len"))]
        recipe.write_text("\n".join(knobs) + "\n" + TINY_MODELOPT)
    lm_eval_tasks.write_tasks(root)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    git = ["git", "-C", str(root), "-c", "user.name=qpipe-test", "-c", "user.email=test@example.invalid"]
    run(git + ["init", "-q"], env)
    run(git + ["add", "-A"], env)
    run(git + ["commit", "-qm", "test project"], env)
    old = os.getcwd()
    os.chdir(root)
    first = run(["dvc", "repro"], env)
    yield root, env, first, git
    os.chdir(old)


def gate(root, name):
    return json.loads((root / "artifacts" / "gates" / f"{name}.json").read_text())


def test_gate_files_hold_finite_figures_in_range(repo):
    root, _, _, _ = repo
    q8, q4 = gate(root, "gguf-q8_0"), gate(root, "gguf-q4_0")
    for result in (q8, q4):
        accuracy, speed = result["accuracy"], result["speed"]
        assert accuracy["status"] == speed["status"] == "ok"
        assert accuracy["runtime"].startswith("llama.cpp")
        assert accuracy["eval_tokens"] == 3 * 127
        assert 1.0 < accuracy["ppl"] < 1000 and math.isfinite(accuracy["ppl"])
        assert 0.9 < accuracy["ppl_ratio"] < 2.0
        assert 0 <= accuracy["mean_kld"] < 1.0
        assert 0.5 < accuracy["top1_agreement"] <= 1.0
        assert accuracy["tokenizer_mismatch"] < 0.01
        for key in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms", "roofline_tok_s"]:
            assert speed[key] > 0 and math.isfinite(speed[key])
        assert 0 < speed["roofline_fraction"] < 1.5
        assert speed["decode_speedup"] > 0.3 and math.isfinite(speed["decode_speedup"])
        assert {c["name"]: c["verdict"] for c in result["checks"]}["min_decode_speedup"] == "pass"
        assert result["verdict"] == "pass"
        assert result["artifact"]["bytes"] > 50e6
    # more bits, closer to the reference and a bigger file
    assert q8["accuracy"]["mean_kld"] < q4["accuracy"]["mean_kld"]
    assert q8["artifact"]["bytes"] > q4["artifact"]["bytes"]
    assert q8["artifact"]["bits_per_weight"] > q4["artifact"]["bits_per_weight"]


def test_baseline_is_the_unquantized_gguf_on_the_same_runtime(repo):
    root, _, _, _ = repo
    baseline = json.loads((root / "artifacts" / "baselines" / "gguf.json").read_text())
    assert baseline["status"] == "ok" and baseline["runtime"].startswith("llama.cpp")
    assert baseline["artifact"].startswith("f16 GGUF")
    assert baseline["bytes"] > gate(root, "gguf-q8_0")["artifact"]["bytes"]
    assert baseline["decode_tok_s"] > 0 and baseline["prompt_tokens"] == 64
    q4 = gate(root, "gguf-q4_0")["speed"]
    assert q4["decode_speedup"] == pytest.approx(q4["decode_tok_s"] / baseline["decode_tok_s"])


def test_a_quantized_kv_cache_is_served_measured_at_depth_and_counted_in_the_roofline(repo):
    root, _, _, _ = repo
    q8, q4 = gate(root, "gguf-q8_0"), gate(root, "gguf-q4_0")
    build = json.loads((root / "artifacts" / "builds" / "gguf-q4_0" / "build.json").read_text())
    assert build["kv_cache"] == {"k": "q8_0", "v": "q8_0"}
    assert q4["accuracy"]["runtime"].endswith("KV cache K q8_0 V q8_0") and q4["speed"]["runtime"].endswith("V q8_0")
    assert "-ctk q8_0 -ctv q8_0" in q4["speed"]["timing_source"]
    assert "-ctk f16 -ctv f16" in q8["speed"]["timing_source"]
    baseline = json.loads((root / "artifacts" / "baselines" / "gguf.json").read_text())
    # 30 layers x 3 KV heads x 64 values of K and of V, at the mean decode context 96 + 16 / 2
    per_value = {"q8_0": 34 / 32, "f16": 2}
    for result, cache in ((q8, "f16"), (q4, "q8_0")):
        at_depth = result["speed"]["by_depth"]["depths"]["96"]
        assert at_depth["kv_cache_bytes"] == pytest.approx(30 * 3 * 64 * 2 * per_value[cache] * 104)
        assert at_depth["decode_tok_s"] > 0 and 0 < at_depth["roofline_fraction"] < 1.5
        assert at_depth["decode_speedup"] == pytest.approx(
            at_depth["decode_tok_s"] / baseline["decode_at_depth"]["96"]["decode_tok_s"])


def test_build_json_records_tools_timings_and_type_mix(repo):
    root, _, _, _ = repo
    build = json.loads((root / "artifacts" / "builds" / "gguf-q4_0" / "build.json").read_text())
    assert build["tools"]["llama_cpp_python"] and build["tools"]["gguf"]
    run_record = json.loads((root / "artifacts" / "runs" / "build@gguf-q4_0.json").read_text())
    assert run_record["timings_s"]["quantize_s"] > 0 and run_record["timings_s"]["convert_s"] > 0
    assert not {"timings_s", "wall_s", "created_at", "memory", "threads"} & set(build)
    assert build["tensor_types"]["tensors"]["Q4_0"] > 0
    assert build["fallback"]["fallback_tensors"] > 0  # width 576 is not a multiple of 256
    assert len(build["source"]["sha256"]) == 64


def test_awq_artifact_is_scored_as_written(repo):
    root, _, _, _ = repo
    build_dir = root / "artifacts" / "builds" / "awq-w4a16"
    config = json.loads((build_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    build = json.loads((build_dir / "build.json").read_text())
    assert build["calibration"]["tokens"] == 2 * 64 and build["device"] == "cpu"
    assert build["reload_check"]["max_abs_logit_diff"] <= build["reload_check"]["limit"]
    assert build["awq"]["skipped_mappings"], "3 KV heads: llm-compressor skips v_proj -> o_proj"
    assert build["tools"]["llmcompressor"] and build["tools"]["compressed-tensors"]
    result = gate(root, "awq-w4a16")
    accuracy, speed = result["accuracy"], result["speed"]
    assert accuracy["status"] == "ok" and accuracy["runtime"].startswith("transformers ")
    assert math.isfinite(accuracy["ppl"]) and accuracy["ppl"] > accuracy["reference_ppl"]
    assert accuracy["tokenizer_mismatch"] == 0.0
    assert speed["status"] == "not_run" and "vLLM" in speed["reason"]
    assert result["verdict"] == "pass"
    baseline = json.loads((root / "artifacts" / "baselines" / "awq.json").read_text())
    assert baseline["status"] == "not_run"
    # int4 codes with bf16 scales and zero points per 64, plus the bf16 (tied) embedding
    assert 4.5 < result["artifact"]["bits_per_weight"] < gate(root, "gguf-q8_0")["artifact"]["bits_per_weight"]


def test_modelopt_checkpoints_are_scored_as_written(repo):
    from safetensors import safe_open

    from pipeline.runtimes import tensorrt_llm

    root, _, _, _ = repo
    # FP8 ships the unified checkpoint (TensorRT-LLM's PyTorch backend), INT8 SmoothQuant the legacy
    # one (its engine backend)
    for name, quant_algo, layout in (("trtllm-fp8", "FP8", "hf"), ("trtllm-int8-sq", "W8A8_SQ_PER_CHANNEL", "trtllm")):
        build_dir = root / "artifacts" / "builds" / name
        build = json.loads((build_dir / "build.json").read_text())
        assert build["calibration"]["tokens"] == 2 * 128 and build["tools"]["nvidia-modelopt"]
        assert set(build["exports"]) == {layout}
        if layout == "trtllm":
            config = json.loads((build_dir / "trtllm_checkpoint" / "config.json").read_text())
            assert config["quantization"]["quant_algo"] == quant_algo
            assert config["rotary_base"] == 100000.0  # SmolLM2's RoPE base, not TensorRT-LLM's default 10000
            with safe_open(build_dir / "trtllm_checkpoint" / "rank0.safetensors", "pt") as handle:
                weight = handle.get_slice("transformer.layers.0.attention.qkv.weight")
                assert weight.get_shape() == [(9 + 3 + 3) * 64, 576] and weight.get_dtype() == "I8"
        else:
            quant = json.loads((build_dir / "hf_checkpoint" / "hf_quant_config.json").read_text())["quantization"]
            assert quant["quant_algo"] == quant_algo
            with safe_open(build_dir / "hf_checkpoint" / "model.safetensors", "pt") as handle:
                weight = handle.get_slice("model.layers.0.self_attn.q_proj.weight")
                assert weight.get_shape() == [9 * 64, 576] and weight.get_dtype() == "F8_E4M3"
        check = build["crosscheck"]
        for export in check["exports"].values():
            assert export["gap"] <= check["limit"] == 0.05 and export["largest_layer_error"] <= check["layer_error_limit"]
            if layout == "hf":  # the fake-quant model computed as TensorRT-LLM does: the files to the bit
                assert (export["gap"], export["largest_layer_error"]) == (0.0, 0.0)
        engine = json.loads((root / "artifacts" / "engines" / name / "engine.json").read_text())
        assert engine["status"] == "not_run"
        assert ("ships the unified checkpoint" if layout == "hf" else "TensorRT-LLM") in engine["reason"]
        result = gate(root, name)
        assert result["accuracy"]["status"] == "ok"
        assert result["accuracy"]["runtime"].startswith(f"emulated:{layout} checkpoint {quant_algo}")
        speed_reason = engine["reason"] if layout == "trtllm" else tensorrt_llm.unavailable_reason()
        assert result["speed"] == {"status": "not_run", "reason": speed_reason}
        assert result["verdict"] == "pass"
    fp8, sq = gate(root, "trtllm-fp8")["accuracy"], gate(root, "trtllm-int8-sq")["accuracy"]
    assert fp8["eval_tokens"] == sq["eval_tokens"] == 3 * 127
    assert fp8["mean_kld"] < sq["mean_kld"]  # per-tensor int8 activations cost this model more than fp8
    engine = json.loads((root / "artifacts/engines/gguf-q8_0/engine.json").read_text())
    assert engine["status"] == "not_applicable"


def test_every_artifact_is_scored_on_the_tasks_through_its_own_runtime_against_the_base(repo):
    from pipeline.config import GateLimits
    from pipeline.gates import verdict

    root, _, _, _ = repo
    base = json.loads((root / "artifacts" / "tasks" / "base.json").read_text())
    assert [t["name"] for t in base["tasks"]] == ["qpipe_mc", "qpipe_gen"]
    assert base["runtime"].startswith("transformers") and "unquantized" in base["runtime"]
    base_scores = {t["name"]: t["score"] for t in base["tasks"]}
    assert all(score > 0 for score in base_scores.values())
    for name in ("gguf-q8_0", "gguf-q4_0", "awq-w4a16", "trtllm-fp8", "trtllm-int8-sq"):
        result = gate(root, name)
        section = result["tasks"]
        assert section["status"] == "ok", section
        assert section["runtime"] == result["accuracy"]["runtime"]  # llama.cpp, transformers, the emulation
        assert section["device"] == result["accuracy"]["device"] == "cpu"
        for task in section["tasks"]:
            assert task["base_score"] == base_scores[task["name"]]
            assert task["recovery"] == pytest.approx(task["score"] / task["base_score"])
            assert task["samples"] == {"qpipe_mc": 10, "qpipe_gen": 12}[task["name"]]
        assert section["min_recovery"] == min(section["recovery"].values())
        judged = [(section["min_recovery"] + 0.01, "fail")]
        if section["min_recovery"] > 0:  # a limit is above 0; 2 x 128 calibration tokens may lose every answer
            judged.append((section["min_recovery"], "pass"))
        for limit, expected in judged:
            (check,) = verdict.evaluate(GateLimits(min_task_recovery=limit, require=["tasks"]), {"tasks": section})
            assert check["verdict"] == expected
    report = (root / "artifacts" / "report" / "tradeoff.md").read_text()
    assert "| task recovery |" in report.splitlines()[4] and "## Tasks (lm-evaluation-harness)" in report


def test_the_emulation_sees_a_wrong_scale_in_the_file(repo, tmp_path):
    """The failure the cross-check exists for: ModelOpt's second export from a reused model
    wrote up_proj codes under the fused gate/up scale. One such scale per layer, x1.6, moves the
    ppl."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.formats import modelopt

    root, _, _, _ = repo
    good = root / "artifacts/builds/trtllm-fp8/hf_checkpoint"
    broken = tmp_path / "hf_checkpoint"
    shutil.copytree(good, broken)
    tensors = load_file(broken / "model.safetensors")
    for layer in range(30):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight_scale"] *= 1.6
    save_file(tensors, broken / "model.safetensors")
    from pipeline import reference

    window = [reference.load(root / "artifacts/reference").tokens[0].tolist()]
    right, wrong = (modelopt.emulated_ppl(path, window, threads=2) for path in (good, broken))
    assert wrong / right - 1 > 0.05


def test_report_table_plot_and_dvc_views(repo):
    root, env, _, _ = repo
    report = json.loads((root / "artifacts" / "report" / "tradeoff.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["gguf-q8_0", "gguf-q4_0", "awq-w4a16", "trtllm-fp8",
                                                     "trtllm-int8-sq"]
    assert any(r["pareto"] for r in report["rows"])
    assert report["rows"][2]["pareto"] is None and report["rows"][2]["decode_tok_s"] is None
    assert (root / "artifacts" / "report" / "pareto.png").stat().st_size > 10_000
    assert "| gguf-q4_0 |" in (root / "artifacts" / "report" / "tradeoff.md").read_text()
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], env).stdout)
    files = next(iter(metrics.values()))["data"]
    assert files["artifacts/gates/gguf-q4_0.json"]["data"]["accuracy"]["mean_kld"] > 0
    plots = run(["dvc", "plots", "show", "--json"], env)
    assert "decode_tok_s" in plots.stdout


def test_second_repro_runs_nothing_but_the_host_probe(repo):
    root, env, first, _ = repo
    assert "Running stage 'gate@gguf-q4_0'" in first.stdout
    second = run(["dvc", "repro"], env)
    ran = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'host':"], second.stdout
    assert "didn't change, skipping" in second.stdout


def test_a_byte_identical_rebuild_leaves_every_gate_cached(repo):
    """A forced rebuild writes new timings into its run record only: build.json and the
    artifact hash as before, so DVC sees nothing downstream to re-run."""
    root, env, _, _ = repo
    before = json.loads((root / "artifacts" / "runs" / "build@gguf-q4_0.json").read_text())
    rebuilt = run(["dvc", "repro", "--force", "--single-item", "build@gguf-q4_0"], env)
    assert "Running stage 'build@gguf-q4_0'" in rebuilt.stdout
    after = json.loads((root / "artifacts" / "runs" / "build@gguf-q4_0.json").read_text())
    assert after["created_at"] >= before["created_at"] and after != before
    status = json.loads(run(["dvc", "status", "--json", "gate@gguf-q4_0", "engine@gguf-q4_0"], env).stdout)
    assert status == {}, status
    dry = run(["dvc", "repro", "--dry", "gate@gguf-q4_0"], env)
    assert "Running stage 'gate@gguf-q4_0'" not in dry.stdout and "Running stage 'build@" not in dry.stdout


def test_an_impossible_limit_makes_check_fail_with_exit_1(repo):
    root, env, _, _ = repo
    recipe = root / "recipes" / "gguf-q4_0.yaml"
    original = recipe.read_text()
    try:
        recipe.write_text(original.replace("max_mean_kld: 0.5", "max_mean_kld: 0.0"))
        failed = run(["dvc", "repro"], env, check=False)
        assert failed.returncode != 0
        ran = [line for line in failed.stdout.splitlines() if line.startswith("Running stage")]
        assert "Running stage 'gate@gguf-q4_0':" in ran
        assert not any("build@" in line for line in ran), "a limit change must not rebuild"
        assert "gguf-q4_0" in failed.stderr and "max_mean_kld" in failed.stderr
        check = run(["qpipe", "check"], env, check=False)
        assert check.returncode == 1
        assert "FAIL  gguf-q4_0" in check.stderr
        assert gate(root, "gguf-q4_0")["verdict"] == "fail"
        assert gate(root, "gguf-q8_0")["verdict"] == "pass"
    finally:
        recipe.write_text(original)


def test_a_relative_limit_in_params_is_judged_against_the_other_recipe(repo):
    root, env, _, _ = repo
    params = root / "params.yaml"
    original = params.read_text()
    try:  # Q4_0 within 1x Q8_0's KLD: impossible, and the failure says where the limit is set
        params.write_text(original.replace(
            "limits: {}", "limits:\n  gguf-q4_0:\n    max_mean_kld: {relative_to: gguf-q8_0, factor: 1}"))
        failed = run(["dvc", "repro"], env, check=False)
        ran = [line for line in failed.stdout.splitlines() if line.startswith("Running stage")]
        assert "Running stage 'gate@gguf-q4_0':" in ran
        assert not any("build@" in line for line in ran), "a limit change must not rebuild"
        assert gate(root, "gguf-q4_0")["verdict"] == "pending"  # the gate alone cannot judge it
        check = run(["qpipe", "check"], env, check=False)
        assert check.returncode == 1
        q8_kld = gate(root, "gguf-q8_0")["accuracy"]["mean_kld"]
        assert f"1 x gguf-q8_0's {q8_kld:.4g}" in check.stderr
        assert "set in params.yaml: limits.gguf-q4_0.max_mean_kld" in check.stderr
    finally:
        params.write_text(original)


def test_publish_what_passed_to_a_directory_registry_and_again(repo, tmp_path):
    root, env, _, _ = repo
    run(["dvc", "repro"], env)  # the gate the previous test failed passes again with its limit restored
    registry = tmp_path / "registry"
    first = run(["qpipe", "publish", "--to", f"dir://{registry}"], env)
    lines = [line.split("\t") for line in first.stdout.splitlines()]
    assert [(line[0], line[2]) for line in lines] == [("gguf-q8_0", "pushed"), ("gguf-q4_0", "pushed"),
                                                     ("awq-w4a16", "pushed"), ("trtllm-fp8", "pushed"),
                                                     ("trtllm-int8-sq", "pushed")]
    awq = registry / "SmolLM2-135M-Instruct" / "awq-w4a16" / lines[2][1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "SHA256SUMS",
            "provenance.json"} <= {p.name for p in awq.iterdir()}
    provenance = json.loads((awq / "provenance.json").read_text())
    assert provenance["dvc_lock"]["stage"] == "build@awq-w4a16" and len(provenance["dvc_lock"]["sha256"]) == 64
    card = (awq / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: transformers" in card
    assert "transformers " in card and "not run: needs vLLM" in card
    assert "`embedded:pydoc` evaluation text (sha256" in card
    second = run(["qpipe", "publish", "--to", f"dir://{registry}"], env)
    fp8 = registry / "SmolLM2-135M-Instruct" / "trtllm-fp8" / lines[3][1]
    assert {"hf_checkpoint/model.safetensors", "hf_checkpoint/hf_quant_config.json",
            "hf_checkpoint/tokenizer.json", "build.json"} <= {str(p.relative_to(fp8)) for p in fp8.rglob("*")}
    fp8_card = (fp8 / "README.md").read_text()
    assert "emulated:hf checkpoint FP8" in fp8_card and "library_name: modelopt" in fp8_card
    second = run(["qpipe", "publish", "--to", f"dir://{registry}"], env)
    assert [line.split("\t")[2] for line in second.stdout.splitlines()] == ["unchanged"] * 5


def test_dvc_artifacts_get_fetches_a_built_artifact(repo, tmp_path):
    root, env, _, git = repo
    run(git + ["add", "-A"], env)
    run(git + ["commit", "-qm", "results"], env)
    # artifact versions are annotated git tags in GTO's convention; the data comes from the
    # DVC remote, or (for a local repository, as here) from that repository's cache
    run(git + ["tag", "-a", "gguf-q4_0@v1.0.0", "-m", "gguf-q4_0 v1.0.0"], env)
    out = tmp_path / "fetched"
    run(["dvc", "artifacts", "get", str(root), "gguf-q4_0", "--rev", "v1.0.0", "-o", str(out)], env)
    assert (out / "model.gguf").read_bytes() == (root / "artifacts/builds/gguf-q4_0/model.gguf").read_bytes()


def test_experiment_with_another_recipe_set_reuses_cached_stages(repo):
    root, env, _, _ = repo
    run(["dvc", "repro"], env)  # up to date after the previous test restored the recipe
    # the same three formats: formats.json is unchanged, so the baseline and the gates are too
    experiment = run(["dvc", "exp", "run", "-S", "recipes=[gguf-q8_0,awq-w4a16,trtllm-fp8]", "-n", "fewer"], env)
    ran = [line for line in experiment.stdout.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'report':" in ran and "Running stage 'formats':" in ran
    assert not any("build@" in line or "gate@" in line or "baseline" in line for line in ran), experiment.stdout
    report = json.loads((root / "artifacts" / "report" / "tradeoff.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["gguf-q8_0", "awq-w4a16", "trtllm-fp8"]
    shown = run(["dvc", "exp", "show", "--json"], env).stdout
    assert "fewer" in shown

    # compare reads every commit and experiment through DVC; identical results are one row
    rows = json.loads(run(["qpipe", "compare", "--format", "json", "--sort", "decode_tok_s", "--descending"],
                          env).stdout)
    by_recipe = {r["recipe"]: r for r in rows}
    assert set(by_recipe) == {"gguf-q8_0", "gguf-q4_0", "awq-w4a16", "trtllm-fp8", "trtllm-int8-sq"}
    assert "fewer" in by_recipe["gguf-q8_0"]["experiment"] and "workspace" in by_recipe["gguf-q8_0"]["experiment"]
    assert {r["recipe"] for r in rows[-3:]} == {"awq-w4a16", "trtllm-fp8", "trtllm-int8-sq"}  # no speed: last
    assert rows[-1]["pareto"] is None
    chosen = run(["qpipe", "recommend", "--max-size", "1GB", "--objective", "kld"], env).stdout
    assert chosen.startswith("best: gguf-q8_0")
    assert "lost: gguf-q4_0" in chosen and "lost: awq-w4a16" in chosen and "lost: trtllm-fp8" in chosen
    nobody = run(["qpipe", "recommend", "--max-size", "10MB"], env, check=False)
    assert nobody.returncode == 2 and "--max-size 10MB excluded the last candidates" in nobody.stderr


def test_two_queued_experiments_at_once_measure_speed_one_at_a_time(repo):
    """`dvc exp run --run-all -j 2`: both finish, their accuracy equals the serial run's, and
    their speed measurements hold the host lock one after the other."""
    from pipeline import compare

    root, env, _, git = repo
    run(git + ["checkout", "params.yaml"], env)  # the previous test's experiment left three recipes
    run(["dvc", "repro"], env)
    serial = {name: gate(root, name)["accuracy"] for name in ("gguf-q8_0", "gguf-q4_0")}
    for name in serial:
        run(["dvc", "exp", "run", "--queue", "-S", f"recipes=[{name}]", "-n", f"queued-{name}"], env)
    run(["dvc", "exp", "run", "--run-all", "-j", "2"], env)
    results = {label: result for label, result in compare.gate_results(json.loads(
        run(["dvc", "exp", "show", "--json"], env).stdout)) if label.startswith("queued-")}
    assert set(results) == {"queued-gguf-q8_0", "queued-gguf-q4_0"}
    for name, accuracy in serial.items():
        result = results[f"queued-{name}"]
        assert result["accuracy"]["mean_kld"] == accuracy["mean_kld"]
        assert result["speed"]["status"] == "ok", result["speed"].get("reason")
    held = sorted((r["speed"]["measurement"]["held_from"], r["speed"]["measurement"]["held_until"])
                  for r in results.values())
    assert held[0][1] <= held[1][0], f"speed measurements overlapped: {held}"
