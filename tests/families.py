"""Tiny random-weight checkpoints of every common decoder family, made offline.

Each is 2 layers (Gemma 3: 6, its own five-sliding-to-one-global pattern) of its family's own transformers config, with the feature that sets the
family apart switched on (GQA and `llama3` RoPE scaling, q/k/v bias, q/k norms, a sliding
window shorter than a test window, Gemma's norm offset, embedding scale, soft-capping and
sliding/global layers, Phi-3's fused projections). Widths are multiples of 256, so that
llama.cpp's K-quants apply without fallback and AWQ's group size 64 divides every layer.

The tokenizer is one SentencePiece model (BPE, byte fallback) trained here on CPython's pydoc
text. llama.cpp's converter reads tokenizer.model for every one of these families, so it
needs no hub-registered pre-tokenizer hash; transformers converts it with its Llama tokenizer
class (the tokenizer class does not change the model's arithmetic).
"""

from __future__ import annotations

import shutil
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, LAYERS = 256, 512, 4, 64, 2
VOCAB = 1000


def _common(kv_heads: int = 2, **extra) -> dict:
    return {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": kv_heads, "head_dim": HEAD_DIM,
            "vocab_size": VOCAB, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, **extra}


def family_configs() -> dict[str, object]:
    """Family name -> its transformers config (import is deferred: torch is heavy)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    return {
        "llama2": LlamaConfig(**_common(kv_heads=HEADS), tie_word_embeddings=False),
        "llama3": LlamaConfig(**_common(), tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
        "qwen2": Qwen2Config(**_common(), tie_word_embeddings=True),
        "qwen2-untied": Qwen2Config(**_common(), tie_word_embeddings=False),
        "qwen3": Qwen3Config(**_common(), tie_word_embeddings=False),
        "mistral": MistralConfig(**_common(), sliding_window=64, tie_word_embeddings=False),
        "gemma2": Gemma2Config(**_common(), sliding_window=64, query_pre_attn_scalar=HEAD_DIM,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        # six layers: Gemma 3's own pattern of five sliding layers to one global (llama.cpp assumes it)
        "gemma3": Gemma3TextConfig(**{**_common(), "num_hidden_layers": 6}, sliding_window=64,
                                   query_pre_attn_scalar=HEAD_DIM),
        "phi3": Phi3Config(**_common(kv_heads=HEADS), tie_word_embeddings=False),
    }


FAMILIES = ("llama2", "llama3", "qwen2", "qwen2-untied", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def train_tokenizer(out_dir: Path, text: str) -> Path:
    """A SentencePiece BPE model over `text`, written as out_dir/tokenizer.model."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in text.splitlines() if line.strip()), model_writer=model,
        vocab_size=VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=3, bos_id=1, eos_id=2, pad_id=0, num_threads=1, minloglevel=2,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["<|endoftext|>"])  # llama.cpp's Phi-3 vocabulary requires this token
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def save_tokenizer(spm_path: Path, out_dir: Path) -> None:
    """tokenizer.model beside the fast tokenizer transformers converts from it (needs protobuf).
    spm_path's folder must hold nothing else, or transformers may read another file first."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(spm_path.parent, add_bos_token=False, legacy=False)
    tokenizer.save_pretrained(out_dir)
    shutil.copy2(spm_path, out_dir / "tokenizer.model")  # transformers 5 saves tokenizer.json only


def make_checkpoint(family: str, out_dir: Path, spm_path: Path, seed: int = 0) -> Path:
    """Save a tiny bf16 checkpoint of `family` with deterministic weights into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    config = family_configs()[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init is tiny; wider weights make quantization error visible
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    save_tokenizer(spm_path, out_dir)
    return out_dir


def pydoc_text() -> tuple[str, str]:
    """(calibration, evaluation) halves of pydoc's topics, as the corpus stage splits them."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return "\n\n".join(topics[k] for k in keys[:half]), "\n\n".join(topics[k] for k in keys[half:])
