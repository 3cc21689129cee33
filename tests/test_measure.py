import numpy as np
import pytest

from pipeline import measure


def test_kv_cache_bytes_counts_k_and_v_per_layer():
    # 30 layers x (K and V) x 3 KV heads x 64 dims x 2 bytes x 576 tokens
    assert measure.kv_cache_bytes(30, 3, 64, 576) == 30 * 2 * 3 * 64 * 2 * 576
    assert measure.kv_cache_bytes(1, 1, 1, 10, bytes_per_value=1) == 20



def test_window_nll_is_the_next_token_negative_log_likelihood():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32))
    nll = measure.window_nll(logits, np.array([0, 1, 2]))
    assert nll == pytest.approx([-np.log(0.25), -np.log(0.1)], rel=1e-6)
