"""llama.cpp through llama-cpp-python: logits over token windows, tokenization, speed.

Token ids are always fed as ids: the reference and every gate score the same ids, never
re-tokenized text (llama.cpp's converted tokenizer can split text differently from HF's).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("llama-cpp-python")


def unavailable_reason() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # a missing package or a shared library that fails to load
        return f"llama-cpp-python does not import here ({exc})"
    return None


@contextlib.contextmanager
def native_output_to(path: Path | None = None, streams: tuple[int, ...] = (2,)) -> Iterator[None]:
    """Send what llama.cpp prints from C (model loading, a line per quantized tensor) to a
    file, or discard it, so stage output stays readable."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in streams]
    target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for fd in streams:
            os.dup2(target, fd)
        yield
    finally:
        for fd, copy in zip(streams, saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


def open_model(path: Path, *, n_ctx: int, logits_all: bool, threads: int, n_gpu_layers: int = 0):
    from llama_cpp import Llama

    with native_output_to():
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, 512),
            logits_all=logits_all,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )


def window_logits(path: Path, windows: np.ndarray, *, threads: int) -> Iterator[np.ndarray]:
    """Yield the [window_tokens, n_vocab] float32 logits of each window, evaluated from an
    empty context."""
    window_tokens = int(windows.shape[1])
    model = open_model(path, n_ctx=window_tokens, logits_all=True, threads=threads)
    try:
        for window in windows:
            model.reset()
            model.eval([int(t) for t in window])
            yield model.scores[:window_tokens]
    finally:
        model.close()


def tokenize(path: Path, text: str) -> list[int]:
    """Token ids of the text under the GGUF's own tokenizer (vocabulary only, no context:
    `Llama(vocab_only=True)` aborts in this llama.cpp, the bare model does not)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with native_output_to():
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        model.close()


def measure_speed(path: Path, prompt: list[int], *, gen_tokens: int, repeats: int, warmup: int,
                  threads: int, n_gpu_layers: int = 0) -> dict[str, Any]:
    """Batch-1 greedy generation: prefill the prompt, then decode gen_tokens one at a time.

    TTFT = prefill + choosing the first token; ITL = time between later tokens.
    Each figure is the median over `repeats` runs after `warmup` discarded runs.
    """
    import llama_cpp

    model = open_model(path, n_ctx=len(prompt) + gen_tokens + 8, logits_all=False,
                       threads=threads, n_gpu_layers=n_gpu_layers)
    n_vocab = model.n_vocab()
    runs = []
    try:
        for run in range(warmup + repeats):
            model.reset()
            started = time.perf_counter()
            model.eval(prompt)
            prefilled = time.perf_counter()
            token = _greedy(llama_cpp, model, n_vocab)
            stamps = [time.perf_counter()]
            for _ in range(gen_tokens - 1):
                model.eval([token])
                token = _greedy(llama_cpp, model, n_vocab)
                stamps.append(time.perf_counter())
            if run < warmup:
                continue
            gaps = np.diff(stamps)
            runs.append({
                "prefill_tok_s": len(prompt) / (prefilled - started),
                "decode_tok_s": (gen_tokens - 1) / (stamps[-1] - stamps[0]),
                "ttft_ms": 1000 * (stamps[0] - started),
                "itl_ms": 1000 * float(np.median(gaps)),
            })
    finally:
        model.close()
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result["runs"] = runs
    return result


def _greedy(llama_cpp, model, n_vocab: int) -> int:
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, -1)
    return int(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).argmax())
