"""Accuracy gate: perplexity, KL divergence and top-1 agreement against the reference.

For every window the artifact is fed the reference's token ids; position p predicts token
p+1. With Q the artifact's next-token distribution and P the reference's:

- NLL_p = -log Q(t_{p+1}); ppl = exp(mean NLL); ppl_ratio = ppl / reference ppl.
- KLD_p is computed over k+1 buckets: the reference's top-k tokens one by one plus one bucket
  for all remaining mass,

      KLD_p = sum_{i in topk} P_i (log P_i - log Q_i) + P_rest (log P_rest - log Q_rest),
      P_rest = 1 - sum_{topk} P_i,   Q_rest = 1 - sum_{topk} Q_i.

  This is the exact KL divergence between the two distributions coarsened to those k+1
  buckets, so it never exceeds the full-vocabulary KL (data-processing inequality) and
  equals it when k is the vocabulary size. mean_kld averages KLD_p over all positions.
- top1_agreement = share of positions where argmax Q is the reference's top-1 token.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import numpy as np

# Q_rest can round to zero (or below) in float arithmetic; clamp it like llama.cpp's KLD does.
_MIN_PROB = 1e-12


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=1)
    return peak.astype(np.float64) + np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64))


def window_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of the next token ([T, V] logits, [T] tokens)."""
    logits = np.asarray(logits[:-1], dtype=np.float32)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    return _logsumexp(logits) - logits[np.arange(len(targets)), targets].astype(np.float64)


def window_scores(logits: np.ndarray, tokens: np.ndarray, ref_ids: np.ndarray,
                  ref_logprobs: np.ndarray, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Per-position NLL, KLD and top-1 agreement for one window.

    logits: [T, V] artifact logits; tokens: [T]; ref_ids / ref_logprobs: [T-1, k].
    Positions are scored `chunk` at a time (every figure is per position), so the scratch
    memory is chunk x V floats however large the vocabulary: about 0.13 GB at 262k.
    """
    chunk = chunk or POSITIONS_PER_CHUNK
    positions = len(tokens) - 1  # the last position predicts nothing inside the window
    parts = []
    for start in range(0, positions, chunk):
        stop = min(start + chunk, positions)
        parts.append(_chunk_scores(logits[start:stop], tokens[start + 1:stop + 1],
                                   ref_ids[start:stop], ref_logprobs[start:stop]))
    return {key: np.concatenate([part[key] for part in parts]) for key in ("nll", "kld", "top1")}


# positions scored at once by window_scores
POSITIONS_PER_CHUNK = 64


def _chunk_scores(logits: np.ndarray, targets: np.ndarray, ref_ids: np.ndarray,
                  ref_logprobs: np.ndarray) -> dict[str, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float32)
    lse = _logsumexp(logits)
    targets = np.asarray(targets, dtype=np.int64)
    nll = lse - logits[np.arange(len(targets)), targets].astype(np.float64)

    log_q_top = np.take_along_axis(logits, ref_ids.astype(np.int64), axis=1).astype(np.float64) - lse[:, None]
    log_p_top = ref_logprobs.astype(np.float64)
    p_top = np.exp(log_p_top)
    kld = (p_top * (log_p_top - log_q_top)).sum(axis=1)
    p_rest = np.clip(1.0 - p_top.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(log_q_top).sum(axis=1), _MIN_PROB, 1.0)
    has_rest = p_rest > _MIN_PROB
    kld[has_rest] += p_rest[has_rest] * (np.log(p_rest[has_rest]) - np.log(q_rest[has_rest]))

    top1 = logits.argmax(axis=1) == ref_ids[:, 0]
    return {"nll": nll, "kld": kld, "top1": top1}


def summarize(nll: np.ndarray, kld: np.ndarray, top1: np.ndarray, ref_nll: np.ndarray) -> dict[str, float]:
    ppl = float(np.exp(nll.mean()))
    ref_ppl = float(np.exp(ref_nll.mean()))
    return {
        "eval_tokens": int(nll.size),
        "ppl": ppl,
        "reference_ppl": ref_ppl,
        "ppl_ratio": ppl / ref_ppl,
        "mean_kld": float(kld.mean()),
        "p99_kld": float(np.quantile(kld, 0.99)),
        "top1_agreement": float(top1.mean()),
    }


def score(window_logits: Iterable[np.ndarray], reference, progress=None) -> dict[str, float]:
    """Score every reference window; `window_logits` yields [T, V] logits in window order."""
    nll, kld, top1 = [], [], []
    for index, logits in enumerate(window_logits):
        scores = window_scores(logits, reference.tokens[index], reference.topk_ids[index],
                               reference.topk_logprobs[index])
        nll.append(scores["nll"])
        kld.append(scores["kld"])
        top1.append(scores["top1"])
        if progress:
            progress(index + 1)
    if len(nll) != len(reference.tokens):
        raise RuntimeError(f"runtime returned {len(nll)} windows, expected {len(reference.tokens)}")
    return summarize(np.concatenate(nll), np.concatenate(kld), np.concatenate(top1),
                     reference.nll.reshape(-1))


def tokenizer_mismatch(reference_ids: list[int], artifact_ids: list[int]) -> dict[str, Any]:
    """How differently the artifact's tokenizer splits the evaluation text.

    mismatch = share of the reference's tokens not matched, in order, by the artifact's
    tokenization (difflib longest-matching-blocks alignment).
    """
    matcher = difflib.SequenceMatcher(None, reference_ids, artifact_ids, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    return {
        "reference_tokens": len(reference_ids),
        "artifact_tokens": len(artifact_ids),
        "mismatch": 1.0 - matched / max(len(reference_ids), 1),
    }
