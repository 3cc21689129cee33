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


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gemma2", "gemma3", "phi3"])
def family_model(request):
    import torch
    from transformers import AutoModelForCausalLM

    from tests import families

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(families.family_configs()[request.param], dtype=torch.float32)
    with torch.no_grad():  # wide weights: soft-capping then changes the logits visibly
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return request.param, model.eval()


def test_the_output_layer_recomputes_every_family_s_logits(family_model, tmp_path):
    from pipeline.reference import OutputLayer, check_reproduced, score_windows

    family, model = family_model
    windows = np.random.default_rng(0).integers(3, 1000, size=(2, 24)).astype(np.int32)
    nll, hidden, logits = score_windows(model, windows, "cpu")
    assert nll.shape == (2, 23) and hidden.shape == (2, 23, model.config.hidden_size)
    layer = OutputLayer.of(model)
    assert layer.softcap == (30.0 if family == "gemma2" else None)
    assert check_reproduced(layer, hidden[0], logits, "float32", family) < 1e-4
    layer.save(tmp_path / "head.safetensors")
    loaded = OutputLayer.load(tmp_path / "head.safetensors")
    assert check_reproduced(loaded, hidden[0], logits, "float32", family) < 1e-4


def test_windows_scored_in_a_batch_give_the_figures_of_windows_scored_one_by_one(family_model):
    from pipeline.reference import score_windows

    _, model = family_model
    windows = np.random.default_rng(1).integers(3, 1000, size=(3, 24)).astype(np.int32)
    one_by_one = score_windows(model, windows, "cpu")
    batched = score_windows(model, windows, "cpu", batch=2)  # what a GPU host does, here on the CPU
    for single, together in zip(one_by_one[:2], batched[:2]):
        np.testing.assert_allclose(single, together, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one_by_one[2].numpy(), batched[2].numpy(), rtol=1e-4, atol=1e-5)


def test_the_batch_is_one_window_on_the_cpu_and_fits_a_quarter_of_the_gpus_free_memory():
    from pipeline.reference import windows_per_batch

    assert windows_per_batch("cpu", 512, 128256) == 1
    per_window = 512 * 128256 * 4 * 2  # float32 logits and their log-softmax
    assert windows_per_batch("cuda", 512, 128256, free_bytes=100 * per_window) == 25
    assert windows_per_batch("cuda", 512, 128256, free_bytes=per_window) == 1


def test_a_logit_transform_the_reference_does_not_know_is_refused(family_model):
    from pipeline.reference import OutputLayer, check_reproduced, score_windows

    family, model = family_model
    if family != "gemma2":
        pytest.skip("needs a family that transforms its logits")
    windows = np.random.default_rng(0).integers(3, 1000, size=(1, 24)).astype(np.int32)
    _, hidden, logits = score_windows(model, windows, "cpu")
    layer = OutputLayer.of(model)
    layer.softcap = None
    with pytest.raises(BadInput, match="cannot recompute") as info:
        check_reproduced(layer, hidden[0], logits, "float32", "Gemma2ForCausalLM")
    assert "config.json" in info.value.where
