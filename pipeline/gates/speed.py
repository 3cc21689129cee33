"""Speed gate: batch-1 prefill / decode / TTFT / ITL on the native runtime, and the roofline.

Decode at batch 1 is memory-bound: each token reads every weight once (plus the KV cache),
so the fastest possible decode rate on a host is

    roofline_tok_s = bandwidth (bytes/s) / bytes read per decoded token,

and roofline_fraction = measured decode_tok_s / roofline_tok_s says how much of the host's
measured memory bandwidth the runtime turns into tokens. The bandwidth comes from host.json
(a multi-threaded array copy, bytes read plus bytes written). Speed is never emulated:
without the native runtime the section is `not_run`.

decode_speedup (and prefill_speedup) = the artifact's rate / the unquantized model's rate in
the same format, runtime, prompt and settings, measured once per host by the baseline stage.
Both are measured, so both carry this host's run-to-run noise.
"""

from __future__ import annotations


def roofline_tok_s(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    if bandwidth_gb_s <= 0 or bytes_per_token <= 0:
        raise ValueError("bandwidth and bytes per token must be positive")
    return bandwidth_gb_s * 1e9 / bytes_per_token


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context_tokens: float,
                   bytes_per_value: int = 2) -> float:
    """Bytes of K and V a decode step reads at the given context length (f16/bf16 cache)."""
    return layers * 2 * kv_heads * head_dim * bytes_per_value * context_tokens


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
    """Medians of the batch-1 runs, plus output throughput of a concurrent batch."""
    import statistics

    result = {key: statistics.median(run[key] for run in runs)
              for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms")}
    result.update({"runs": runs, "concurrency": concurrency, "output_tok_s": generated / wall_s})
    return result


def mean_decode_context(prompt_tokens: int, gen_tokens: int) -> float:
    """Average context length over the decode steps (the KV cache read grows each step)."""
    return prompt_tokens + gen_tokens / 2


def section(measured: dict, *, runtime: str, prompt_tokens: int, gen_tokens: int, threads: int,
            bandwidth_gb_s: float | None, bytes_per_token: dict[str, float]) -> dict:
    result = {
        "status": "ok",
        "runtime": runtime,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": measured["prefill_tok_s"],
        "decode_tok_s": measured["decode_tok_s"],
        "ttft_ms": measured["ttft_ms"],
        "itl_ms": measured["itl_ms"],
        "bytes_per_token": bytes_per_token["total"],
        "roofline_tok_s": None,
        "roofline_fraction": None,
        "repeats": len(measured.get("runs", [])),
    }
    if "output_tok_s" in measured:  # runtimes that batch: throughput at params speed.concurrency
        result["concurrency"] = measured["concurrency"]
        result["output_tok_s"] = measured["output_tok_s"]
    if bandwidth_gb_s:
        roof = roofline_tok_s(bandwidth_gb_s, bytes_per_token["total"])
        result["roofline_tok_s"] = roof
        result["roofline_fraction"] = measured["decode_tok_s"] / roof
    return result


def with_speedup(section: dict, baseline: dict | None) -> dict:
    if not baseline or baseline.get("status") != "ok":
        section["decode_speedup"] = section["prefill_speedup"] = None
        section["decode_speedup_reason"] = (baseline or {}).get("reason", "no baseline measured (run the baseline stage)")
        return section
    section["baseline_decode_tok_s"] = baseline["decode_tok_s"]
    section["decode_speedup"] = section["decode_tok_s"] / baseline["decode_tok_s"]
    section["prefill_speedup"] = section["prefill_tok_s"] / baseline["prefill_tok_s"]
    return section
