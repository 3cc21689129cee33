"""Shared fixtures. tests/data is for small fixtures the tests make themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    """The project's source files: git's tracked files and the untracked ones it does not ignore."""
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if (REPO / line).is_file()]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the repository's source files (no artifacts), as the working directory."""
    root = tmp_path / "project"
    for name in tracked_files():
        if name.startswith("tests/"):
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    monkeypatch.chdir(root)
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def qpipe_env() -> dict[str, str]:
    """Environment for running the qpipe and dvc executables of this interpreter."""
    import sys

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


TINY_TEXT = " ".join(f"word{i % 97} token{i % 31} ." for i in range(4000))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama checkpoint in bf16 with random weights and a word-level tokenizer over
    TINY_TEXT (130 ids, 0 unknown); TINY_TEXT is beside it as calibration.txt."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny") / "checkpoint"
    words = sorted(set(TINY_TEXT.split()))
    vocab = {word: i for i, word in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root)
    write(root.parent / "calibration.txt", TINY_TEXT)
    return root


@pytest.fixture(scope="session")
def convertible_llama(tmp_path_factory):
    """A 2-layer Llama llama.cpp's converter takes (a SentencePiece BPE tokenizer trained on
    pydoc's text, tests/families.py), 96 wide, so that its attention rows take llama.cpp's
    32-value blocks and not its 256-value K-quants, while its 256-wide MLP down rows take both;
    tied embeddings. The calibration half of pydoc is beside it as calibration.txt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests import families

    root = tmp_path_factory.mktemp("convertible")
    calibration, _ = families.pydoc_text()
    write(root / "calibration.txt", calibration)
    spm = families.train_tokenizer(root / "spm", calibration)
    config = LlamaConfig(vocab_size=families.VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the default init is tiny; wider weights make quantization error visible
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.05)
    checkpoint = root / "checkpoint"
    model.to(torch.bfloat16).save_pretrained(checkpoint)
    families.save_tokenizer(spm, checkpoint)
    return checkpoint
