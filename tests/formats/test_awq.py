import json

import pytest

from pipeline.config import SpeedParams
from pipeline.formats import load_recipe
from pipeline.errors import BadInput, HostLacks, RecipeNotApplicable
from pipeline.formats import awq
from tests.conftest import write


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_llama):
    return tiny_llama


def recipe(**knobs):
    return awq.Recipe.model_validate({"format": "awq", **knobs})


def build(tiny_checkpoint, tmp_path, **knobs):
    out = tmp_path / "out"
    out.mkdir()
    facts = awq.build(recipe(**knobs), source_dir=tiny_checkpoint, calibration_text=tiny_checkpoint.parent / "calibration.txt",
                      out_dir=out, threads=1, log=lambda _: None)
    return out, facts


# ---------------------------------------------------------------- recipe


def test_scheme_is_normalised_and_unknown_schemes_list_the_valid_ones():
    assert recipe(scheme="w4a16").scheme == "W4A16"
    with pytest.raises(ValueError, match="W4A16, W4A16_ASYM"):
        recipe(scheme="W4A17")


def test_recipe_file_errors_name_file_and_key(project):
    write(project / "recipes/bad.yaml", "format: awq\nscheme: FP8\n")
    with pytest.raises(BadInput, match="unknown scheme 'FP8'") as info:
        load_recipe("bad")
    assert info.value.where == "recipes/bad.yaml: scheme"
    write(project / "recipes/bad.yaml", "format: awq\ngroup_sise: 64\n")
    with pytest.raises(BadInput, match="unknown key 'group_sise'") as info:
        load_recipe("bad")
    assert "group_size" in info.value.fix


def test_shipped_recipes_validate(project):
    assert load_recipe("awq-w4a16").algorithm == "awq"
    assert load_recipe("awq-w4a16").where("group_size") == "recipes/awq-w4a16.yaml: group_size"
    assert load_recipe("rtn-w4a16").algorithm == "rtn"


def test_shipped_schemes_are_llm_compressor_presets():
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    assert set(awq.SCHEMES) <= set(PRESET_SCHEMES)


def test_calibration_device_follows_the_host():
    assert awq.host_build_knobs({"gpus": []}) == {"calibration_device": "cpu"}
    assert awq.host_build_knobs({"gpus": [{"name": "H100"}], "torch_cuda": True}) == {"calibration_device": "cuda"}
    # a CPU build of torch on a GPU host calibrates on the CPU, and the recipe says so
    assert awq.host_build_knobs({"gpus": [{"name": "H100"}], "torch_cuda": False}) == {"calibration_device": "cpu"}


# ---------------------------------------------------------------- checks before calibrating


WIDTHS = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536, "lm_head": 576}


def test_group_size_that_divides_every_width_passes():
    awq.check_group_size(WIDTHS, 64, ["lm_head"], "r")


def test_group_size_error_names_the_layer_and_the_valid_sizes():
    with pytest.raises(BadInput, match="input width 576 of layer model.layers.0.self_attn.q_proj") as info:
        awq.check_group_size(WIDTHS, 128, ["lm_head"], "recipes/x.yaml: group_size")
    assert info.value.where == "recipes/x.yaml: group_size"
    assert info.value.fix.endswith("32, 64")


def test_ignored_layers_are_not_checked():
    widths = {"model.layers.0.mlp.up_proj": 512, "lm_head": 100}
    awq.check_group_size(widths, 128, ["lm_head"], "r")
    awq.check_group_size(widths, 128, ["re:lm_"], "r")
    with pytest.raises(BadInput, match="lm_head"):
        awq.check_group_size(widths, 128, [], "r")


def test_no_kernel_group_size_fits():
    with pytest.raises(BadInput) as info:
        awq.check_group_size({"a": 48, "b": 80}, 32, [], "r")
    assert "gcd is 16" in info.value.fix


def test_architecture_without_an_awq_mapping_is_refused():
    import torch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 8)

    with pytest.raises(RecipeNotApplicable, match="no AWQ mapping for architecture Toy") as info:
        awq.check_awq_mapping(Toy(), "r")
    assert "algorithm: rtn" in info.value.fix


def test_llama_has_a_registered_mapping_found_without_reading_weights(tiny_checkpoint):
    from pipeline.runtimes.transformers import meta_model

    assert awq.check_awq_mapping(meta_model(tiny_checkpoint), "r") == {
        "architecture": "LlamaForCausalLM", "mapping": "llm-compressor registry"}


def test_samples_that_fit():
    # 1 GB model, 8 samples used 5 GB: 0.5 GB a sample; 9 GB budget leaves 8 GB: 16 samples
    assert awq.samples_that_fit(8, 5e9, 1e9, 9e9) == 16
    assert awq.samples_that_fit(8, 5e9, 1e9, 0.5e9) == 0


