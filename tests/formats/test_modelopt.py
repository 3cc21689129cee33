import json

import pytest

from pipeline import formats
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
    assert "use one of FP8_DEFAULT_CFG, INT8_SMOOTHQUANT_CFG, INT8_WEIGHT_ONLY_CFG" in info.value.what
    assert info.value.where == "recipes/bad.yaml: config"
    write(project / "recipes/bad.yaml", "format: modelopt\nconfig: NVFP4_DEFAULT_CFG\n")
    with pytest.raises(BadInput, match="NVFP4_DEFAULT_CFG is not built by qpipe: NVFP4 quantizers need a CUDA GPU"):
        load_recipe("bad")
    write(project / "recipes/bad.yaml", "format: modelopt\nconfig: INT4_AWQ_CFG\n")
    with pytest.raises(BadInput, match="INT4_AWQ_CFG is not built by qpipe: its W4A16_AWQ export has no emulation"):
        load_recipe("bad")
    write(project / "recipes/bad.yaml", "format: modelopt\nkv_cache: int8\n")
    with pytest.raises(BadInput, match="'fp8' or 'none'") as info:
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


def test_architectures_modelopt_cannot_export_are_named():
    assert modelopt.decoder_type("LlamaForCausalLM", "c") == "llama"
    with pytest.raises(BadInput, match="cannot export architecture FooBarForCausalLM"):
        modelopt.decoder_type("FooBarForCausalLM", "c")


def test_the_export_plan_follows_what_modelopt_writes_for_the_family():
    from pipeline.errors import RecipeNotApplicable

    assert modelopt.export_plan(recipe(config="FP8_DEFAULT_CFG"), "Qwen2ForCausalLM", "c") == {
        "decoder": "qwen", "trtllm": True, "hf": True, "scored": "trtllm_checkpoint"}
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


