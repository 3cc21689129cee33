"""The accuracy math against brute-force computation on random distributions."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.gates import accuracy
from tests.gates import StoredLogProbs


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def brute_force(art_logits, ref_logits, tokens, stored=False):
    """Loops over every position and every token, no vectorisation. `stored`: P in the KLD is
    the one the reference stores, its log-probs rounded to float16 (and renormalized)."""
    rows = {key: [] for key in accuracy.FIGURES}
    for p in range(len(tokens) - 1):
        lq, lp = log_softmax(art_logits[p]), log_softmax(ref_logits[p])
        target = tokens[p + 1]
        rows["nll"].append(-lq[target])
        rows["reference_nll"].append(-lp[target])
        kld_p = log_softmax(lp.astype(np.float16)) if stored else lp
        rows["kld"].append(sum(math.exp(kld_p[i]) * (kld_p[i] - lq[i]) for i in range(len(lp))))
        rows["delta_p"].append(math.exp(lq[target]) - math.exp(lp[target]))
        rows["top1"].append(int(np.argmax(lq)) == int(np.argmax(lp)))
    return {key: np.array(values) for key, values in rows.items()}


def llama_cpp_percentile(values, fraction):
    """perplexity.cpp's percentile lambda, transcribed."""
    values = sorted(values)
    p = fraction * (len(values) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]


def stored(ref_logits):
    """What the reference stage keeps of [W, T, V] logits: float16 log-probs of every position
    but the last, their exact float32 NLL (computed by the caller) and top-1 ids."""
    log_probs = torch.log_softmax(torch.as_tensor(ref_logits[:, :-1], dtype=torch.float32), dim=-1)
    return log_probs.to(torch.float16).numpy(), log_probs.argmax(dim=-1).numpy().astype(np.int32)


def fake_reference(ref_logits, tokens):
    log_probs, top1 = stored(ref_logits)
    nll = np.stack([[-log_softmax(ref_logits[w, p])[tokens[w, p + 1]] for p in range(tokens.shape[1] - 1)]
                    for w in range(len(tokens))]).astype(np.float32)
    return SimpleNamespace(tokens=tokens, nll=nll, top1=top1, log_probs=lambda: StoredLogProbs(log_probs))


def window_of(ref_logits, tokens, art_logits, window=0, chunk=None):
    ref = fake_reference(ref_logits, tokens)
    return accuracy.window_scores(art_logits[window], tokens[window], ref.log_probs().window(window), ref.nll[window],
                                  ref.top1[window], chunk=chunk)


def random_case(seed, windows=1, length=30, vocab=50, hidden=8, noise=1.0):
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(windows, length, hidden)).astype(np.float32)
    weight = (rng.normal(size=(vocab, hidden)) * 1.5).astype(np.float32)
    ref_logits = states @ weight.T
    art_logits = (ref_logits + noise * rng.normal(size=ref_logits.shape)).astype(np.float32)
    tokens = rng.integers(0, vocab, size=(windows, length))
    return ref_logits, art_logits, tokens


@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_scoring_a_window_in_chunks_of_positions_gives_the_same_figures_bit_for_bit(chunk):
    ref_logits, art_logits, tokens = random_case(3)
    whole = window_of(ref_logits, tokens, art_logits, chunk=30)
    chunked = window_of(ref_logits, tokens, art_logits, chunk=chunk)
    for key in accuracy.FIGURES:
        np.testing.assert_array_equal(chunked[key], whole[key])
        assert len(chunked[key]) == 29


@pytest.mark.parametrize("noise", [1.0, 0.05])
def test_window_scores_are_the_full_vocabulary_figures_of_brute_force(noise):
    ref_logits, art_logits, tokens = random_case(5, noise=noise)
    scores = window_of(ref_logits, tokens, art_logits)
    expected = brute_force(art_logits[0], ref_logits[0], tokens[0])
    for key in ("nll", "reference_nll", "delta_p"):
        np.testing.assert_allclose(scores[key], expected[key], rtol=2e-5, atol=1e-6)  # float32 log-softmax
    np.testing.assert_allclose(scores["kld"], brute_force(art_logits[0], ref_logits[0], tokens[0], stored=True)["kld"],
                               rtol=2e-4, atol=1e-6)  # float32 arithmetic; a float32 log-prob rounds to the
    # other float16 neighbour of the float64 one now and then
    # against the exact P: float16 log-probs have a spacing of up to 2^-9 nats at log-probs of -2
    # to -4, so a position's KLD moves by up to 0.3 % at a KLD of 0.3 (noise 1.0), by up to 2 % at
    # 3e-4 (noise 0.05); their mean by a tenth of that, as the rounding errors cancel
    np.testing.assert_allclose(scores["kld"], expected["kld"], rtol=0.01 if noise == 1.0 else 0.03, atol=1e-6)
    assert scores["kld"].mean() == pytest.approx(expected["kld"].mean(), rel=5e-4 if noise == 1.0 else 3e-3)
    np.testing.assert_array_equal(scores["top1"], expected["top1"])
    assert np.all(scores["kld"] > 0)


