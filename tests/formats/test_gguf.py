import numpy as np
import pytest

from pipeline.formats import gguf as fmt
from pipeline.source import embedded_gguf


def test_load_imatrix_divides_sums_by_counts(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "imatrix.gguf", arch="imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([[2.0, 4.0, 6.0]], dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[2.0]], dtype=np.float32))
    # two experts, the second never hit: llama-quantize uses 1.0 there
    writer.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.array([[3.0, 3.0], [5.0, 5.0]], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[3.0, 0.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    importance = fmt.load_imatrix(tmp_path / "imatrix.gguf")
    np.testing.assert_allclose(importance["blk.0.attn_q.weight"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(importance["blk.0.ffn_up_exps.weight"], [1.0, 1.0, 1.0, 1.0])
    assert importance["blk.0.attn_q.weight"].dtype == np.float32


def test_vendored_commit_is_read_from_the_changelog_section():
    changelog = "## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n## [0.3.35]\n- llama.cpp@4df29be4f\n"
    assert fmt._vendored_commit(changelog, "0.3.36") == "0c1e57098"
    assert fmt._vendored_commit(changelog, "0.3.99") is None


@pytest.fixture
def embedded_build(tmp_path):
    (tmp_path / fmt.ARTIFACT_FILE).symlink_to(embedded_gguf("smollm2-135m"))
    return tmp_path


def test_tensor_type_mix_of_a_real_file(embedded_build):
    mix = fmt.tensor_type_mix(embedded_build / fmt.ARTIFACT_FILE)
    assert mix["weights"] == 134_515_008
    assert "Q4_1" in mix["tensors"] and "F32" in mix["tensors"]
    assert sum(mix["tensors"].values()) == 272
    assert 4.5 < mix["bits_per_weight"] < 6.5
    assert sum(mix["byte_share"].values()) == pytest.approx(1, abs=1e-3)


def test_decode_bytes_per_token_counts_tied_embedding_and_kv_cache(embedded_build):
    mix = fmt.tensor_type_mix(embedded_build / fmt.ARTIFACT_FILE)
    read = fmt.decode_bytes_per_token(embedded_build, context_tokens=100)
    # tied embeddings (no output.weight): the whole token_embd matrix is read for the logits
    assert read["weights"] == mix["tensor_bytes"]
    # 30 layers x (K and V) x 3 kv heads x 64 dims x 2 bytes x 100 positions
    assert read["kv_cache"] == 30 * 2 * 3 * 64 * 2 * 100
    assert read["total"] == read["weights"] + read["kv_cache"]


def test_decode_bytes_per_token_count_the_kv_cache_in_its_own_types(embedded_build):
    import json

    (embedded_build / "build.json").write_text(json.dumps({"kv_cache": {"k": "q8_0", "v": "q4_0"}}))
    read = fmt.decode_bytes_per_token(embedded_build, context_tokens=100)
    # per layer, position and KV head: 64 K values in q8_0 blocks (34 bytes / 32), 64 V values in q4_0 (18 / 32)
    assert read["kv_cache"] == 30 * 3 * (64 * 34 / 32 + 64 * 18 / 32) * 100


def test_kv_cache_types_are_llama_cpps_and_default_to_f16():
    from pydantic import ValidationError

    recipe = fmt.Recipe(format="gguf", type="q4_k_m")
    assert recipe.cache_types() == {"k": "f16", "v": "f16"}
    assert fmt.Recipe(format="gguf", type="Q8_0", kv_cache="Q8_0").cache_types() == {"k": "q8_0", "v": "q8_0"}
    assert fmt.Recipe(format="gguf", type="Q8_0", kv_cache="q8_0", kv_cache_v="q4_0").cache_types() == \
        {"k": "q8_0", "v": "q4_0"}
    with pytest.raises(ValidationError, match="unknown KV-cache type 'q4_k'; llama.cpp's: f32, f16"):
        fmt.Recipe(format="gguf", type="Q8_0", kv_cache="q4_k")



def test_the_kv_cache_types_are_the_ones_llama_cpps_tools_allow():
    import re
    import subprocess

    from pipeline.runtimes.llama_cpp import ggml_type

    binary, env = fmt.llama_tool("llama-perplexity")
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env)
    allowed = re.search(r"-ctk,.*\n.*allowed values: ([^\n]*)", usage.stdout + usage.stderr)
    assert allowed and tuple(allowed.group(1).strip().rstrip(")").split(", ")) == fmt.KV_CACHE_TYPES
    assert [ggml_type(name) for name in ("f16", "q8_0", "q4_0")] == [1, 8, 2]  # ggml.h's GGML_TYPE_* ids


@pytest.mark.parametrize("head_dim, cache_type, refused", [(96, "q8_0", False), (80, "q4_0", True),
                                                           (80, "f16", False)])
def test_a_cache_type_whose_blocks_do_not_tile_a_head_is_refused_before_converting(tmp_path, head_dim, cache_type,
                                                                                   refused):
    import json

    from pipeline.errors import RecipeNotApplicable

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_hidden_layers": 2,
                                                      "hidden_size": 8 * head_dim}))
    recipe = fmt.Recipe(format="gguf", type="Q8_0", kv_cache_v=cache_type)
    if not refused:
        fmt.check_cache_types(recipe, tmp_path)
        return
    with pytest.raises(RecipeNotApplicable, match=f"a {cache_type} V cache stores blocks of 32 values, which do "
                       f"not tile this model's {head_dim}-value attention heads") as info:
        fmt.check_cache_types(recipe, tmp_path)
    assert info.value.where.endswith("kv_cache")


def test_every_listed_quant_type_exists_in_llama_cpp():
    import llama_cpp

    for name in fmt.QUANT_TYPES:
        assert hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"), name


def test_llama_imatrix_tool_is_installed_and_runs():
    import subprocess

    binary, env = fmt.llama_tool("llama-imatrix")
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env)
    assert "imatrix" in (result.stdout + result.stderr)


