"""Accuracy gate: perplexity, KL divergence, Δp and top-1 agreement against the reference.

For every window the artifact is fed the reference's token ids; position p predicts token
p+1. With Q the artifact's next-token distribution and P the reference's, both over the
whole vocabulary (the reference's stored float16 log-probs, renormalized over the ids both
have, ``reference``):

- NLL_p = -log Q(t_{p+1}); ppl = exp(mean NLL); ppl_ratio = ppl / reference ppl, the
  reference's NLL its exact float32 one;
- KLD_p = sum_i P_i (log P_i - log Q_i), the KL divergence over the whole vocabulary;
- Δp_p = Q(t_{p+1}) - P(t_{p+1}), the change in the probability of the actual next token;
- top1_agreement (llama.cpp's "same top p") = share of positions where argmax Q = argmax P,
  the reference's argmax its exact one.

These are llama-perplexity's `--kl-divergence` figures. ``llama_cpp`` holds them under its
labels and in its units (Δp and same top p in percent), its percentiles by the same linear
interpolation. llama-perplexity scores only the second half of each window (positions
n_ctx/2 .. n_ctx-2, which see at least half a window of context); ``second_half`` gives
every figure over those positions, the headline figures cover every position.

Uncertainty: ``ci95`` holds 95 % intervals bootstrapped over windows (positions within a
window are correlated, windows are not): 1000 resamples of the windows with replacement,
seed 0, so a gate result is reproducible. ``per_window`` keeps each window's mean NLL, KLD
and agreement, so two artifacts scored on the same windows can be compared pairwise
(``compare``).
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.reference import POSITIONS_PER_CHUNK

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
KLD_PERCENTILES = {"99.9%": 0.999, "99.0%": 0.99, "95.0%": 0.95, "90.0%": 0.90}
# per-position figures of window_scores
FIGURES = ("nll", "reference_nll", "kld", "delta_p", "top1")


def position_scores(logits, reference_log_probs, reference_nll, reference_top1, targets) -> dict[str, np.ndarray]:
    """NLL, reference NLL, KLD, Δp and top-1 agreement of positions whose artifact logits and
    reference log-probs ([n, V] each), the reference's exact NLL and top-1 ids, and next tokens
    ([n] each) are given. A vocabulary padded on one side only is compared over the ids both
    have. It computes where the reference log-probs are (the GPU on a GPU host) and returns
    numpy arrays."""
    import torch

    log_p = torch.as_tensor(reference_log_probs).to(torch.float32, copy=True)
    device = log_p.device
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float32)).to(device)
    vocabulary = min(logits.shape[1], log_p.shape[1])
    reference_nll = torch.as_tensor(np.asarray(reference_nll, dtype=np.float64), device=device)
    reference_top1 = torch.as_tensor(np.asarray(reference_top1, dtype=np.int64), device=device)
    p = torch.exp(log_p)
    if vocabulary < log_p.shape[1]:
        # P restricted to the shared ids: the next token's NLL falls by what the cut-off ids held
        reference_nll = reference_nll - torch.log(p.sum(dim=-1) / p[:, :vocabulary].sum(dim=-1)).double()
        reference_top1 = torch.where(reference_top1 < vocabulary, reference_top1, p[:, :vocabulary].argmax(dim=-1))
        log_p, p = log_p[:, :vocabulary], p[:, :vocabulary]
    log_q = torch.log_softmax(logits[:, :vocabulary], dim=-1)
    # KL(P/Z || Q) with Z = sum(P): renormalized, so float16 rounding moves it only to second order
    total = p.sum(dim=-1)
    kld = (log_p.sub_(log_q).mul_(p).sum(dim=-1) / total - torch.log(total)).double()
    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=device)[:, None]
    nll = -log_q.gather(1, targets)[:, 0].double()
    return {
        "nll": nll.cpu().numpy(),
        "reference_nll": reference_nll.cpu().numpy(),
        "kld": kld.cpu().numpy(),
        "delta_p": (torch.exp(-nll) - torch.exp(-reference_nll)).cpu().numpy(),
        "top1": (log_q.argmax(dim=-1) == reference_top1).cpu().numpy(),
    }


def window_scores(logits: np.ndarray, tokens: np.ndarray, reference_log_probs, reference_nll: np.ndarray,
                  reference_top1: np.ndarray, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Per-position figures of one window: logits [T, V] from the artifact, tokens [T], the
    reference's log-probs [T-1, V] (a numpy or torch array), exact NLL and top-1 ids [T-1].
    Positions are scored `chunk` at a time, so the scratch memory is chunk x V floats."""
    chunk = chunk or POSITIONS_PER_CHUNK
    positions = len(tokens) - 1  # the last position predicts nothing inside the window
    parts = []
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        parts.append(position_scores(logits[start:stop], reference_log_probs[start:stop], reference_nll[start:stop],
                                     reference_top1[start:stop], tokens[start + 1:stop + 1]))
    return {key: np.concatenate([part[key] for part in parts]) for key in FIGURES}