def test_a_vocabulary_padded_on_one_side_is_compared_over_the_shared_ids():
    ref_logits, art_logits, tokens = random_case(6)
    expected = brute_force(art_logits[0], ref_logits[0], tokens[0], stored=True)
    padded = np.concatenate([art_logits, np.full((1, 30, 14), -30.0, dtype=np.float32)], axis=2)
    scores = window_of(ref_logits, tokens, padded)
    np.testing.assert_allclose(scores["kld"], expected["kld"], rtol=2e-5, atol=1e-6)
    # the reference padded instead: its padding's probability is taken out of P and its NLL
    padded_reference = np.concatenate([ref_logits, np.full((1, 30, 14), 1.0, dtype=np.float32)], axis=2)
    scores = window_of(padded_reference, tokens, art_logits)
    # float16 rounds the padded distribution's log-probs, not those of the shared ids alone
    np.testing.assert_allclose(scores["kld"], expected["kld"], rtol=5e-3, atol=1e-6)
    np.testing.assert_allclose(scores["reference_nll"], expected["reference_nll"], rtol=1e-4, atol=1e-5)


def test_identical_model_scores_zero_kld_full_agreement_ratio_one():
    ref_logits, _, tokens = random_case(3, windows=2, length=16)
    summary = accuracy.score(iter(ref_logits), fake_reference(ref_logits, tokens))
    assert summary["mean_kld"] == pytest.approx(0, abs=1e-7)  # float16 rounding, to second order
    assert summary["top1_agreement"] == 1.0 and summary["mean_delta_p"] == pytest.approx(0, abs=1e-6)
    assert summary["ppl_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert summary["eval_tokens"] == 30
    assert summary["llama_cpp"]["Same top p %"] == 100.0


def test_score_gives_llama_cpp_statistics_second_half_and_per_window_figures():
    ref_logits, art_logits, tokens = random_case(8, windows=4, length=20)
    summary = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens))
    per_window = [brute_force(art_logits[w], ref_logits[w], tokens[w], stored=True) for w in range(4)]
    kld = np.concatenate([w["kld"] for w in per_window])
    delta_p = np.concatenate([w["delta_p"] for w in per_window])
    stats = summary["llama_cpp"]
    assert stats["Mean KLD"] == pytest.approx(kld.mean(), rel=1e-5) == summary["mean_kld"]
    assert stats["Maximum KLD"] == pytest.approx(kld.max(), rel=1e-5)
    for label, fraction in accuracy.KLD_PERCENTILES.items():
        assert stats[f"{label} KLD"] == pytest.approx(llama_cpp_percentile(kld, fraction), rel=1e-5)
    assert stats["Median KLD"] == pytest.approx(np.median(kld), rel=1e-5)
    assert stats["RMS Δp %"] == pytest.approx(100 * np.sqrt((delta_p ** 2).mean()), rel=1e-5)
    assert stats["Mean Δp %"] == pytest.approx(100 * delta_p.mean(), rel=1e-4, abs=1e-9)
    ppl = math.exp(np.concatenate([w["nll"] for w in per_window]).mean())
    ref_ppl = math.exp(np.concatenate([w["reference_nll"] for w in per_window]).mean())
    assert summary["ppl_ratio"] == pytest.approx(ppl / ref_ppl, rel=1e-6)
    # the second half: positions 10..18 of each 20-token window
    half = np.concatenate([w["kld"][10:] for w in per_window])
    assert summary["second_half"]["eval_tokens"] == 4 * 9
    assert summary["second_half"]["mean_kld"] == pytest.approx(half.mean(), rel=1e-5)
    assert summary["per_window"]["mean_kld"] == pytest.approx([w["kld"].mean() for w in per_window], rel=1e-5)


