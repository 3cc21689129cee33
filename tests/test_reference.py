from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import BadInput
from pipeline.reference import make_windows


def test_windows_are_consecutive_slices_of_the_text():
    windows = make_windows(list(range(100)), 3, 8, Path("eval.txt"))
    assert windows.shape == (3, 8) and windows.dtype == np.int32
    assert windows[1, 0] == 8 and windows[2, -1] == 23


def test_too_short_text_names_the_params_and_the_largest_fit():
    with pytest.raises(BadInput) as info:
        make_windows(list(range(100)), 40, 8, Path("eval.txt"))
    assert "100 tokens" in info.value.what and "320" in info.value.what
    assert "reference.windows" in info.value.where
    assert "at most 12 windows" in info.value.fix


def test_empty_text_is_refused():
    with pytest.raises(BadInput, match="empty"):
        make_windows([], 1, 8, Path("eval.txt"))