def test_architecture_the_converter_does_not_support_is_refused(tmp_path):
    import json

    from pipeline.errors import RecipeNotApplicable

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NotARealModelForCausalLM"],
                                                      "model_type": "not_real"}))
    with pytest.raises(RecipeNotApplicable, match="does not support architecture NotARealModelForCausalLM") as info:
        fmt.convert(tmp_path, tmp_path / "out.gguf", "f16", fmt.converter_info()["path"])
    assert info.value.where.endswith("config.json: architectures")


def test_a_quantization_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from pipeline.errors import HostLacks, QpipeError

    source = tmp_path / "model-f16.gguf"
    source.write_bytes(b"GGUF" + bytes(4096))  # llama.cpp refuses it: the call fails with a code
    with pytest.raises(QpipeError, match="llama_model_quantize to Q8_0 failed") as plain:
        fmt.quantize(source, tmp_path / "model.gguf", "Q8_0", imatrix=None, threads=1, log_file=tmp_path / "q.log")
    assert not isinstance(plain.value, HostLacks)  # with room on the disk it is the tool's failure
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 512, 512))
    with pytest.raises(HostLacks, match="no space left for the quantization to Q8_0: 0.0 MB free") as full:
        fmt.quantize(source, tmp_path / "model.gguf", "Q8_0", imatrix=None, threads=1, log_file=tmp_path / "q.log")
    assert full.value.exit_code == 3 and full.value.where == str(tmp_path)


@pytest.mark.parametrize("arch, embedding, heads, kv_heads, key_length", [
    ("qwen3", 1024, 16, 8, 128),   # Qwen3-0.6B: 1024 / 16 would be 64
    ("gemma2", 2304, 8, 4, 256),   # Gemma 2 2B: 2304 / 8 would be 288
])
def test_decode_bytes_per_token_take_head_dim_from_the_key_length(tmp_path, arch, embedding, heads, kv_heads,
                                                                     key_length):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / fmt.ARTIFACT_FILE, arch)
    writer.add_block_count(2)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(key_length)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = fmt.decode_bytes_per_token(tmp_path, context_tokens=100)
    assert read["kv_cache"] == 2 * 2 * kv_heads * key_length * 2 * 100


def test_tensor_types_are_validated_and_exclude_a_search():
    recipe = fmt.Recipe.model_validate({"format": "gguf", "type": "Q8_0", "tensor_types": {r"ffn_down": "q6_k"}})
    assert recipe.tensor_types == {"ffn_down": "Q6_K"}
    for bad, message in (({"tensor_types": {"(": "q8_0"}}, "not a regular expression"),
                         ({"tensor_types": {"x": "q9_9"}}, "unknown type"),
                         ({"tensor_types": {"x": "q8_0"}, "search": {"bits_per_weight": 5}}, "not both"),
                         ({"search": {"bits_per_weight": 5, "types": ["Q2_K"]}}, "not among the types the sensitivity")):
        with pytest.raises(ValueError, match=message):
            fmt.Recipe.model_validate({"format": "gguf", "type": "Q8_0", **bad})


def test_a_type_llama_cpp_did_not_write_fails_the_build(convertible_llama, tmp_path):
    """Q4_K's 256-blocks do not tile the model's 96-wide attention rows: llama.cpp falls back,
    and reading the file back catches it."""
    from pipeline.errors import ToolFailed

    recipe = fmt.Recipe.model_validate({"format": "gguf", "type": "Q8_0",
                                        "tensor_types": {r"^blk\.0\.ffn_down\.weight$": "q5_0",
                                                         r"attn_q\.weight$": "q4_k"}})
    with pytest.raises(ToolFailed, match=r"blk\.0\.attn_q\.weight is \w+, not Q4_K"):
        fmt.build(recipe, source_dir=convertible_llama, calibration_text=convertible_llama.parent / "calibration.txt",
                  out_dir=tmp_path, threads=1, log=lambda _: None)


def test_tensor_types_the_rows_take_are_written_as_asked(convertible_llama, tmp_path):
    from pipeline.runtimes.llama_cpp import read_header

    recipe = fmt.Recipe.model_validate({"format": "gguf", "type": "Q8_0",
                                        "tensor_types": {r"^blk\.0\.ffn_down\.weight$": "q5_0",
                                                         r"ffn_down": "q4_k", r"^token_embd": "f16",
                                                         r"norm": "q8_0"}})   # 1-D: llama.cpp keeps them f32
    facts = fmt.build(recipe, source_dir=convertible_llama, calibration_text=convertible_llama.parent / "calibration.txt",
                      out_dir=tmp_path, threads=1, log=lambda _: None)
    types = {t.name: t.type.upper() for t in read_header(tmp_path / fmt.ARTIFACT_FILE).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_0", "Q4_K")
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert facts["fallback"]["tensor_types_matched"] == 3