def test_every_figure_is_given_again_per_position_bucket_with_its_own_interval():
    """Buckets [0, 8, 16, 64] of 20-token windows (19 scored positions): 0-7, 8-15 and 16-63 cut
    to 16..18; the 64+ bucket holds no position and is left out."""
    from pipeline.config import ReferenceParams

    ref_logits, art_logits, tokens = random_case(9, windows=6, length=20, noise=0.5)
    ramp = np.linspace(0.0, 3.0, 20, dtype=np.float32)[None, :, None]  # noise grows with position
    art_logits = (ref_logits + ramp * (art_logits - ref_logits)).astype(np.float32)
    starts = [0, 8, 16, 64]
    summary = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens), position_buckets=starts)
    assert list(summary["by_position"]) == ReferenceParams(position_buckets=starts).bucket_labels()[:3] \
        == ["0-7", "8-15", "16-63"]
    per_window = [brute_force(art_logits[w], ref_logits[w], tokens[w], stored=True) for w in range(6)]
    for (label, first, stop), positions in zip([("0-7", 0, 8), ("8-15", 8, 16), ("16-63", 16, 19)],
                                               ["0..7", "8..15", "16..18"]):
        bucket = summary["by_position"][label]
        kld = np.concatenate([w["kld"][first:stop] for w in per_window])
        assert bucket["positions"] == positions and bucket["eval_tokens"] == 6 * (stop - first)
        assert bucket["mean_kld"] == pytest.approx(kld.mean(), rel=1e-5)
        assert bucket["p999_kld"] == pytest.approx(np.quantile(kld, 0.999), rel=1e-5)
        assert bucket["ci95"]["mean_kld"]["low"] <= bucket["mean_kld"] <= bucket["ci95"]["mean_kld"]["high"]
    klds = [summary["by_position"][label]["mean_kld"] for label in ("0-7", "8-15", "16-63")]
    assert klds == sorted(klds) and klds[0] < summary["mean_kld"] < klds[-1]
    whole = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens))
    assert list(whole["by_position"]) == ["0+"] and whole["by_position"]["0+"]["mean_kld"] == whole["mean_kld"]


def test_scoring_runs_on_the_device_asked_and_a_gpu_chunk_grows_with_its_free_memory():
    ref_logits, art_logits, tokens = random_case(8, windows=2, length=20)
    on_cpu = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens), device="cpu")
    assert on_cpu["scoring_device"] == "cpu" == accuracy.scoring_device()  # no CUDA here
    assert on_cpu == accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens))
    assert accuracy.positions_per_chunk("cpu", 128256) == accuracy.POSITIONS_PER_CHUNK
    # a quarter of 80 GB free at six float32 copies of a 128k-vocabulary chunk
    assert accuracy.positions_per_chunk("cuda", 128256, free_bytes=80 * 10**9) == 80 * 10**9 // 4 // (24 * 128256)
    assert accuracy.positions_per_chunk("cuda", 262144, free_bytes=10**8) == accuracy.POSITIONS_PER_CHUNK


def test_bootstrap_intervals_hold_the_point_value_and_are_reproducible():
    ref_logits, art_logits, tokens = random_case(9, windows=12, length=16)
    first = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens))
    again = accuracy.score(iter(art_logits), fake_reference(ref_logits, tokens))
    assert first["ci95"] == again["ci95"]
    for figure in ("ppl_ratio", "mean_kld", "top1_agreement", "mean_delta_p"):
        interval = first["ci95"][figure]
        assert interval["low"] < first[figure] < interval["high"], figure
    # the same window twelve times has no spread between windows
    same = accuracy.score(iter(np.repeat(art_logits[:1], 12, axis=0)),
                          fake_reference(np.repeat(ref_logits[:1], 12, axis=0), np.repeat(tokens[:1], 12, axis=0)))
    assert same["ci95"]["mean_kld"]["low"] == pytest.approx(same["ci95"]["mean_kld"]["high"], rel=1e-9)


def test_score_refuses_a_short_window_stream():
    ref_logits, _, tokens = random_case(1, windows=2, length=4)
    with pytest.raises(RuntimeError, match="1 windows, expected 2"):
        accuracy.score(iter(ref_logits[:1]), fake_reference(ref_logits, tokens))


def test_tokenizer_mismatch():
    assert accuracy.tokenizer_mismatch([1, 2, 3, 4], [1, 2, 3, 4])["mismatch"] == 0
    result = accuracy.tokenizer_mismatch([1, 2, 3, 4], [1, 9, 3, 4])
    assert result["mismatch"] == pytest.approx(0.25)
    assert result["artifact_tokens"] == 4
