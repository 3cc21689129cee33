import numpy as np

from pipeline.runtimes import transformers as runtime


def test_window_logits_score_the_directory_as_written(tiny_llama):
    windows = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=np.int32)
    with runtime.open_session(tiny_llama, threads=1) as session:
        logits = list(session.window_logits(windows))
        assert (session.runtime, session.device) == (runtime.name(), "cpu")
    assert session.model is None  # closed: the model is released
    assert [x.shape for x in logits] == [(5, 130), (5, 130)]
    assert logits[0].dtype == np.float32 and not np.allclose(logits[0], logits[1])


def test_tokenize_uses_the_directory_tokenizer(tiny_llama):
    import json

    vocab = json.loads((tiny_llama / "tokenizer.json").read_text())["model"]["vocab"]
    assert runtime.tokenize(tiny_llama, "word1 token2 . unseen") == [vocab["word1"], vocab["token2"], vocab["."], 0]


def test_name_says_what_ran():
    assert runtime.name().startswith("transformers ") and "decompressed to dense" in runtime.name()
    assert runtime.unavailable_reason() is None


def test_greedy_generation_follows_the_argmax_of_its_own_logits(tiny_llama):
    session = runtime.open_session(tiny_llama, threads=1)
    (produced,) = session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[])
    assert len(produced) == 5
    sequence = [1, 2, 3]
    for token in produced:
        (logits,) = session.window_logits([sequence])
        assert token == int(logits[-1].argmax())
        sequence.append(token)
    stop = produced[-1]  # generation ends at its first occurrence, which is kept
    assert next(session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[stop])) == produced[:produced.index(stop) + 1]


def test_short_windows_share_a_forward_and_keep_their_own_logits(tiny_llama):
    """Consecutive short windows are padded into one batch; each window's logits are those of
    its own forward pass (float32: within its rounding), and 512-token windows go one at a time."""
    import torch

    model = runtime.load_causal_lm(tiny_llama, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    windows = [rng.integers(1, 130, size) for size in (7, 3, 12, 12, 5)]
    assert [len(batch) for batch in runtime.window_batches(windows)] == [5]
    batched = list(runtime.model_window_logits(model, windows))
    alone = [next(runtime.model_window_logits(model, [window])) for window in windows]
    assert [x.shape for x in batched] == [(len(w), 130) for w in windows]
    for mine, own in zip(batched, alone):
        np.testing.assert_allclose(mine, own, rtol=0, atol=1e-5)
    long = [rng.integers(1, 130, 512), rng.integers(1, 130, 40), rng.integers(1, 130, 300), rng.integers(1, 130, 200)]
    assert [len(batch) for batch in runtime.window_batches(long)] == [1, 1, 1, 1]  # 2 x 300 > 512
    assert [len(batch) for batch in runtime.window_batches([w[:100] for w in long])] == [4]
    assert [len(batch) for batch in runtime.window_batches([w[:200] for w in long])] == [2, 2]


def test_an_fp8_kv_cache_casts_keys_and_values_as_vllm_stores_them(tiny_llama):
    """vLLM's fp8 cache without calibrated scales stores e4m3 with scale 1.0: the logits move a
    little from the model's own, and cached decoding casts the same way as the window does."""
    windows = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.int32)
    with runtime.open_session(tiny_llama, threads=1) as session:
        (plain,) = list(session.window_logits(windows))
    with runtime.open_session(tiny_llama, threads=1, kv_cache_dtype="fp8") as session:
        (cast,) = list(session.window_logits(windows))
        assert session.runtime.endswith("fp8 e4m3 KV cache, scale 1.0, as vLLM stores it without calibrated scales")
        (produced,) = session.generate([[1, 2, 3]], max_tokens=4, stop_ids=[])
        for step in range(4):  # each generated token is the argmax of the cast logits of its prefix
            (logits,) = list(session.window_logits([[1, 2, 3, *produced[:step]]]))
            assert produced[step] == int(logits[-1].argmax())
    moved = np.abs(cast - plain).max()
    assert 0 < moved < 0.1 * np.abs(plain).max()


def test_linear_widths_come_from_the_config_alone(tiny_llama):
    from pipeline.runtimes.transformers import linear_widths

    widths = linear_widths(tiny_llama)
    assert widths["model.layers.0.mlp.down_proj"] == 192 and widths["lm_head"] == 64
    assert len(widths) == 2 * 7 + 1