def test_out_of_memory_names_the_knob_and_what_fits(tiny_checkpoint, tmp_path, monkeypatch):
    import llmcompressor

    def out_of_memory(**_):
        raise MemoryError

    monkeypatch.setattr(llmcompressor, "oneshot", out_of_memory)
    with pytest.raises(HostLacks, match="out of memory calibrating 2 samples x 16 tokens on cpu") as info:
        build(tiny_checkpoint, tmp_path, calibration_samples=2, calibration_seq_len=16, group_size=32)
    assert info.value.where == "recipe: calibration_samples"
    assert "samples fit" in info.value.fix


def test_cpu_pinning_workaround_applies_only_without_an_accelerator():
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    if torch.accelerator.is_available():
        with awq.cpu_pinning_disabled() as active:
            assert active is False
        return
    with pytest.raises(RuntimeError, match="accelerator"):
        torch.ones(2).pin_memory()  # the upstream failure the workaround avoids
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    value = IntermediateValue(value=torch.ones(2), device=None)
    with awq.cpu_pinning_disabled() as active:
        assert active is True
        IntermediatesCache._pin_intermediate(value)
    assert IntermediatesCache.__dict__["_pin_intermediate"] is original


# ---------------------------------------------------------------- builds of a tiny model


def test_rtn_build_writes_a_pack_quantized_directory(tiny_checkpoint, tmp_path):
    out, facts = build(tiny_checkpoint, tmp_path, algorithm="rtn", group_size=32)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    assert facts["reload_check"]["max_abs_logit_diff"] <= facts["reload_check"]["limit"]
    assert facts["calibration"] is None and facts["awq"] is None
    assert (out / "tokenizer.json").is_file()
    # 4-bit codes + bf16 scales and zero points per 32, plus the bf16 embedding (tied)
    assert 4 < awq.bits_per_weight(out) < 16
    nbytes = awq.decode_bytes_per_token(out, 100)
    assert nbytes["kv_cache"] == 2 * 2 * 2 * 16 * 2 * 100
    assert nbytes["weights"] < sum(p.stat().st_size for p in out.glob("*.safetensors"))
    # served with vLLM's fp8 KV cache: what the build records, the gates open, the roofline counts
    assert facts["kv_cache"] == "auto"
    (out / "build.json").write_text(json.dumps({"kv_cache": "fp8"}))
    assert awq.decode_bytes_per_token(out, 100)["kv_cache"] == nbytes["kv_cache"] / 2
    with awq.open_session(out, 1, SpeedParams()) as session:
        assert "fp8 e4m3 KV cache" in session.runtime


def test_awq_build_calibrates_and_records_it(tiny_checkpoint, tmp_path):
    out, facts = build(tiny_checkpoint, tmp_path, algorithm="awq", scheme="W4A16", group_size=32,
                       calibration_samples=2, calibration_seq_len=16, n_grid=3)
    assert facts["calibration"]["tokens"] == 32 and facts["device"] == "cpu"
    assert facts["awq"]["architecture"] == "LlamaForCausalLM"
    assert facts["tools"]["llmcompressor"] and facts["tools"]["compressed-tensors"]
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is True


def test_a_saved_model_that_differs_from_the_calibrated_one_fails_the_build(tiny_checkpoint, tmp_path, monkeypatch):
    from pipeline.errors import QpipeError

    monkeypatch.setattr(awq, "reload_logit_diff", lambda *args: 4.9)
    with pytest.raises(QpipeError, match="not the calibrated model: reloaded logits differ by up to 4.9"):
        build(tiny_checkpoint, tmp_path, algorithm="rtn", group_size=32)


def test_group_size_is_checked_before_loading_weights(tiny_checkpoint, tmp_path, monkeypatch):
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the group-size check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(BadInput, match="group_size 128 does not divide"):
        build(tiny_checkpoint, tmp_path, algorithm="rtn", group_size=128)


def test_a_checkpoint_no_vllm_kernel_takes_is_scored_through_transformers_and_its_speed_not_run(
        tiny_checkpoint, tmp_path, monkeypatch):
    from pipeline.runtimes import vllm

    out, _ = build(tiny_checkpoint, tmp_path, algorithm="rtn", group_size=32)
    asked = {}

    def problems(layers, **scheme):
        asked.update(scheme, layers=layers)
        return ["model.layers.0.self_attn.qkv_proj (64 -> 128): MarlinLinearKernel cannot implement due to: x"]

    monkeypatch.setattr(vllm, "unavailable_reason", lambda: None)  # as on a GPU host with vLLM
    monkeypatch.setattr(vllm, "kernel_problems", problems)
    reason = awq.speed_unavailable_reason(out)
    assert "has no mixed-precision kernel for 1 layer shape(s) of this asymmetric 4-bit group-32" in reason
    assert "qkv_proj (64 -> 128)" in reason
    assert (asked["bits"], asked["group_size"], asked["symmetric"]) == (4, 32, False)
    assert asked["dtype"] == json.loads((awq.artifact_path(out) / "config.json").read_text())["dtype"]
    fused = asked["layers"]
    assert "model.layers.0.self_attn.qkv_proj" in fused and "model.layers.0.mlp.gate_up_proj" in fused
    assert not {name.rsplit(".", 1)[-1] for name in fused} & {"q_proj", "k_proj", "v_proj", "lm_head"}  # fused; ignored
    assert awq.runtime_name(out).startswith("transformers") and awq.accuracy_unavailable_reason(out) is None
    monkeypatch.setattr(vllm, "kernel_problems", lambda layers, **scheme: [])
    assert awq.speed_unavailable_reason(out) is None and awq.runtime_name(out).startswith("vLLM")

    # a float32 config, under transformers 4's key: vLLM's dtype="auto" serves it in bfloat16
    config_path = awq.artifact_path(out) / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("dtype", None)
    config_path.write_text(json.dumps({**config, "torch_dtype": "float32"}))
    monkeypatch.setattr(vllm, "kernel_problems", problems)
    awq.speed_unavailable_reason(out)
    assert asked["dtype"] == "bfloat16"


