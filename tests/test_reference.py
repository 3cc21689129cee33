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


def scored(model, windows, batch=1):
    from pipeline.reference import score_windows

    written = []
    nll, top1 = score_windows(model, windows, "cpu", written.append, batch=batch)
    return nll, top1, np.stack(written)


def test_the_stored_log_probs_are_every_family_s_own_distribution(family_model):
    import torch

    family, model = family_model
    windows = np.random.default_rng(0).integers(3, 1000, size=(2, 24)).astype(np.int32)
    nll, top1, log_probs = scored(model, windows)
    assert nll.shape == top1.shape == (2, 23) and log_probs.shape == (2, 23, model.config.vocab_size)
    assert log_probs.dtype == np.float16 and top1.dtype == np.int32
    with torch.no_grad():  # the model's final logits, Gemma 2's soft-capping included
        logits = model(torch.as_tensor(windows, dtype=torch.long)).logits[:, :-1].float()
    exact = torch.log_softmax(logits, dim=-1)
    np.testing.assert_allclose(log_probs.astype(np.float32), exact.numpy(), rtol=2**-10, atol=1e-6)
    np.testing.assert_allclose(nll, -exact.gather(2, torch.as_tensor(windows[:, 1:, None], dtype=torch.long))[..., 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(top1, logits.argmax(dim=-1).numpy())


def test_windows_scored_in_a_batch_give_the_figures_of_windows_scored_one_by_one(family_model):
    _, model = family_model
    windows = np.random.default_rng(1).integers(3, 1000, size=(3, 24)).astype(np.int32)
    one_by_one = scored(model, windows)
    batched = scored(model, windows, batch=2)  # what a GPU host does, here on the CPU
    np.testing.assert_allclose(one_by_one[0], batched[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(one_by_one[1], batched[1])
    np.testing.assert_allclose(one_by_one[2].astype(np.float32), batched[2].astype(np.float32), rtol=2**-9, atol=1e-4)


def test_the_batch_is_one_window_on_the_cpu_and_fits_a_quarter_of_the_gpus_free_memory():
    from pipeline.reference import windows_per_batch

    assert windows_per_batch("cpu", 512, 128256) == 1
    per_window = 512 * 128256 * 4 * 2  # float32 logits and their log-softmax
    assert windows_per_batch("cuda", 512, 128256, free_bytes=100 * per_window) == 25
    assert windows_per_batch("cuda", 512, 128256, free_bytes=per_window) == 1


def test_log_probs_are_written_and_read_one_window_at_a_time_as_a_numpy_file(tmp_path):
    from pipeline.reference import LogProbsReader, LogProbsWriter, log_probs_bytes

    windows = np.random.default_rng(2).normal(size=(3, 5, 7)).astype(np.float16)
    writer = LogProbsWriter(tmp_path / "logprobs.npy", 3)
    for window in windows:
        writer.write(window)
    writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "logprobs.npy"), windows)
    assert (tmp_path / "logprobs.npy").stat().st_size - log_probs_bytes(3, 6, 7) <= 128  # the .npy header
    with LogProbsReader(tmp_path / "logprobs.npy") as reader:
        assert reader.vocabulary == 7
        np.testing.assert_array_equal(reader.window(2), windows[2])
        np.testing.assert_array_equal(reader.window(0), windows[0])
        with pytest.raises(BadInput, match="ends before window 3"):
            reader.window(3)


def test_a_disk_that_cannot_hold_the_log_probs_is_refused_before_loading(tmp_path):
    from pipeline.errors import HostLacks
    from pipeline.reference import ensure_disk

    ensure_disk(10**6, tmp_path / "not" / "yet" / "there")
    with pytest.raises(HostLacks, match="need 1000000000.0 GB of disk") as info:
        ensure_disk(10**18, tmp_path / "out")
    assert "reference.windows" in info.value.where


def test_a_reference_from_before_stored_log_probs_is_refused_with_the_fix(tmp_path):
    from pipeline import reference

    np.savez(tmp_path / reference.NPZ, tokens=np.zeros((1, 4)), nll=np.zeros((1, 3)), text_tokens=np.zeros(4))
    (tmp_path / reference.LOG_PROBS_FILE).write_bytes(b"")
    with pytest.raises(BadInput, match="older qpipe") as info:
        reference.load(tmp_path)
    assert "dvc repro reference" in info.value.fix
