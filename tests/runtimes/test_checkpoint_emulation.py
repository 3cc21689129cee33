import json

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.runtimes import checkpoint_emulation as emulation


def test_fp8_dequantization_of_hand_made_codes():
    # e4m3 represents these exactly: 1.5 = 1.1b x 2^0, -448 = the largest magnitude, 0.015625 = 2^-6
    codes = torch.tensor([[1.5, -448.0], [0.015625, 2.0]]).to(torch.float8_e4m3fn)
    assert emulation.dequantize(codes, torch.tensor([0.5])).tolist() == [[0.75, -224.0], [0.0078125, 1.0]]


def test_int8_dequantization_uses_one_scale_per_output_channel():
    codes = torch.tensor([[127, -128, 3], [1, 0, -1]], dtype=torch.int8)
    scales = torch.tensor([0.5, 2.0])
    assert emulation.dequantize(codes, scales).tolist() == [[63.5, -64.0, 1.5], [2.0, 0.0, -2.0]]


def test_fp8_input_quantization_saturates_and_rounds_to_e4m3():
    x = torch.tensor([1000.0, 1.06, -3.3, 0.0])
    # scale 1: 1000 saturates at 448; 1.06 -> 1.0 and -3.3 -> -3.25 (3 mantissa bits)
    assert emulation.fake_quantize_fp8(x, torch.tensor([1.0])).tolist() == [448.0, 1.0, -3.25, 0.0]
    assert emulation.fake_quantize_fp8(x, torch.tensor([2.0])).tolist() == [896.0, 1.0, -3.25, 0.0]


def test_int8_input_quantization_rounds_half_to_even_and_clamps():
    x = torch.tensor([2.5, 3.5, -1000.0, 1000.0, 0.26])
    result = emulation.fake_quantize_int8(x, torch.tensor([1.0])).tolist()
    assert result[:4] == [2.0, 4.0, -128.0, 127.0]
    assert result[4] == 0.0
    assert emulation.fake_quantize_int8(torch.tensor([0.26]), torch.tensor([0.1])).tolist() == pytest.approx([0.3])


def test_smoothquant_linear_multiplies_by_the_smoothing_vector_before_quantizing():
    codes = torch.tensor([[1, 1]], dtype=torch.int8)
    linear = emulation.EmulatedLinear(codes, torch.tensor([1.0]), input_format="int8", input_scale=torch.tensor([1.0]),
                                      smoothing=torch.tensor([2.0, 0.5]), out_dtype=torch.float32)
    # x * s = [3.0, 1.0] -> int8 codes [3, 1] -> 4.0; without smoothing it would be 1.5 + 2 -> 2 + 2
    assert linear(torch.tensor([[1.5, 2.0]])).tolist() == [[4.0]]


def trtllm_config(tmp_path, **quantization):
    config = {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "vocab_size": 10, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_size": 4, "norm_epsilon": 1e-5, "hidden_act": "silu", "max_position_embeddings": 64,
              "position_embedding_type": "rope_gpt_neox", "rotary_base": 100000.0, "mapping": {"world_size": 1},
              "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, **quantization}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_unknown_quant_algo_is_refused_not_guessed(tmp_path):
    with pytest.raises(BadInput, match="quant_algo 'W4A16_AWQ' is not one the emulation knows") as info:
        emulation.read_config(trtllm_config(tmp_path, quant_algo="W4A16_AWQ"))
    assert info.value.exit_code == 2 and "config.json: quantization" in info.value.where
    with pytest.raises(BadInput, match="kv_cache_quant_algo 'INT8'"):
        emulation.read_config(trtllm_config(tmp_path, kv_cache_quant_algo="INT8"))


HF_CONFIG = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
             "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}


def test_the_trtllm_config_must_state_the_models_rope(tmp_path):
    config_dir = trtllm_config(tmp_path)
    assert emulation.read_config(config_dir, HF_CONFIG)["head_dim"] == 4  # agrees: accepted
    config = json.loads((config_dir / "config.json").read_text())
    del config["rotary_base"]  # TensorRT-LLM then assumes 10000
    (config_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="rotary_base is 10000.0, the model's is 100000.0"):
        emulation.read_config(config_dir, HF_CONFIG)
    llama3 = {**HF_CONFIG, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}}
    with pytest.raises(BadInput, match="rotary_scaling is None, the model's is 'llama3'"):
        emulation.read_config(config_dir, llama3)


def test_a_directory_without_modelopt_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(BadInput, match="not a ModelOpt checkpoint"):
        emulation.read_config(tmp_path)


def test_fused_qkv_splits_rows_and_keeps_shared_scales():
    facts = {"layout": "trtllm", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    qkv = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    per_channel = torch.arange(16, dtype=torch.float32)
    tensors = {
        "transformer.layers.0.attention.qkv.weight": qkv,
        "transformer.layers.0.attention.qkv.weights_scaling_factor": per_channel,
        "transformer.layers.0.attention.qkv.activation_scaling_factor": torch.tensor([0.5]),
        "transformer.layers.0.mlp.fc.weight": torch.zeros(3, 8),
        "transformer.layers.0.mlp.gate.weight": torch.ones(3, 8),
        "transformer.layers.0.attention.kv_cache_scaling_factor": torch.tensor([1.0]),
        "transformer.layers.0.post_layernorm.weight": torch.ones(8),
    }
    plain, linears, kv_scales = emulation.layer_tensors(tensors, facts)
    attention = "model.layers.0.self_attn"
    assert torch.equal(linears[f"{attention}.q_proj"]["weight"], qkv[:8])
    assert torch.equal(linears[f"{attention}.k_proj"]["weight"], qkv[8:12])
    assert torch.equal(linears[f"{attention}.v_proj"]["weight_scale"], per_channel[12:])
    assert linears[f"{attention}.v_proj"]["input_scale"].item() == 0.5
    # TensorRT-LLM's mlp.fc goes through the activation (HF gate_proj); mlp.gate is HF up_proj
    assert linears["model.layers.0.mlp.gate_proj"]["weight"].sum() == 0
    assert linears["model.layers.0.mlp.up_proj"]["weight"].sum() == 24
    assert list(plain) == ["model.layers.0.post_attention_layernorm.weight"]
    assert kv_scales == {0: {"kv": torch.tensor([1.0])}}


def test_unexpected_tensor_is_refused():
    facts = {"layout": "trtllm", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    with pytest.raises(BadInput, match="unexpected tensor transformer.layers.0.attention.alibi"):
        emulation.layer_tensors({"transformer.layers.0.attention.alibi": torch.zeros(1)}, facts)


def test_kv_cache_scales_are_read_as_tensorrt_llm_reads_them():
    k, v, kv = torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([5.0])
    assert emulation.kv_scale_pair({"k": k, "v": v, "kv": kv}, "trtllm") == {"k": kv, "v": kv}
    assert emulation.kv_scale_pair({"k": k, "v": v}, "trtllm") == {"k": v, "v": v}  # the max, shared
    assert emulation.kv_scale_pair({"k": k, "v": v}, "hf") == {"k": k, "v": v}
