"""Measurement helpers that runtimes, formats and gates share: a leaf, importing nothing of qpipe.

How each figure is defined and cross-checked: docs/methodology.md.
"""

from __future__ import annotations

import numpy as np


def window_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of the next token ([T, V] logits, [T] tokens)."""
    logits = np.asarray(logits[:-1], dtype=np.float32)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    peak = logits.max(axis=1)
    lse = peak.astype(np.float64) + np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def batch1_run(prompt_tokens: int, *, ttft_s: float, decode_s: float, decoded: int, source: str) -> dict:
    """One batch-1 generation's figures: prefill from the time to the first token, decode and
    ITL from the time between the first and the last of `decoded` tokens."""
    return {
        "prefill_tok_s": prompt_tokens / ttft_s,
        "decode_tok_s": (decoded - 1) / decode_s,
        "ttft_ms": 1000 * ttft_s,
        "itl_ms": 1000 * decode_s / (decoded - 1),
        "timing_source": source,
    }


def summarize_runs(runs: list[dict], *, concurrency: int, generated: int, wall_s: float) -> dict:
    """Medians of the batch-1 runs and their spread, plus output throughput of a concurrent batch."""
    import statistics

    keys = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms")
    result = {key: statistics.median(run[key] for run in runs) for key in keys}
    result["spread"] = {key: {"stdev": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0,
                              "samples": [run[key] for run in runs]} for key in keys}
    result.update({"runs": runs, "concurrency": concurrency, "output_tok_s": generated / wall_s})
    return result
