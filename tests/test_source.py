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


def word_tokenizer(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "def", "f(x):", "return", "x"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(root)


TINY_LLAMA = {"vocab_size": 5, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


def checkpoint(tmp_path, model_type="llama", **files):
    """A 2-layer Llama of random weights in one safetensors file (its config.json saying another
    `model_type` where asked) and a word-level tokenizer that loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path / "ckpt"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(root)
    if model_type != "llama":
        write(root / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": model_type}))
    word_tokenizer(root)
    for name, text in files.items():
        write(root / name, text)
    return root


def latin1_config(root):
    """config.json with a non-ASCII value, written in Latin-1."""
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_bytes(json.dumps({**config, "_name_or_path": "café"}, ensure_ascii=False)
                                       .encode("latin-1"))


def run(tmp_path, path):
    return source.run(str(path), None, tmp_path / "out", log=lambda _: None)


def refused(tmp_path, path, match):
    with pytest.raises(BadInput, match=match) as info:
        run(tmp_path, path)
    assert not (tmp_path / "out").exists(), "nothing may be left half-written"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return info.value


def test_local_checkpoint_is_copied_with_hashes(tmp_path):
    info = run(tmp_path, checkpoint(tmp_path))
    assert info["origin"]["kind"] == "local"
    assert set(info["files"]) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"}
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


@pytest.mark.parametrize("index, message", [
    ("not json", "the safetensors index is not a JSON object with a weight_map"),
    ('{"metadata": {}}', r"with a weight_map of tensor -> shard \(KeyError\)"),
    ('{"weight_map": ["model.safetensors"]}', r"\(AttributeError\)"),
])
def test_an_index_that_is_not_a_weight_map_is_refused(tmp_path, index, message):
    error = refused(tmp_path, checkpoint(tmp_path, **{"model.safetensors.index.json": index}), message)
    assert error.where.endswith("model.safetensors.index.json")


def test_a_config_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    root = checkpoint(tmp_path)
    latin1_config(root)
    error = refused(tmp_path, root, "not UTF-8 text: byte 0xe9 at byte offset")
    assert error.where.endswith("config.json")


def test_an_architecture_transformers_does_not_know_is_refused(tmp_path):
    error = refused(tmp_path, checkpoint(tmp_path, model_type="nolm"), "does not know model_type 'nolm'")
    assert error.where.endswith("config.json: model_type") and "transformers" in error.fix


def test_a_model_without_a_causal_lm_is_refused(tmp_path):
    error = refused(tmp_path, checkpoint(tmp_path, model_type="vit"), "no causal language model")
    assert error.where.endswith("config.json: model_type")


def test_a_checkpoint_without_a_tokenizer_is_refused(tmp_path):
    root = checkpoint(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).unlink()
    error = refused(tmp_path, root, "no tokenizer")
    assert "tokenizer.json" in error.fix


def test_a_tokenizer_that_does_not_load_is_refused(tmp_path):
    root = checkpoint(tmp_path)
    (root / "tokenizer.json").write_text("{}")
    refused(tmp_path, root, "the tokenizer does not load")


def pickled_weights(tmp_path, **files):
    root = checkpoint(tmp_path)
    (root / "model.safetensors").unlink()
    for name, payload in files.items():
        (root / name).write_bytes(payload)
    return root


def test_bin_weights_load_with_weights_only(tmp_path):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    info = run(tmp_path, pickled_weights(tmp_path, **{"pytorch_model.bin": buffer.getvalue()}))
    assert "pytorch_model.bin" in info["files"]


def test_garbage_bin_weights_are_refused(tmp_path):
    error = refused(tmp_path, pickled_weights(tmp_path, **{"pytorch_model.bin": b"\x80\x02garbage" * 10}),
                    "does not load as plain weights")
    assert error.where.endswith("pytorch_model.bin") and "safetensors" in error.fix


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_weights_that_would_run_code_are_refused_without_running_it(tmp_path):
    import io

    import torch

    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"w": RunsCode(marker)}, buffer)
    refused(tmp_path, pickled_weights(tmp_path, **{"pytorch_model.bin": buffer.getvalue()}),
            "does not load as plain weights")
    assert not marker.exists()


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


def with_config(root, **changes):
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, **changes}))
    return root


def test_a_config_whose_sizes_disagree_with_the_weights_names_the_tensor_both_shapes_and_the_key(tmp_path):
    size = TINY_LLAMA["intermediate_size"]
    error = refused(tmp_path, with_config(checkpoint(tmp_path), intermediate_size=2 * size),
                    rf"is \[{TINY_LLAMA['hidden_size']}, {size}\] in the weights, but config.json makes it "
                    rf"\[{TINY_LLAMA['hidden_size']}, {2 * size}\] \(intermediate_size = {2 * size}\)")
    assert "mlp.down_proj.weight" in error.what and error.where.endswith("config.json: intermediate_size")


def test_the_key_behind_a_size_is_found_by_what_moves_it_not_by_an_equal_value(tmp_path):
    heads = TINY_LLAMA["num_attention_heads"]  # q_proj's rows are heads x head_dim = 16 = hidden_size here
    error = refused(tmp_path, with_config(checkpoint(tmp_path), num_attention_heads=2 * heads), "makes it")
    assert error.where.endswith("config.json: num_attention_heads, head_dim"), error.where
    assert "hidden_size" not in error.where


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": TINY_LLAMA["num_hidden_layers"] + 1}, "the weights lack tensor model.layers.2."),
    ({"num_hidden_layers": TINY_LLAMA["num_hidden_layers"] - 1}, "the weights hold tensor model.layers.1."),
])
def test_layers_the_config_counts_otherwise_than_the_weights_are_refused(tmp_path, changes, message):
    error = refused(tmp_path, with_config(checkpoint(tmp_path), **changes), message)
    assert error.where.endswith("config.json") and "num_hidden_layers" in error.fix


def rewrite_weights(root, rename=lambda name: name, drop=()):
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "model.safetensors")
    save_file({rename(name): tensor for name, tensor in tensors.items() if name not in drop},
              root / "model.safetensors", metadata={"format": "pt"})
    return root


def test_a_tied_output_layer_and_tensors_without_the_base_models_prefix_are_accepted(tmp_path):
    root = rewrite_weights(with_config(checkpoint(tmp_path), tie_word_embeddings=True), drop={"lm_head.weight"},
                           rename=lambda name: name.removeprefix("model."))
    assert run(tmp_path, root)["model_type"] == "llama"


def test_an_untied_output_layer_missing_from_the_weights_is_refused(tmp_path):
    root = rewrite_weights(checkpoint(tmp_path), drop={"lm_head.weight"})
    refused(tmp_path, root, rf"the weights lack tensor lm_head.weight \[{TINY_LLAMA['vocab_size']}, "
                            rf"{TINY_LLAMA['hidden_size']}\].*tie_word_embeddings False")
