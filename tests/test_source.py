import json
import struct

import pytest

from pipeline import source
from pipeline.errors import BadInput
from tests.conftest import write


def safetensors_file(path, payload=b"\x00" * 16, declared_end=16):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, declared_end]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


def checkpoint(tmp_path, **files):
    root = tmp_path / "ckpt"
    root.mkdir()
    write(root / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    safetensors_file(root / "model.safetensors")
    for name, text in files.items():
        write(root / name, text)
    return root


def run(tmp_path, path):
    return source.run(str(path), None, tmp_path / "out", log=lambda _: None)


def refused(tmp_path, path, match):
    with pytest.raises(BadInput, match=match) as info:
        run(tmp_path, path)
    assert not (tmp_path / "out").exists(), "nothing may be left half-written"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return info.value


def test_local_checkpoint_is_copied_with_hashes(tmp_path):
    info = run(tmp_path, checkpoint(tmp_path, **{"tokenizer.json": "{}"}))
    assert info["origin"]["kind"] == "local"
    assert set(info["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert json.loads((tmp_path / "out" / "source.json").read_text())["files"] == info["files"]


def test_missing_directory(tmp_path):
    error = refused(tmp_path, tmp_path / "no-such-dir", "not found")
    assert "model.source" in error.where


def test_directory_without_config(tmp_path):
    root = checkpoint(tmp_path)
    (root / "config.json").unlink()
    refused(tmp_path, root, "no config.json")


def test_directory_without_weights(tmp_path):
    root = checkpoint(tmp_path)
    (root / "model.safetensors").unlink()
    refused(tmp_path, root, "no weights")


def test_truncated_safetensors(tmp_path):
    root = checkpoint(tmp_path)
    safetensors_file(root / "model.safetensors", payload=b"\x00" * 8, declared_end=16)
    error = refused(tmp_path, root, "truncated")
    assert error.where.endswith("model.safetensors")


def test_corrupt_safetensors_header(tmp_path):
    root = checkpoint(tmp_path)
    (root / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at!" + b"\x00" * 8)
    refused(tmp_path, root, "corrupt safetensors")


def test_index_naming_a_missing_shard(tmp_path):
    root = checkpoint(tmp_path, **{"model.safetensors.index.json": json.dumps({"weight_map": {"w": "model-2.safetensors"}})})
    refused(tmp_path, root, "model-2.safetensors")


def test_hub_id_while_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = refused(tmp_path, "some-org/some-model", "could not be downloaded")
    assert "offline" in error.what


def test_unknown_embedded_model(tmp_path):
    refused(tmp_path, "embedded:gpt-5", "unknown embedded model")


def test_embedded_tokenizer_splits_text_exactly_as_llama_cpp():
    """The tokenizer rebuilt from the embedded GGUF agrees with llama.cpp's own tokenizer."""
    from pipeline.runtimes.llama_cpp import tokenize

    gguf_path = source.embedded_gguf("smollm2-135m")
    tokenizer = source.tokenizer_from_gguf(gguf_path)
    text = "Hello world, 12345 times!\n\n  def f(x):\n\treturn x**2  # ünïcödé\n    1\nTab\t\t7"
    assert tokenizer(text, add_special_tokens=False).input_ids == tokenize(gguf_path, text)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert "im_start" in tokenizer.chat_template
