import numpy as np
import pytest

from pipeline import measure


def test_window_nll_is_the_next_token_negative_log_likelihood():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32))
    nll = measure.window_nll(logits, np.array([0, 1, 2]))
    assert nll == pytest.approx([-np.log(0.25), -np.log(0.1)], rel=1e-6)
