"""The llama.cpp runtime on the real embedded GGUF (a Q4_1 file llama.cpp loads as is)."""

import numpy as np
import pytest

from pipeline.runtimes import llama_cpp
from pipeline.source import embedded_gguf


@pytest.fixture(scope="module")
def model_path():
    return embedded_gguf("smollm2-135m")


def test_window_logits_shape_and_determinism(model_path):
    tokens = np.array(llama_cpp.tokenize(model_path, "def add(a, b):\n    return a + b\n" * 3)[:24])
    windows = np.stack([tokens, tokens])
    first, second = [w.copy() for w in llama_cpp.window_logits(model_path, windows, threads=2)]
    assert first.shape == (24, 49152)
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=1e-4, atol=1e-4)
    # the model predicts the repeated code: most next tokens in the 2nd and 3rd copy are top-1
    predicted = first[:-1].argmax(axis=1) == tokens[1:]
    assert predicted[len(tokens) // 2:].mean() > 0.5


def test_measure_speed_returns_positive_figures(model_path):
    prompt = llama_cpp.tokenize(model_path, "The quick brown fox jumps over the lazy dog. " * 4)
    result = llama_cpp.measure_speed(model_path, prompt, gen_tokens=8, repeats=2, warmup=1, threads=2)
    for key in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms"]:
        assert result[key] > 0
    assert len(result["runs"]) == 2


def test_unavailable_reason_is_none_here():
    assert llama_cpp.unavailable_reason() is None