# ---------------------------------------------------------------- per-module schemes and the search


def test_per_module_schemes_are_built_as_compressed_tensors_stores_them_and_the_search_round_trip_matches(
        convertible_llama, tmp_path):
    """An rtn build with per-module schemes: config groups of exact names, unquantized layers
    ignored, and each layer's stored weights (decompressed by transformers) equal to what the
    search's round trip gives, bit for bit; its bytes as search_bytes counts them."""
    import torch

    from pipeline.files import safetensors_table
    from pipeline.runtimes.transformers import load_causal_lm
    from pipeline.sensitivity import Group

    schemes = {r"model\.layers\.0\.mlp\.down_proj$": "W8A16_G128", r".*self_attn\.(q|k|v)_proj$": "unquantized",
               r"model\.layers\.1\.mlp\.(gate|up)_proj$": "W8A16_G32"}
    out, facts = build(convertible_llama, tmp_path, algorithm="rtn", group_size=32, schemes=schemes)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    eight_bit = {(g["weights"]["group_size"], *g["targets"]) for g in config["config_groups"].values()
                 if g["weights"]["num_bits"] == 8}
    assert eight_bit == {(128, "model.layers.0.mlp.down_proj"),
                         (32, "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")}
    assert "model.layers.1.self_attn.k_proj" in config["ignore"]
    source = dict(load_causal_lm(convertible_llama, dtype=torch.bfloat16).named_parameters())
    from transformers.utils.quantization_config import CompressedTensorsConfig

    decompressed = load_causal_lm(out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False))
    stored = dict(decompressed.named_parameters())
    for name, scheme in (("model.layers.0.mlp.down_proj.weight", "W8A16_G128"),
                         ("model.layers.1.mlp.down_proj.weight", "W4A16_ASYM_G32"),
                         ("model.layers.1.self_attn.o_proj.weight", "W4A16_ASYM_G32"),
                         ("model.layers.1.mlp.up_proj.weight", "W8A16_G32")):
        expected = awq.search_round_trip(source[name].detach().float().numpy(), scheme, threads=1)
        assert torch.equal(stored[name].float(), torch.from_numpy(expected)), name
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], source["model.layers.0.self_attn.q_proj.weight"])
    table = {name: size for name, _, size in safetensors_table(out)}
    for module, scheme in (("model.layers.0.mlp.down_proj", "W8A16_G128"), ("model.layers.1.mlp.down_proj", "W4A16_ASYM_G32")):
        stored_bytes = sum(size for name, size in table.items() if name.startswith(module + "."))
        group = Group("g", "mlp_down", 0, (module + ".weight",), ((96, 256),))
        assert awq.search_bytes(group, scheme) == stored_bytes, module


def test_schemes_that_split_a_module_vllm_fuses_are_refused():
    widths = {f"model.layers.0.self_attn.{p}_proj": 96 for p in "qkvo"}
    with pytest.raises(BadInput, match="fuses"):
        awq.check_module_schemes(recipe(schemes={r".*q_proj$": "W8A16_G32"}, group_size=32), widths)
    awq.check_module_schemes(recipe(schemes={r".*(q|k|v)_proj$": "W8A16_G128"}, group_size=32), {
        **widths, **{f"model.layers.0.self_attn.{p}_proj": 128 for p in "qkv"}})
    with pytest.raises(RecipeNotApplicable, match="does not divide the input width 96"):
        awq.check_module_schemes(recipe(schemes={r".*(q|k|v)_proj$": "W8A16_G128"}, group_size=32), widths)


def test_the_search_gives_no_scheme_to_embeddings_and_only_group_sizes_that_divide():
    from pipeline.sensitivity import Group

    narrow = Group("layers.0.attn_qkv", "attn_qkv", 0, ("a",), ((96, 96),))
    wide = Group("layers.0.mlp_down", "mlp_down", 0, ("b",), ((96, 256),))
    assert awq.search_candidates(narrow) == ["W4A16_ASYM_G32", "W8A16_G32"]
    assert awq.search_candidates(wide) == list(awq.SEARCH_TYPES)
    assert awq.search_candidates(Group("embedding", "embedding", None, ("e",), ((100, 96),))) == []
    assert awq.search_bytes(wide, awq.UNQUANTIZED) == 2 * 96 * 256
