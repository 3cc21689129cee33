import json

import pytest

from pipeline import formats
from pipeline.config import SpeedParams
from pipeline.errors import BadInput
from pipeline.formats import modelopt


def recipe(**knobs):
    return modelopt.Recipe.model_validate({"format": "modelopt", **knobs})


def test_unknown_config_lists_the_valid_ones(project):
    from pipeline.formats import load_recipe
    from tests.conftest import write

    write(project / "recipes/bad.yaml", "format: modelopt\nconfig: FP8_FAST_CFG\n")
    with pytest.raises(BadInput, match="unknown ModelOpt config 'FP8_FAST_CFG'") as info:
        load_recipe("bad")
    assert "use one of FP8_DEFAULT_CFG, NVFP4_DEFAULT_CFG, INT8_SMOOTHQUANT_CFG, INT8_WEIGHT_ONLY_CFG" in info.value.what
    assert info.value.where == "recipes/bad.yaml: config"
    write(project / "recipes/bad.yaml", "format: modelopt\nconfig: W4A16_NVFP4_CFG\n")
    with pytest.raises(BadInput, match="W4A16_NVFP4_CFG is not built by qpipe: only NVFP4_DEFAULT_CFG"):
        load_recipe("bad")
    write(project / "recipes/bad.yaml", "format: modelopt\nconfig: INT4_AWQ_CFG\n")
    with pytest.raises(BadInput, match="INT4_AWQ_CFG is not built by qpipe: its W4A16_AWQ export has no emulation"):
        load_recipe("bad")
    write(project / "recipes/bad.yaml", "format: modelopt\nkv_cache: int8\n")
    with pytest.raises(BadInput, match="'fp8', 'nvfp4' or 'none'") as info:
        load_recipe("bad")
    assert info.value.where == "recipes/bad.yaml: kv_cache"


def test_the_shipped_recipes_validate(project):
    from pipeline.formats import load_recipe

    configs = {name: load_recipe(name).config for name in ("trtllm-fp8", "trtllm-int8-sq", "trtllm-int8-wo")}
    assert configs == {"trtllm-fp8": "FP8_DEFAULT_CFG", "trtllm-int8-sq": "INT8_SMOOTHQUANT_CFG",
                       "trtllm-int8-wo": "INT8_WEIGHT_ONLY_CFG"}
    assert load_recipe("trtllm-fp8").kv_cache == "fp8"


def test_engine_settings_do_not_rebuild():
    spec = formats.build_spec(recipe(engine={"max_batch_size": 64}))
    assert "engine" not in spec and spec["config"] == "FP8_DEFAULT_CFG"


def test_every_modelopt_config_is_built_or_refused_with_a_reason():
    """Each *_CFG of the installed ModelOpt is either built here or named with why not."""
    import modelopt.torch.quantization as mtq

    for name in (n for n in dir(mtq) if n.endswith("_CFG") and not n.endswith("_KV_CFG") and "_KV_" not in n):
        assert name in modelopt.CONFIGS or any(name.startswith(p) for p in modelopt.NOT_BUILT), name