def summarize(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Headline figures and llama.cpp's statistics over the positions in `scores` (flat arrays)."""
    nll, reference_nll, kld = scores["nll"], scores["reference_nll"], scores["kld"]
    delta_p, top1 = scores["delta_p"], scores["top1"]
    ppl, reference_ppl = float(np.exp(nll.mean())), float(np.exp(reference_nll.mean()))
    return {
        "eval_tokens": int(nll.size),
        "ppl": ppl,
        "reference_ppl": reference_ppl,
        "ppl_ratio": ppl / reference_ppl,
        "mean_kld": float(kld.mean()),
        "p99_kld": float(np.quantile(kld, 0.99)),
        "p999_kld": float(np.quantile(kld, 0.999)),
        "top1_agreement": float(top1.mean()),
        "mean_delta_p": float(delta_p.mean()),
        "rms_delta_p": float(np.sqrt(np.mean(delta_p ** 2))),
        "llama_cpp": llama_cpp_statistics(scores),
    }


def llama_cpp_statistics(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The figures llama-perplexity --kl-divergence prints, under its labels and in its units."""
    kld, delta_p = scores["kld"], scores["delta_p"]
    log_ratio = float(scores["nll"].mean() - scores["reference_nll"].mean())
    statistics = {
        "Mean PPL(Q)": float(np.exp(scores["nll"].mean())),
        "Mean PPL(base)": float(np.exp(scores["reference_nll"].mean())),
        "Mean ln(PPL(Q)/PPL(base))": log_ratio,
        "Mean PPL(Q)/PPL(base)": float(np.exp(log_ratio)),
        "Mean KLD": float(kld.mean()),
        "Maximum KLD": float(kld.max()),
    }
    statistics.update({f"{label} KLD": float(np.quantile(kld, q)) for label, q in KLD_PERCENTILES.items()})
    statistics.update({
        "Median KLD": float(np.median(kld)),
        "Mean Δp %": 100 * float(delta_p.mean()),
        "RMS Δp %": 100 * float(np.sqrt(np.mean(delta_p ** 2))),
        "Same top p %": 100 * float(scores["top1"].mean()),
    })
    return statistics


def bootstrap_picks(count: int) -> np.ndarray:
    """The indices of BOOTSTRAP_RESAMPLES resamples (with replacement) of `count` items, seeded."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, count, size=(BOOTSTRAP_RESAMPLES, count))


def bootstrap_ci95(per_window: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """95 % intervals of ppl_ratio, mean_kld, top1_agreement and mean_delta_p, resampling whole
    windows (each window's mean of every figure; all windows have the same length)."""
    picks = bootstrap_picks(len(per_window["kld"]))
    means = {key: per_window[key][picks].mean(axis=1) for key in FIGURES}
    resampled = {
        "ppl_ratio": np.exp(means["nll"] - means["reference_nll"]),
        "mean_kld": means["kld"],
        "top1_agreement": means["top1"],
        "mean_delta_p": means["delta_p"],
    }
    intervals = {}
    for figure, values in resampled.items():
        low, high = np.quantile(values, [0.025, 0.975])
        intervals[figure] = {"low": float(low), "high": float(high)}
    return intervals


def scoring_device() -> str:
    """Where the statistics are computed: a CUDA GPU where there is one (a window's log-softmax
    and KLD at a 128k vocabulary take a large share of a small model's forward on a CPU)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def positions_per_chunk(device: str, vocabulary: int, free_bytes: int | None = None) -> int:
    """Positions scored at once: ``POSITIONS_PER_CHUNK`` on the CPU (the fastest there); on a
    GPU as many as a quarter of its free memory holds at six float32 copies of a chunk's
    logits (the artifact's logits, both log-probs, the KL terms and their scratch), at least that."""
    if device != "cuda":
        return POSITIONS_PER_CHUNK
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info()
    return max(POSITIONS_PER_CHUNK, int(free_bytes // 4 // (6 * 4 * vocabulary)))


def score(window_logits: Iterable[np.ndarray], reference, progress=None, device: str | None = None,
          position_buckets: Sequence[int] = (0,)) -> dict[str, Any]:
    """Score every reference window; `window_logits` yields [T, V] logits in window order. The
    statistics run on `device` (``scoring_device()`` by default), each window's reference
    log-probs read from disk as it comes. ``by_position`` gives them again per bucket of
    positions (``buckets`` of `position_buckets`), each with its own intervals."""
    import torch

    device = device or scoring_device()
    windows = []
    with reference.log_probs() as stored:
        vocabulary = stored.vocabulary
        chunk = positions_per_chunk(device, vocabulary)
        for index, logits in enumerate(window_logits):
            if index >= len(reference.tokens):
                raise RuntimeError(f"runtime returned more windows than the {len(reference.tokens)} of the reference")
            log_probs = torch.from_numpy(stored.window(index)).to(device)
            windows.append(window_scores(logits, reference.tokens[index], log_probs, reference.nll[index],
                                         reference.top1[index], chunk=chunk))
            if progress:
                progress(index + 1)
    if len(windows) != len(reference.tokens):
        raise RuntimeError(f"runtime returned {len(windows)} windows, expected {len(reference.tokens)}")
    stacked = {key: np.stack([window[key] for window in windows]) for key in FIGURES}  # [W, T-1]
    half = reference.tokens.shape[1] // 2
    per_window = {key: values.mean(axis=1) for key, values in stacked.items()}
    return {
        **summarize({key: values.reshape(-1) for key, values in stacked.items()}),
        "ci95": bootstrap_ci95(per_window),
        "second_half": {"positions": f"{half}..{reference.tokens.shape[1] - 2} of each window, as llama-perplexity "
                                     "scores them",
                        **summarize({key: values[:, half:].reshape(-1) for key, values in stacked.items()})},
        "by_position": {label: {"positions": f"{start}..{stop - 1}", **_bucket(stacked, start, stop)}
                        for label, start, stop in buckets(position_buckets, stacked["kld"].shape[1])},
        "per_window": {"mean_nll": per_window["nll"].tolist(), "mean_reference_nll": per_window["reference_nll"].tolist(),
                       "mean_kld": per_window["kld"].tolist(), "top1_agreement": per_window["top1"].tolist()},
        "vocabulary": vocabulary,
        "scoring_device": device,
    }


def buckets(starts: Sequence[int], positions: int) -> list[tuple[str, int, int]]:
    """(name, first position, last + 1) of each bucket (``config.bucket_labels``) that holds some
    of a window's `positions` scored positions, the last one cut at the window's end."""
    from pipeline.config import bucket_labels

    ends = [*starts[1:], positions]
    return [(label, start, min(end, positions))
            for label, start, end in zip(bucket_labels(list(starts)), starts, ends) if start < positions]


def _bucket(stacked: dict[str, np.ndarray], start: int, stop: int) -> dict[str, Any]:
    """The headline figures and their intervals over positions start..stop-1 of every window."""
    part = {key: values[:, start:stop] for key, values in stacked.items()}
    figures = summarize({key: values.reshape(-1) for key, values in part.items()})
    figures.pop("llama_cpp")
    return {**figures, "ci95": bootstrap_ci95({key: values.mean(axis=1) for key, values in part.items()})}


def tokenizer_mismatch(reference_ids: list[int], artifact_ids: list[int]) -> dict[str, Any]:
    """How differently the artifact's tokenizer splits the evaluation text.

    mismatch = share of the reference's tokens not matched, in order, by the artifact's
    tokenization (difflib longest-matching-blocks alignment; skipped when they are equal).
    """
    if reference_ids == artifact_ids:
        matched = len(reference_ids)
    else:
        matcher = difflib.SequenceMatcher(None, reference_ids, artifact_ids, autojunk=False)
        matched = sum(block.size for block in matcher.get_matching_blocks())
    return {
        "reference_tokens": len(reference_ids),
        "artifact_tokens": len(artifact_ids),
        "mismatch": 1.0 - matched / max(len(reference_ids), 1),
    }