def test_fp8_build_writes_both_checkpoints_as_documented(fp8_build):
    from safetensors import safe_open

    out, facts = fp8_build
    trtllm = json.loads((out / "trtllm_checkpoint/config.json").read_text())
    assert trtllm["quantization"]["quant_algo"] == "FP8"
    assert trtllm["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert trtllm["rotary_base"] == 10000.0  # the tiny model's RoPE base, carried over explicitly
    assert trtllm["dtype"] == "bfloat16"
    with safe_open(out / "trtllm_checkpoint/rank0.safetensors", "pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    assert dtypes["transformer.layers.0.attention.qkv.weight"] == "F8_E4M3"
    assert shapes["transformer.layers.0.attention.qkv.weight"] == [64 + 2 * 32, 64]  # q + k + v rows
    assert dtypes["transformer.layers.1.mlp.proj.weights_scaling_factor"] == "F32"
    assert dtypes["transformer.vocab_embedding.weight"] == "BF16"
    assert "transformer.layers.1.attention.kv_cache_scaling_factor" in dtypes
    hf = json.loads((out / "hf_checkpoint/config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "modelopt"
    assert json.loads((out / "hf_checkpoint/hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    for directory in ("trtllm_checkpoint", "hf_checkpoint"):
        assert (out / directory / "tokenizer.json").is_file()
    assert facts["calibration"] == {"samples": 2, "seq_len": 32, "tokens": 64, "device": "cpu",
                                    "text": str(facts["calibration"]["text"])}
    assert set(facts["exports"]) == {"trtllm", "hf"}


def test_exported_files_agree_with_the_fake_quant_model(fp8_build):
    _, facts = fp8_build
    check = facts["crosscheck"]
    for export in check["exports"].values():
        assert export["gap"] <= check["limit"]
        assert export["emulated_ppl"] == pytest.approx(check["fake_quant_ppl"], rel=check["limit"])


def test_the_build_loads_the_source_in_its_stored_dtype(fp8_build, tiny_llama):
    _, facts = fp8_build
    assert json.loads((tiny_llama / "config.json").read_text())["dtype"] == "bfloat16"
    assert facts["calibration_dtype"] == "bfloat16"  # never widened to fp32


def test_undoing_the_exporters_side_effects_gives_the_checkpoints_of_a_copy_byte_for_byte(tiny_llama, tmp_path):
    """The old build handed the TensorRT-LLM exporter a deep copy of the model; undoing that
    export's changes to the model must give the same HF checkpoint."""
    import copy

    import torch
    from transformers import AutoTokenizer

    fp8 = recipe(config="FP8_DEFAULT_CFG", kv_cache="fp8", calibration_samples=2, calibration_seq_len=32)
    calibration, _ = modelopt.split_calibration_text(AutoTokenizer.from_pretrained(tiny_llama),
                                                     tiny_llama.parent / "calibration.txt", fp8, 2)
    model = modelopt._calibrate(modelopt.load_calibration_model(tiny_llama, "cpu"), modelopt.quant_config(fp8),
                                calibration)
    model.config.dtype = torch.bfloat16
    twin = copy.deepcopy(model)
    modelopt.export_trtllm(copy.deepcopy(twin), "llama", torch.bfloat16, tmp_path / "copy-trtllm", tiny_llama)
    modelopt.export_hf(twin, torch.bfloat16, tmp_path / "copy-hf", tiny_llama)
    amax = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("_amax")}
    with modelopt.export_side_effects_undone(model):
        modelopt.export_trtllm(model, "llama", torch.bfloat16, tmp_path / "kept-trtllm", tiny_llama)
        unified = [name for name, buffer in model.named_buffers() if name in amax and not torch.equal(buffer, amax[name])]
    assert unified, "the exporter no longer unifies fused scales in place: the guard may go"
    modelopt.export_hf(model, torch.bfloat16, tmp_path / "kept-hf", tiny_llama)
    for layout in ("trtllm", "hf"):
        for written in sorted((tmp_path / f"copy-{layout}").iterdir()):
            assert (tmp_path / f"kept-{layout}" / written.name).read_bytes() == written.read_bytes(), written.name


def test_gates_score_the_checkpoint_through_the_emulation_here(fp8_build):
    import numpy as np

    out, _ = fp8_build
    assert modelopt.accuracy_unavailable_reason(out) is None
    assert modelopt.runtime_name(out).startswith("emulated:trtllm checkpoint FP8 + fp8 e4m3 KV cache")
    assert "TensorRT-LLM is not installed" in modelopt.speed_unavailable_reason(out)
    with modelopt.open_session(out, 1, -1) as session:
        (logits,) = session.window_logits(np.array([[1, 2, 3, 4, 5]]))
        assert session.device == "cpu"  # no CUDA here
        assert session.runtime == modelopt.runtime_name(out)
    assert logits.shape == (5, 130) and np.isfinite(logits).all()
    assert 0 < modelopt.bits_per_weight(out) < 16
    kv = modelopt.decode_bytes_per_token(out, 100)["kv_cache"]
    assert kv == 2 * 2 * 2 * 16 * 1 * 100  # layers x (K, V) x kv heads x head dim x 1 byte (fp8) x tokens


def test_generation_through_the_emulation_with_its_fp8_kv_cache_follows_the_argmax_of_its_logits(fp8_build):
    out, _ = fp8_build
    session = modelopt.open_session(out, 1, -1)
    (produced,) = session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[])
    assert len(produced) == 5
    sequence = [1, 2, 3]
    for token in produced:
        (logits,) = session.window_logits([sequence])
        assert token == int(logits[-1].argmax())  # a KV cache cast as the whole window's is
        sequence.append(token)


def test_a_gap_over_the_limit_fails_the_build(tiny_llama, tmp_path, monkeypatch):
    """With a stand-in emulation far from the fake-quant model, the build refuses. (That the
    emulation does see a wrong file, on the real model, is in tests/test_pipeline.py.)"""
    from pipeline.errors import QpipeError

    monkeypatch.setattr(modelopt, "emulated_ppl", lambda checkpoint, windows, threads: 1e6)
    with pytest.raises(QpipeError, match="does not compute what ModelOpt calibrated: emulated ppl 1000000") as info:
        modelopt.build(recipe(config="INT8_WEIGHT_ONLY_CFG", calibration_samples=1, calibration_seq_len=32,
                              crosscheck_windows=1),
                       source_dir=tiny_llama, calibration_text=tiny_llama.parent / "calibration.txt",
                       out_dir=tmp_path, threads=1, log=lambda _: None)
    assert "limit 1.00 %" in info.value.what and info.value.where.endswith("max_crosscheck_ppl_gap")


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