def test_kv_cache_config_is_appended_to_the_base_config():
    import modelopt.torch.quantization as mtq

    base = modelopt.quant_config(recipe(config="FP8_DEFAULT_CFG"))
    with_kv = modelopt.quant_config(recipe(config="FP8_DEFAULT_CFG", kv_cache="fp8"))
    assert with_kv["quant_cfg"] == base["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
    assert base["quant_cfg"] == mtq.FP8_DEFAULT_CFG["quant_cfg"]  # the library's config is not mutated


def test_architectures_modelopt_cannot_export_are_refused_and_named():
    from pipeline.errors import RecipeNotApplicable

    assert modelopt.decoder_type("LlamaForCausalLM", "c") == "llama"
    with pytest.raises(RecipeNotApplicable, match="cannot export architecture FooBarForCausalLM"):
        modelopt.decoder_type("FooBarForCausalLM", "c")


def test_the_export_plan_follows_what_modelopt_writes_for_the_family():
    from pipeline.errors import RecipeNotApplicable

    assert modelopt.export_plan(recipe(config="FP8_DEFAULT_CFG"), "Qwen2ForCausalLM", "c") == {
        "decoder": "qwen", "trtllm": False, "hf": True, "scored": "hf_checkpoint"}
    assert modelopt.export_plan(recipe(config="NVFP4_DEFAULT_CFG"), "Phi3ForCausalLM", "c")["scored"] == "hf_checkpoint"
    assert modelopt.export_plan(recipe(config="INT8_SMOOTHQUANT_CFG"), "LlamaForCausalLM", "c") == {
        "decoder": "llama", "trtllm": True, "hf": False, "scored": "trtllm_checkpoint"}
    assert modelopt.export_plan(recipe(config="INT8_WEIGHT_ONLY_CFG"), "LlamaForCausalLM", "c")["hf"] is False
    assert modelopt.export_plan(recipe(config="INT8_WEIGHT_ONLY_CFG"), "Gemma2ForCausalLM", "c") == {
        "decoder": "gemma2", "trtllm": False, "hf": True, "scored": "hf_checkpoint"}
    with pytest.raises(RecipeNotApplicable, match="INT8_SMOOTHQUANT_CFG cannot ship for Phi3ForCausalLM"):
        modelopt.export_plan(recipe(config="INT8_SMOOTHQUANT_CFG"), "Phi3ForCausalLM", "c")


@pytest.fixture(scope="module")
def fp8_build(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("modelopt") / "build"
    out.mkdir()
    facts = modelopt.build(recipe(config="FP8_DEFAULT_CFG", kv_cache="fp8", calibration_samples=2,
                                  calibration_seq_len=32, crosscheck_windows=2, max_crosscheck_ppl_gap=0.05),
                           source_dir=tiny_llama, calibration_text=tiny_llama.parent / "calibration.txt",
                           out_dir=out, threads=1, log=lambda _: None)
    return out, facts


def test_fp8_build_writes_the_unified_checkpoint_as_documented(fp8_build):
    from safetensors import safe_open

    out, facts = fp8_build
    assert not (out / "trtllm_checkpoint").exists()  # FP8 ships for TensorRT-LLM's PyTorch backend
    hf = json.loads((out / "hf_checkpoint/config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "modelopt"
    quant = json.loads((out / "hf_checkpoint/hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ("FP8", "FP8")
    with safe_open(out / "hf_checkpoint/model.safetensors", "pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.down_proj.weight_scale"] == "F32"
    assert "model.layers.1.self_attn.k_proj.k_scale" in dtypes
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert (out / "hf_checkpoint/tokenizer.json").is_file()
    assert facts["calibration"] == {"samples": 2, "seq_len": 32, "tokens": 64, "device": "cpu",
                                    "text": str(facts["calibration"]["text"])}
    assert set(facts["exports"]) == {"hf"} and facts["crosscheck"]["fake_quant"] == "ModelOpt's quantizers"


def test_exported_files_compute_exactly_what_the_fake_quant_model_does_in_the_runtimes_arithmetic(
        fp8_build, nvfp4_build, mixed_build):
    """The fake-quant model, computing as TensorRT-LLM does (as_the_runtime_computes), and the
    emulation of the exported files agree to the bit, layer by layer and in perplexity: FP8
    with its KV cache, NVFP4, and a mix of FP8, NVFP4 and unquantized layers."""
    for (_, facts), quantized_layers in ((fp8_build, 14), (nvfp4_build, 14), (mixed_build, 13)):
        check = facts["crosscheck"]
        export = check["exports"]["hf"]
        assert export["layers"] == quantized_layers  # lm_head (and the mix's unquantized o_proj) left out
        assert (export["gap"], export["largest_layer_error"]) == (0.0, 0.0), export
        assert export["emulated_ppl"] == check["fake_quant_ppl"]


def test_the_build_loads_the_source_in_its_stored_dtype(fp8_build, tiny_llama):
    _, facts = fp8_build
    assert json.loads((tiny_llama / "config.json").read_text())["dtype"] == "bfloat16"
    assert facts["calibration_dtype"] == "bfloat16"  # never widened to fp32


def test_gates_score_the_checkpoint_through_the_emulation_here(fp8_build):
    import numpy as np

    out, _ = fp8_build
    assert modelopt.accuracy_unavailable_reason(out) is None
    assert modelopt.runtime_name(out).startswith("emulated:hf checkpoint FP8 + fp8 e4m3 KV cache")
    assert "TensorRT-LLM is not installed" in modelopt.speed_unavailable_reason(out)
    with modelopt.open_session(out, 1, SpeedParams()) as session:
        (logits,) = session.window_logits(np.array([[1, 2, 3, 4, 5]]))
        assert session.device == "cpu"  # no CUDA here
        assert session.runtime == modelopt.runtime_name(out)
    assert logits.shape == (5, 130) and np.isfinite(logits).all()
    assert 0 < modelopt.bits_per_weight(out) < 16
    kv = modelopt.decode_bytes_per_token(out, 100)["kv_cache"]
    assert kv == 2 * 2 * 2 * 16 * 1 * 100  # layers x (K, V) x kv heads x head dim x 1 byte (fp8) x tokens


def test_generation_through_the_emulation_with_its_fp8_kv_cache_follows_the_argmax_of_its_logits(fp8_build):
    out, _ = fp8_build
    session = modelopt.open_session(out, 1, SpeedParams())
    (produced,) = session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[])
    assert len(produced) == 5
    sequence = [1, 2, 3]
    for token in produced:
        (logits,) = session.window_logits([sequence])
        assert token == int(logits[-1].argmax())  # a KV cache cast as the whole window's is
        sequence.append(token)


@pytest.mark.parametrize("figures, message, key", [
    ((1e6, {"model.layers.0.mlp.up_proj": 0.0}), "emulated ppl 1000000", "max_crosscheck_ppl_gap"),
    ((1.0, {"model.layers.0.mlp.up_proj": 0.6, "model.layers.1.mlp.up_proj": 0.0}),
     r"layer model\.layers\.0\.mlp\.up_proj's output differs by 6\.00e-01 .* 1 of 2 layers over it",
     "max_crosscheck_layer_error")])
def test_an_export_that_computes_otherwise_fails_the_build(tiny_llama, tmp_path, monkeypatch, figures, message, key):
    """With a stand-in emulation far from the fake-quant model, over the whole model or in one
    layer, the build refuses, naming the limit. (That the emulation does see a wrong file is
    test_a_wrong_stored_nvfp4_scale_fails_the_build here and tests/test_pipeline.py.)"""
    from pipeline.errors import QpipeError

    monkeypatch.setattr(modelopt, "emulated_figures", lambda checkpoint, windows, probes, threads: figures)
    with pytest.raises(QpipeError, match="does not compute what ModelOpt calibrated: " + message) as info:
        modelopt.build(recipe(config="INT8_WEIGHT_ONLY_CFG", calibration_samples=1, calibration_seq_len=32,
                              crosscheck_windows=1),
                       source_dir=tiny_llama, calibration_text=tiny_llama.parent / "calibration.txt",
                       out_dir=tmp_path, threads=1, log=lambda _: None)
    assert info.value.where.endswith(key)


def tensorrt_llm_requantize(weight):
    """TensorRT-LLM 1.2's quantizer of a float W8A16 weight [out, in], per output channel, as
    cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp states it
    (``symmetric_quantize``): ``quant_range_scale = 1.f / float(1 << (bits_in_type - 1))``, so
    scale = amax / 128; codes = ``round`` (half away from zero) of weight / scale, clipped to
    [-128, 127]."""
    import torch

    scale = weight.float().abs().amax(dim=1) / 128
    scaled = weight.float() / scale[:, None]
    codes = torch.clamp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5), -128, 127).to(torch.int8)
    return codes, scale


def w8a16_checkpoint(tmp_path):
    """A ModelOpt-style W8A16 TensorRT-LLM checkpoint: symmetric codes per output channel with
    scale = amax / 127, so each row's amax is +127 or -127."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator)
    scales = weight.abs().amax(dim=1) / 127
    codes = torch.round(weight / scales[:, None]).to(torch.int8)
    source = tmp_path / "ckpt"
    source.mkdir()
    save_file({"transformer.layers.0.mlp.fc.weight": codes,
               "transformer.layers.0.mlp.fc.weights_scaling_factor": scales[:, None],
               "transformer.ln_f.weight": torch.ones(32, dtype=torch.bfloat16)}, source / "rank0.safetensors")
    (source / "config.json").write_text(json.dumps({"dtype": "bfloat16", "quantization": {"quant_algo": "W8A16"}}))
    return source, codes, scales


def test_a_float_handover_would_not_give_tensorrt_llm_the_checkpoints_codes(tmp_path):
    """Why the W8A16 handover is int8: re-quantized by TensorRT-LLM's rule, code x scale comes
    back with codes moved and, for a row whose amax is negative, cannot come back at all."""
    import torch

    _, codes, scales = w8a16_checkpoint(tmp_path)
    requantized, requantized_scales = tensorrt_llm_requantize(codes.float() * scales[:, None])
    assert not torch.equal(requantized, codes)
    assert (requantized != codes).float().mean() > 0.2
    assert torch.allclose(requantized_scales, scales * 127 / 128)
    assert (codes.min(dim=1).values == -127).any()  # a row no float weight reproduces


def test_the_w8a16_handover_keeps_the_checkpoints_codes_in_tensorrt_llms_layout(tmp_path):
    import torch
    from safetensors.torch import load_file

    source, codes, scales = w8a16_checkpoint(tmp_path)
    laid_out = []

    def layout(matrix):  # TensorRT-LLM's preprocess_weights_for_mixed_gemm on a GPU host
        laid_out.append(matrix.clone())
        return matrix.flip(0)  # any byte permutation: the handover must store what it returns

    folder, facts = modelopt.weight_only_int8_checkpoint(source, tmp_path / "handover", layout, torch.bfloat16)
    converted = load_file(folder / "rank0.safetensors")
    (given,) = laid_out
    assert torch.equal(given, codes.t())  # [in, out], the checkpoint's own codes
    weight = converted["transformer.layers.0.mlp.fc.weight"]
    assert weight.dtype == torch.int8 and torch.equal(weight, codes.t().flip(0))
    held = converted["transformer.layers.0.mlp.fc.per_channel_scale"]
    assert held.dtype == torch.bfloat16 and held.shape == (64,)
    assert torch.equal(held, scales.to(torch.bfloat16))
    assert "transformer.layers.0.mlp.fc.weights_scaling_factor" not in converted
    assert torch.equal(converted["transformer.ln_f.weight"], torch.ones(32, dtype=torch.bfloat16))
    assert facts["layers"] == 1 and facts["scale_dtype"] == "bfloat16"
    assert 0 < facts["largest_scale_rounding"] <= 2 ** -8  # bf16 keeps 8 significant bits


NVFP4_RECIPE = {"config": "NVFP4_DEFAULT_CFG", "kv_cache": "fp8", "calibration_samples": 2, "calibration_seq_len": 32,
                "crosscheck_windows": 2, "max_crosscheck_ppl_gap": 0.05}


def build_tiny(tiny_llama, directory, knobs: dict):
    """(build directory, build facts) of a recipe with `knobs` on the tiny Llama."""
    out = directory / "build"
    out.mkdir()
    facts = modelopt.build(recipe(**knobs), source_dir=tiny_llama, calibration_text=tiny_llama.parent / "calibration.txt",
                           out_dir=out, threads=1, log=lambda _: None)
    return out, facts


@pytest.fixture(scope="module")
def nvfp4_build(tiny_llama, tmp_path_factory):
    return build_tiny(tiny_llama, tmp_path_factory.mktemp("nvfp4"), NVFP4_RECIPE)


def test_nvfp4_builds_on_the_cpu_and_its_files_agree_with_modelopts_fake_quant(nvfp4_build):
    from safetensors import safe_open

    out, facts = nvfp4_build
    quant = json.loads((out / "hf_checkpoint/hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"], quant["group_size"]) == ("NVFP4", "FP8", 16)
    with safe_open(out / "hf_checkpoint/model.safetensors", "pt") as handle:
        table = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert table["model.layers.0.mlp.down_proj.weight"] == ("U8", [64, 96])  # [out, in / 2]: two codes a byte
    assert table["model.layers.0.mlp.down_proj.weight_scale"] == ("F8_E4M3", [64, 12])  # a scale per 16 inputs
    assert table["model.layers.0.mlp.down_proj.weight_scale_2"][0] == "F32"
    assert facts["crosscheck"]["fake_quant"] == modelopt.FP4_CPU_FAKE_QUANT
    assert facts["crosscheck"]["exports"]["hf"]["gap"] <= facts["crosscheck"]["limit"]
    assert not (out / "trtllm_checkpoint").exists()
    assert modelopt.runtime_name(out).startswith("emulated:hf checkpoint NVFP4 + fp8 e4m3 KV cache")


def test_the_emulation_reads_nvfp4_weights_as_modelopt_dequantizes_them(nvfp4_build):
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    from pipeline.runtimes import checkpoint_emulation

    out, _ = nvfp4_build
    tensors = load_file(out / "hf_checkpoint/model.safetensors")
    packed = [name for name, tensor in tensors.items() if tensor.dtype == torch.uint8]
    assert len(packed) == 2 * 7  # every Linear of both layers; lm_head is left in bf16
    for name in packed:
        prefix = name.removesuffix(".weight")
        codes, block, per_tensor = tensors[name], tensors[prefix + ".weight_scale"], tensors[prefix + ".weight_scale_2"]
        shape = torch.Size([codes.shape[0], 2 * codes.shape[1]])
        theirs = NVFP4QTensor(shape, torch.float32, codes).dequantize(dtype=torch.float32, scale=block,
                                                                      double_scale=per_tensor, block_sizes={-1: 16})
        assert torch.equal(checkpoint_emulation.dequantize_nvfp4(codes, block, per_tensor), theirs), name


def test_the_emulations_fp4_activations_round_as_modelopts_nvfp4_tensor():
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from pipeline.runtimes import checkpoint_emulation

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    assert checkpoint_emulation.round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=generator) * torch.logspace(-2, 1, 64)
    global_scale = x.abs().amax() / (6 * 448)
    packed, block, per_tensor = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=global_scale)
    theirs = packed.dequantize(dtype=torch.float32, scale=block, double_scale=per_tensor, block_sizes={-1: 16})
    assert torch.equal(checkpoint_emulation.fake_quantize_nvfp4(x, global_scale), theirs)


def test_a_wrong_stored_nvfp4_scale_fails_the_build(tiny_llama, tmp_path, monkeypatch):
    """The cross-check reads the files as written: a per-tensor scale stored 10x too large (the
    fake-quant model keeps the right one) fails the build."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.errors import QpipeError

    export_hf = modelopt.export_hf

    def export_with_a_wrong_scale(model, dtype, export_dir, source_dir):
        facts = export_hf(model, dtype, export_dir, source_dir)
        path = export_dir / "model.safetensors"
        tensors = load_file(path)
        tensors = {name: tensor * 10 if name.endswith("weight_scale_2") else tensor for name, tensor in tensors.items()}
        save_file(tensors, path, metadata={"format": "pt"})
        return facts

    # the tiny model's random weights scaled up, so that its next-token distributions are far
    # from uniform and a wrong scale moves its perplexity
    import shutil

    from transformers import AutoModelForCausalLM

    sharp = tmp_path / "sharp"
    shutil.copytree(tiny_llama, sharp)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("norm.weight"):
                parameter.mul_(4)
    model.save_pretrained(sharp)
    calibration = tiny_llama.parent / "calibration.txt"
    right = modelopt.build(recipe(**NVFP4_RECIPE), source_dir=sharp, calibration_text=calibration,
                           out_dir=tmp_path / "right", threads=1, log=lambda _: None)["crosscheck"]
    assert right["exports"]["hf"]["gap"] <= right["limit"]
    monkeypatch.setattr(modelopt, "export_hf", export_with_a_wrong_scale)
    with pytest.raises(QpipeError, match="does not compute what ModelOpt calibrated"):
        modelopt.build(recipe(**NVFP4_RECIPE), source_dir=sharp, calibration_text=calibration,
                       out_dir=tmp_path / "wrong", threads=1, log=lambda _: None)


def test_an_nvfp4_kv_cache_is_exported_emulated_as_modelopt_quantizes_it_and_counted(tiny_llama, tmp_path):
    """FP8 weights with ModelOpt's NVFP4_KV_CFG (the pairing TensorRT-LLM serves on Blackwell): the
    unified checkpoint says NVFP4 and holds each layer's K and V scales, the build's cross-check
    passes (on this random model a KV cache hardly moves the perplexity: the cast itself is
    checked against ModelOpt below), and the roofline counts 4.5 bits a cached value."""
    facts = modelopt.build(recipe(config="FP8_DEFAULT_CFG", kv_cache="nvfp4", calibration_samples=2,
                                  calibration_seq_len=32, crosscheck_windows=2, max_crosscheck_ppl_gap=0.05),
                           source_dir=tiny_llama, calibration_text=tiny_llama.parent / "calibration.txt",
                           out_dir=tmp_path, threads=1, log=lambda _: None)
    quant = json.loads((tmp_path / "hf_checkpoint/hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == "NVFP4"
    (export,) = facts["crosscheck"]["exports"].values()
    assert export["gap"] <= facts["crosscheck"]["limit"]
    assert facts["crosscheck"]["fake_quant"] == modelopt.FP4_CPU_FAKE_QUANT  # ModelOpt's kernel needs CUDA
    assert "nvfp4 KV cache" in modelopt.runtime_name(tmp_path)
    assert modelopt.decode_bytes_per_token(tmp_path, 100)["kv_cache"] == 2 * 2 * 2 * 16 * (0.5 + 1 / 16) * 100
    with pytest.raises(ValueError, match="kv_cache: nvfp4 ships only in the unified checkpoint"):
        recipe(config="INT8_SMOOTHQUANT_CFG", kv_cache="nvfp4")


def test_the_emulations_nvfp4_kv_cast_is_modelopts_quantizer_with_the_exported_scale():
    """Keys through NVFP4_KV_CFG's quantizer (ModelOpt's NVFP4 arithmetic) equal the emulation's
    cast from the scale ModelOpt's export writes for it (amax / 448): a sixth of it is the
    per-tensor scale, blocks of 16 run along the head."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export.quant_utils import _postprocess_single_tensor
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from pipeline.runtimes import checkpoint_emulation as emulation

    (entry,) = mtq.NVFP4_KV_CFG["quant_cfg"]
    quantizer = TensorQuantizer(QuantizerAttributeConfig(**entry["cfg"]))
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 8, 64) * 3  # [batch, KV heads, positions, head_dim], as attention gets them
    quantizer.amax = keys.abs().amax()
    name, scale = _postprocess_single_tensor("model.layers.0.self_attn.k_bmm_quantizer._amax", quantizer.amax,
                                             448.0, "NVFP4")
    assert name == "model.layers.0.self_attn.k_proj.k_scale"
    theirs = modelopt.nvfp4_fake_quantize(keys, quantizer)
    ours, _ = emulation.nvfp4_kv_cast(scale, scale)(keys, keys)
    assert torch.equal(ours, theirs) and not torch.equal(ours, keys)
    assert not torch.allclose(emulation.fake_quantize_nvfp4(keys, scale), theirs)  # the scale itself is not it


# ---------------------------------------------------------------- per-module formats (MIXED_PRECISION)

MIXED_RECIPE = {**NVFP4_RECIPE, "kv_cache": "none", "module_formats": {
    r"model\.layers\.0\.self_attn\.(q|k|v)_proj$": "fp8", r".*layers\.1\.self_attn\.o_proj$": "unquantized"}}


@pytest.fixture(scope="module")
def mixed_build(tiny_llama, tmp_path_factory):
    return build_tiny(tiny_llama, tmp_path_factory.mktemp("mixed"), MIXED_RECIPE)


def test_module_formats_export_a_mixed_precision_checkpoint_the_runtimes_read_layer_by_layer(mixed_build):
    """On an NVFP4 base, layer 0's q/k/v take FP8 and layer 1's o_proj none: the weights are
    stored so, quantized_layers (what TensorRT-LLM's PyTorch backend and vLLM read) says so, and
    the emulation reads each layer with its own arithmetic and agrees with the fake-quant model."""
    out, facts = mixed_build
    checkpoint = out / "hf_checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    layers = quant["quantized_layers"]
    assert layers["model.layers.0.self_attn.k_proj"] == {"quant_algo": "FP8"}
    assert layers["model.layers.0.self_attn.o_proj"]["quant_algo"] == "NVFP4"
    assert "model.layers.1.self_attn.o_proj" not in layers  # unquantized: absent, as the runtimes read it
    written = modelopt.exported_formats(checkpoint, {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
                                                     "model.layers.1.mlp.down_proj"})
    assert written == {"model.layers.0.self_attn.q_proj": {"stored": "FP8", "declared": "FP8"},
                       "model.layers.1.self_attn.o_proj": {"stored": "UNQUANTIZED", "declared": "UNQUANTIZED"},
                       "model.layers.1.mlp.down_proj": {"stored": "NVFP4", "declared": "NVFP4"}}
    assert facts["exports"]["hf"]["linear_formats"] == {"NVFP4": 10, "FP8": 3, "UNQUANTIZED": 1}
    assert facts["exports"]["hf"]["runs_on"] == modelopt.MIXED_RUNTIMES
    assert facts["crosscheck"]["exports"]["hf"]["gap"] <= facts["crosscheck"]["limit"]
    assert modelopt.runtime_name(out).startswith("emulated:hf checkpoint MIXED_PRECISION (FP8 x3, NVFP4 x10)")


def test_a_layer_exported_in_another_format_than_asked_fails_the_build(mixed_build, tmp_path):
    import shutil

    from pipeline.errors import ToolFailed

    out, _ = mixed_build
    checkpoint = shutil.copytree(out / "hf_checkpoint", tmp_path / "hf_checkpoint")
    path = checkpoint / "hf_quant_config.json"
    config = json.loads(path.read_text())
    config["quantization"]["quantized_layers"]["model.layers.0.self_attn.q_proj"] = {"quant_algo": "NVFP4"}
    path.write_text(json.dumps(config))
    formats = {"model.layers.0.self_attn.q_proj": "FP8", "model.layers.0.self_attn.k_proj": "FP8"}
    with pytest.raises(ToolFailed, match="q_proj: FP8 asked, FP8 stored, NVFP4 declared") as info:
        modelopt.check_exported_formats(checkpoint, formats, "recipes/r.yaml: module_formats")
    assert "k_proj" not in info.value.what


def test_module_formats_are_checked_before_any_weight_is_loaded():
    from pipeline.errors import RecipeNotApplicable

    widths = {f"model.layers.0.{name}": 64 for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    widths.update({"model.layers.0.mlp.down_proj": 200, "lm_head": 64})
    fp8 = recipe(module_formats={r".*down_proj$": "FP8"})
    assert modelopt.linear_formats(fp8, widths) == {**{name: "FP8" for name in widths if name != "lm_head"}}
    with pytest.raises(RecipeNotApplicable, match="blocks of 16 do not divide the input width 200"):
        modelopt.linear_formats(recipe(module_formats={r".*down_proj$": "NVFP4"}), widths)
    with pytest.raises(BadInput, match=r"fuse into one \(.*q_proj, .*k_proj, .*v_proj\) resolve to different "
                                       r"formats: FP8, NVFP4") as info:
        modelopt.linear_formats(recipe(module_formats={r".*q_proj$": "NVFP4"}), widths)
    assert "vLLM refuses" in info.value.fix
    assert modelopt.linear_formats(recipe(), widths) == {}  # a uniform recipe: the config alone
    for bad, message in (({"config": "INT8_WEIGHT_ONLY_CFG", "module_formats": {"x": "FP8"}}, "unified checkpoint"),
                         ({"module_formats": {"x": "INT4"}}, "unknown type 'INT4'"),
                         ({"module_formats": {"x": "FP8"}, "search": {"bits_per_weight": 6}}, "not both"),
                         ({"search": {"bits_per_weight": 6, "types": ["W4A16"]}}, "not among")):
        with pytest.raises(ValueError, match=message):
            recipe(**bad)


def test_overrides_are_appended_by_exact_quantizer_name():
    entries = modelopt.module_quant_cfg({"m.layers.0.a": "FP8", "m.layers.0.b": "NVFP4", "m.layers.0.c": "UNQUANTIZED"},
                                        "FP8")
    assert [entry["quantizer_name"] for entry in entries] == [
        "m.layers.0.b.weight_quantizer", "m.layers.0.b.input_quantizer",
        "m.layers.0.c.weight_quantizer", "m.layers.0.c.input_quantizer"]
    assert entries[0]["cfg"]["num_bits"] == (2, 1) and entries[2] == {"quantizer_name": "m.layers.0.c.weight_quantizer",
                                                                       "enable": False}


def test_the_search_round_trips_are_what_the_export_stores_and_the_runtime_computes(mixed_build, tiny_llama):
    """Weights through the search's round trip equal what the export stored from them (FP8:
    layer 0's q/k/v; NVFP4: the projections no other shares an input with). Inputs equal
    ModelOpt's max-calibrated quantizers on the same values, but for FP8 ties: TensorRT-LLM
    multiplies by fl(1 / scale), ModelOpt by fl(448 / amax)."""
    import modelopt.torch.quantization as mtq
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from pipeline.runtimes import checkpoint_emulation

    out, _ = mixed_build
    stored, source = load_file(out / "hf_checkpoint/model.safetensors"), load_file(tiny_llama / "model.safetensors")
    for module, type_name in (("model.layers.0.self_attn.q_proj", "FP8"), ("model.layers.0.self_attn.v_proj", "FP8"),
                              ("model.layers.0.self_attn.o_proj", "NVFP4"), ("model.layers.1.mlp.down_proj", "NVFP4")):
        codes, scale = stored[module + ".weight"], stored[module + ".weight_scale"]
        written = (checkpoint_emulation.dequantize(codes, scale) if type_name == "FP8" else
                   checkpoint_emulation.dequantize_nvfp4(codes, scale, stored[module + ".weight_scale_2"]))
        ours = modelopt.search_round_trip(source[module + ".weight"].float().numpy(), type_name, threads=1)
        assert np.array_equal(ours, written.numpy()), module

    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 9, 64, generator=generator) * torch.logspace(-2, 1, 64)).to(torch.bfloat16)
    for type_name, config in (("FP8", mtq.FP8_DEFAULT_CFG), ("NVFP4", mtq.NVFP4_DEFAULT_CFG)):
        layer = mtq.quantize(torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)), config,
                             lambda model: model(inputs))
        with modelopt.nvfp4_fake_quant_on_cpu(layer), torch.no_grad():
            theirs = layer[0].input_quantizer(inputs)
        ours = modelopt.search_input_round_trip(inputs, type_name)
        differing = ours != theirs
        if type_name == "NVFP4":
            assert not differing.any()
            continue
        scaled = inputs.float() / (layer[0].input_quantizer.amax.float() / 448)
        assert differing.float().mean() < 0.05
        # each difference is a tie between two e4m3 values (|x| / scale halfway between them)
        low, high = torch.minimum(ours, theirs)[differing], torch.maximum(ours, theirs)[differing]
        midpoint = (low + high) / 2 / (layer[0].input_quantizer.amax.float() / 448)
        assert torch.allclose(scaled[differing], midpoint.float(), rtol=1e-5)


def test_search_bytes_are_the_stored_bytes_and_nvfp4_needs_rows_its_blocks_tile(mixed_build):
    from pipeline.files import safetensors_table
    from pipeline.sensitivity import Group

    out, _ = mixed_build
    table = safetensors_table(out / "hf_checkpoint")

    def stored(module):
        return sum(size for name, _, size in table if name.rpartition(".")[0] == module)

    for module, type_name, shape in (("model.layers.0.self_attn.q_proj", "FP8", (64, 64)),
                                     ("model.layers.0.mlp.down_proj", "NVFP4", (64, 192)),
                                     ("model.layers.1.self_attn.o_proj", "UNQUANTIZED", (64, 64))):
        group = Group(name="g", kind="attn_out", layer=0, parameters=(module + ".weight",), shapes=(shape,))
        assert modelopt.search_bytes(group, type_name) == stored(module), module
    group = Group(name="g", kind="mlp_down", layer=0, parameters=("w",), shapes=((64, 200),))
    assert modelopt.search_candidates(group) == ["FP8"]
    assert modelopt.search_candidates(Group("e", "embedding", None, ("w",), ((64, 64),))) == []


def test_a_search_resolves_to_one_exact_entry_per_linear_that_the_build_applies():
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    shapes = [[64, 64], [32, 64], [32, 64]]
    options = {"UNQUANTIZED": {"bytes": 2 * 8192, "mean_kld": 0.0}, "FP8": {"bytes": 8192 + 24, "mean_kld": 0.01},
               "NVFP4": {"bytes": 4096 + 512 + 24, "mean_kld": 0.05}}
    sensitivity = {"formats": {"modelopt": {
        "weights": 8192 + 4096, "other_weights": 0, "unquantized_type": "UNQUANTIZED",
        "groups": [{"name": "layers.0.attn_qkv", "kind": "attn_qkv", "layer": 0, "parameters": names, "shapes": shapes,
                    "options": options},
                   {"name": "embedding", "kind": "embedding", "layer": None, "parameters": ["model.embed_tokens.weight"],
                    "shapes": [[64, 64]], "options": {"UNQUANTIZED": {"bytes": 8192, "mean_kld": 0.0}}}]}}}
    searched = recipe(search={"bits_per_weight": 11})
    keys, facts = modelopt.resolve_search(searched, sensitivity)
    assert keys == {"module_formats": {rf"model\.layers\.0\.self_attn\.{p}_proj$": "FP8" for p in "qkv"}}
    assert facts["types"] == {"FP8": 1, "UNQUANTIZED": 1} and facts["predicted_mean_kld"] == pytest.approx(0.01)
    built = recipe(module_formats=keys["module_formats"])
    widths = {name.removesuffix(".weight"): 64 for name in names}
    assert set(modelopt.linear_formats(built, widths).values()) == {"FP8"}
