import json

import pytest

from pipeline import memory
from pipeline.formats import modelopt
from pipeline.errors import HostLacks

# Llama-3.1-8B's config.json, the fields that size it
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
}


@pytest.fixture
def llama_8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return memory.ModelSize.of(tmp_path)


def test_the_size_comes_from_the_config_without_weights(llama_8b):
    assert llama_8b.parameters == 8_030_261_248 and llama_8b.vocabulary == 128256
    assert llama_8b.largest_tensor == 128256 * 4096  # the embedding (and the untied output layer)


def test_a_gguf_build_needs_its_largest_tensor_and_with_an_imatrix_the_whole_f16_model(llama_8b):
    from pipeline.formats import gguf

    plain = gguf.Recipe(format="gguf", type="Q8_0")
    with_imatrix = gguf.Recipe(format="gguf", type="IQ4_XS", imatrix=True)
    converter = memory.estimate(gguf.INFO.build_memory, llama_8b, window_tokens=0)
    need = memory.Need(plain.build_memory(gguf.INFO.build_memory), llama_8b, window_tokens=0, dtype="float16")
    assert need.bytes == converter < 5e9  # one tensor at a time, whatever the depth: 3.8 GB measured
    imatrix_need = need._replace(factors=with_imatrix.build_memory(gguf.INFO.build_memory))
    assert imatrix_need.bytes == memory.estimate(gguf.IMATRIX_MEMORY, llama_8b, window_tokens=0, dtype="float16")
    assert imatrix_need.bytes > 2 * llama_8b.parameters  # llama-imatrix maps the whole f16 GGUF
    # where the embedding outweighs the layers, the converter's phase is the larger one
    embedding_heavy = memory.ModelSize(parameters=300_000_000, vocabulary=262_144, largest_tensor=262_144 * 1152)
    phases = with_imatrix.build_memory(gguf.INFO.build_memory)
    assert memory.Need(phases, embedding_heavy, window_tokens=0, dtype="float16").bytes == memory.estimate(
        gguf.INFO.build_memory, embedding_heavy, window_tokens=0)


def test_a_modelopt_build_that_writes_the_legacy_checkpoint_has_its_own_factors():
    from pipeline.formats import modelopt

    for config, factors in (("FP8_DEFAULT_CFG", modelopt.INFO.build_memory),
                            ("NVFP4_DEFAULT_CFG", modelopt.INFO.build_memory),
                            ("INT8_SMOOTHQUANT_CFG", modelopt.LEGACY_EXPORT_MEMORY),
                            ("INT8_WEIGHT_ONLY_CFG", modelopt.LEGACY_EXPORT_MEMORY)):
        assert modelopt.Recipe(format="modelopt", config=config).build_memory(modelopt.INFO.build_memory) == factors


def test_an_8b_fp32_reference_needs_about_34_gb_and_bf16_about_half(llama_8b):
    fp32 = memory.estimate(memory.REFERENCE, llama_8b, window_tokens=512, dtype="float32")
    bf16 = memory.estimate(memory.REFERENCE, llama_8b, window_tokens=512, dtype="bfloat16")
    assert 33e9 < fp32 < 36e9
    assert 17e9 < bf16 < 19e9


def test_the_source_stage_count_is_used_where_there_is_one(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    (tmp_path / "source.json").write_text(json.dumps({"parameters": 494_032_768, "largest_tensor": 136_134_656}))
    assert memory.ModelSize.of(tmp_path) == memory.ModelSize(494_032_768, 151936, 136_134_656)


def test_a_stage_that_does_not_fit_refuses_with_its_estimate_and_the_fix(llama_8b, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 24 * 10**9)
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    need = memory.Need(memory.REFERENCE, llama_8b, window_tokens=512, dtype="float32")
    with pytest.raises(HostLacks) as info:
        memory.ensure_fits(need, stage="the reference in float32", fix="set reference.dtype: bfloat16")
    assert info.value.exit_code == 3
    assert f"needs about {need.bytes / 1e9:.1f} GB" in info.value.what and "24.0 GB free" in info.value.what
    assert "reference.dtype: bfloat16" in info.value.fix and memory.SKIP_ENV in info.value.fix
    fits = memory.ensure_fits(need._replace(dtype="bfloat16"), stage="the reference", fix="-")
    assert fits["available_gb"] == 24.0 and fits["estimate_gb"] == round(need._replace(dtype="bfloat16").bytes / 1e9, 2)


def test_a_stage_records_what_its_estimate_is_made_of(llama_8b, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": None)
    need = memory.Need(memory.REFERENCE, llama_8b, window_tokens=512, dtype="bfloat16", mapped_bytes=7)
    record = memory.ensure_fits(need, stage="the reference", fix="-")
    assert record["inputs"] == {"parameters": 8_030_261_248, "vocabulary": 128256, "largest_tensor": 128256 * 4096,
                                "window_tokens": 512, "dtype": "bfloat16", "mapped_bytes": 7, "device": "cpu"}
    inputs = dict(record["inputs"])
    size = memory.ModelSize(inputs.pop("parameters"), inputs.pop("vocabulary"), inputs.pop("largest_tensor"))
    remade = memory.Need(memory.REFERENCE, size, **inputs)
    assert remade.bytes == need.bytes and round(remade.bytes / 1e9, 2) == record["estimate_gb"]


def test_the_check_can_be_skipped_where_the_estimate_is_wrong(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**9)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    two_gb = memory.Need(memory.Factors(2 * 10**9, 0.0, 0.0), memory.ModelSize(1, 1), window_tokens=0)
    assert memory.ensure_fits(two_gb, stage="s", fix="-")["estimate_gb"] == 2.0


def test_this_host_reports_its_available_memory():
    have = memory.available_bytes()
    assert have is None or have > 0


def test_the_reference_refuses_before_loading_and_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    import shutil

    from pipeline import reference
    from pipeline.config import ReferenceParams

    text = tmp_path / "evaluation.txt"
    text.write_text((tiny_llama.parent / "calibration.txt").read_text())
    source = shutil.copytree(tiny_llama, tmp_path / "source")
    (source / "source.json").write_text(json.dumps({"origin": {}, "files": {}}))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    with pytest.raises(HostLacks, match="the reference in float32 needs about"):
        reference.run(ReferenceParams(windows=2, window_tokens=16), source, text, tmp_path / "out",
                      log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_on_a_gpu_only_the_weights_and_a_window_of_logits_are_required(llama_8b):
    gpu = memory.estimate(modelopt.INFO.build_memory, llama_8b, window_tokens=512, dtype="bfloat16", device="cuda")
    assert gpu == 2 * llama_8b.parameters + 8 * 512 * llama_8b.vocabulary  # 16.6 GB: an 80 GB GPU holds it
    assert memory.estimate(modelopt.INFO.build_memory, llama_8b, window_tokens=512) > 1.25 * gpu  # host copies
