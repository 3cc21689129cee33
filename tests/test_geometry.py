import pytest

from pipeline.geometry import Geometry, sliding_attention

# the shapes of Qwen3-0.6B and Gemma 2 2B, whose head_dim is not hidden_size / heads
QWEN3 = {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "num_hidden_layers": 28, "vocab_size": 151936, "sliding_window": None,
         "use_sliding_window": False}
GEMMA2 = {"model_type": "gemma2", "hidden_size": 2304, "num_attention_heads": 8, "num_key_value_heads": 4,
          "head_dim": 256, "num_hidden_layers": 26, "vocab_size": 256000, "sliding_window": 4096}


def test_kv_cache_bytes_count_k_and_v_per_layer():
    # 30 layers x (K and V) x 3 KV heads x 64 dims x 2 bytes x 576 tokens: SmolLM2-135M
    smollm2 = Geometry(layers=30, kv_heads=3, head_dim=64)
    assert smollm2.kv_cache_bytes(576) == 30 * 2 * 3 * 64 * 2 * 576
    assert Geometry(layers=1, kv_heads=1, head_dim=1).kv_cache_bytes(10, bytes_per_value=1) == 20
    # a q8_0 K cache (34 bytes a 32-value block) beside a q4_0 V cache (18 bytes)
    assert smollm2.kv_cache_bytes(576, 34 / 32, 18 / 32) == 30 * 3 * 64 * (34 + 18) / 32 * 576


def test_head_dim_is_the_configs_own_where_it_sets_one():
    assert Geometry.from_hf_config(QWEN3) == Geometry(layers=28, kv_heads=8, head_dim=128)
    assert Geometry.from_hf_config(GEMMA2).head_dim == 256  # not 2304 / 8 = 288
    llama = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
    assert Geometry.from_hf_config(llama) == Geometry(layers=30, kv_heads=3, head_dim=64)
    assert Geometry.from_hf_config({"text_config": QWEN3}).head_dim == 128  # a multimodal config's decoder


def test_a_sliding_layer_reads_at_most_its_window():
    gemma2 = Geometry.from_hf_config(GEMMA2)
    assert gemma2.sliding_layers[:4] == (True, False, True, False)
    per_token_layer = 2 * 4 * 256 * 2
    assert gemma2.kv_cache_bytes(512) == 26 * per_token_layer * 512
    assert gemma2.kv_cache_bytes(8192) == 13 * per_token_layer * 8192 + 13 * per_token_layer * 4096


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "mistral", "sliding_window": 256, "num_hidden_layers": 3}, (256, (True, True, True))),
    ({"model_type": "mistral", "sliding_window": None, "num_hidden_layers": 3}, (None, ())),
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": False, "num_hidden_layers": 3}, (None, ())),
    ({"model_type": "gemma3_text", "sliding_window": 512, "num_hidden_layers": 7},
     (512, (True, True, True, True, True, False, True))),
    ({"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}, (64, (True, False))),
])
def test_sliding_layers_follow_the_model_as_transformers_builds_it(config, expected):
    assert sliding_attention(config) == expected


def gguf_metadata(arch: str, **values) -> dict:
    return {"general.architecture": arch, **{f"{arch}.{key}": value for key, value in values.items()}}


def test_from_a_gguf_header_head_dim_is_its_key_length():
    qwen3 = gguf_metadata("qwen3", block_count=28, embedding_length=1024, **{
        "attention.head_count": 16, "attention.head_count_kv": 8, "attention.key_length": 128})
    assert Geometry.from_gguf(qwen3) == Geometry(layers=28, kv_heads=8, head_dim=128)  # not 1024 / 16 = 64
    llama = gguf_metadata("llama", block_count=30, embedding_length=576, **{
        "attention.head_count": 9, "attention.head_count_kv": 3})
    assert Geometry.from_gguf(llama) == Geometry(layers=30, kv_heads=3, head_dim=64)


def test_a_gguf_gemma_slides_as_llama_cpp_computes_it_and_a_mistral_does_not():
    gemma3 = gguf_metadata("gemma3", block_count=12, embedding_length=2560, **{
        "attention.head_count": 8, "attention.head_count_kv": 4, "attention.key_length": 256,
        "attention.sliding_window": 1024})
    geometry = Geometry.from_gguf(gemma3)
    assert geometry.head_dim == 256 and geometry.sliding_window == 1024  # not 2560 / 8 = 320
    assert [index for index, sliding in enumerate(geometry.sliding_layers) if not sliding] == [5, 11]
    # llama.cpp converts Mistral as `llama`, which attends to every earlier token
    mistral = gguf_metadata("llama", block_count=2, embedding_length=256, **{
        "attention.head_count": 4, "attention.sliding_window": 64})
    assert Geometry.from_gguf(mistral).sliding_window is None
