"""The accuracy math against brute-force computation on random distributions."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.gates import accuracy


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def reference_from(ref_logits, tokens, k):
    """What the reference stage stores: NLL and top-k log-probs per position."""
    nll, ids, values = [], [], []
    for p in range(len(tokens) - 1):
        lp = log_softmax(ref_logits[p])
        nll.append(-lp[tokens[p + 1]])
        order = np.argsort(-lp)[:k]
        ids.append(order)
        values.append(lp[order])
    return np.array(nll), np.array(ids), np.array(values)


def brute_force(art_logits, ref_logits, tokens, k):
    """Loops over every position and every bucket, no vectorisation."""
    nlls, klds, top1 = [], [], []
    for p in range(len(tokens) - 1):
        lq = log_softmax(art_logits[p])
        lp = log_softmax(ref_logits[p])
        nlls.append(-lq[tokens[p + 1]])
        top = list(np.argsort(-lp)[:k])
        kld = 0.0
        for i in top:
            kld += math.exp(lp[i]) * (lp[i] - lq[i])
        rest = [i for i in range(len(lp)) if i not in top]
        if rest:
            p_rest = sum(math.exp(lp[i]) for i in rest)
            q_rest = sum(math.exp(lq[i]) for i in rest)
            kld += p_rest * (math.log(p_rest) - math.log(q_rest))
        klds.append(kld)
        top1.append(int(np.argmax(lq)) == top[0])
    return np.array(nlls), np.array(klds), np.array(top1)


@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_scoring_a_window_in_chunks_of_positions_gives_the_same_figures_bit_for_bit(chunk):
    rng = np.random.default_rng(3)
    vocab, length = 50, 30
    ref_logits = rng.normal(size=(length, vocab)) * 3
    art_logits = (ref_logits + rng.normal(size=(length, vocab))).astype(np.float32)
    tokens = rng.integers(0, vocab, size=length)
    _, ids, values = reference_from(ref_logits, tokens, 8)
    whole = accuracy.window_scores(art_logits, tokens, ids, values, chunk=length)
    chunked = accuracy.window_scores(art_logits, tokens, ids, values, chunk=chunk)
    for key in ("nll", "kld", "top1"):
        np.testing.assert_array_equal(chunked[key], whole[key])
        assert len(chunked[key]) == length - 1


@pytest.mark.parametrize("k", [1, 5, 50])
def test_window_scores_match_brute_force(k):
    rng = np.random.default_rng(k)
    vocab, length = 50, 30
    ref_logits = rng.normal(size=(length, vocab)) * 3
    art_logits = (ref_logits + rng.normal(size=(length, vocab))).astype(np.float32)
    tokens = rng.integers(0, vocab, size=length)
    _, ids, values = reference_from(ref_logits, tokens, k)
    scores = accuracy.window_scores(art_logits, tokens, ids, values)
    nll, kld, top1 = brute_force(art_logits, ref_logits, tokens, k)
    np.testing.assert_allclose(scores["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(scores["kld"], kld, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(scores["top1"], top1)


def test_full_vocabulary_kld_is_exact_kl_and_topk_is_a_lower_bound():
    rng = np.random.default_rng(7)
    vocab, length = 40, 20
    ref_logits = rng.normal(size=(length, vocab)) * 2
    art_logits = ref_logits + rng.normal(size=(length, vocab))
    tokens = rng.integers(0, vocab, size=length)
    exact = np.array([
        (np.exp(log_softmax(ref_logits[p])) * (log_softmax(ref_logits[p]) - log_softmax(art_logits[p]))).sum()
        for p in range(length - 1)
    ])
    _, ids, values = reference_from(ref_logits, tokens, vocab)
    full = accuracy.window_scores(art_logits, tokens, ids, values)["kld"]
    np.testing.assert_allclose(full, exact, rtol=1e-6)
    _, ids, values = reference_from(ref_logits, tokens, 4)
    coarse = accuracy.window_scores(art_logits, tokens, ids, values)["kld"]
    assert np.all(coarse <= exact + 1e-9)
    assert np.all(coarse >= -1e-9)


def test_identical_model_scores_zero_kld_full_agreement_ratio_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 16, 30)).astype(np.float32)
    tokens = rng.integers(0, 30, size=(2, 16))
    parts = [reference_from(logits[w], tokens[w], 8) for w in range(2)]
    ref = SimpleNamespace(tokens=tokens, nll=np.stack([p[0] for p in parts]),
                          topk_ids=np.stack([p[1] for p in parts]), topk_logprobs=np.stack([p[2] for p in parts]))
    summary = accuracy.score(iter(logits), ref)
    assert summary["mean_kld"] == pytest.approx(0, abs=1e-6)
    assert summary["top1_agreement"] == 1.0
    assert summary["ppl_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert summary["eval_tokens"] == 30
    assert summary["ppl"] == pytest.approx(math.exp(ref.nll.mean()), rel=1e-6)


def test_score_refuses_a_short_window_stream():
    tokens = np.zeros((2, 4), dtype=int)
    ref = SimpleNamespace(tokens=tokens, nll=np.zeros((2, 3)), topk_ids=np.zeros((2, 3, 1), dtype=int),
                          topk_logprobs=np.zeros((2, 3, 1)))
    with pytest.raises(RuntimeError, match="1 windows, expected 2"):
        accuracy.score(iter([np.zeros((4, 5), dtype=np.float32)]), ref)


def test_tokenizer_mismatch():
    assert accuracy.tokenizer_mismatch([1, 2, 3, 4], [1, 2, 3, 4])["mismatch"] == 0
    result = accuracy.tokenizer_mismatch([1, 2, 3, 4], [1, 9, 3, 4])
    assert result["mismatch"] == pytest.approx(0.25)
    assert result["artifact_tokens"] == 4
