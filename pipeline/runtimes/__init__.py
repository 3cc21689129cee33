"""Runtimes: one module each, the leaves that load an artifact and run it.

A runtime module imports nothing from formats, gates or the stages; a format module picks
its runtime and hands it the artifact's path. Every runtime has the functions of
``Runtime``; ``open_session`` loads the artifact once and returns a ``Session``, which a gate scores
its accuracy windows, task requests and speed through before closing it. A test checks each
module against ``Runtime`` (``contract_problems``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Protocol

if TYPE_CHECKING:
    from pipeline.config import SpeedParams

RUNTIMES = ("llama_cpp", "transformers", "vllm", "tensorrt_llm", "checkpoint_emulation")
SPEED_RUNTIMES = ("llama_cpp", "vllm", "tensorrt_llm")


class Session:
    """One artifact loaded by a runtime (a model, or an engine), open until ``close``; a context
    manager. ``runtime`` is what a gate result's ``runtime`` field says, ``device`` where it
    runs: "cpu", "gpu", or "gpu+cpu" (a partial offload). The task gate cuts its requests to
    ``max_sequence_tokens`` where a runtime fixes one (vLLM's derived length, an engine's
    max_seq_len)."""

    runtime: str = ""
    device: str = "cpu"
    # the longest sequence (prompt and generated tokens) it runs; None: bounded by the model only
    max_sequence_tokens: int | None = None

    def window_logits(self, windows) -> Iterator:
        """[len(window), V] float32 logits of each token window (id sequences of any lengths),
        each from an empty context."""
        raise NotImplementedError

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        """Greedy continuation ids of each prompt, up to ``max_tokens`` or the first of
        ``stop_ids``, which is kept."""
        raise NotImplementedError

    def measure_speed(self, prompt: list[int], speed: SpeedParams) -> dict[str, Any]:
        """Batch-1 prefill / decode / TTFT / ITL (``measure.summarize_runs``'s keys, or
        llama-bench's), and ``device``, under params ``speed`` (its gen_tokens, repeats, warmup
        and, where the runtime batches, concurrency); only the runtimes in ``SPEED_RUNTIMES``
        time generation."""
        raise NotImplementedError(f"{self.runtime} has no speed gate")

    def close(self) -> None:
        """Release the model or engine (and its GPU memory)."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hf_text_config(model_dir: Path) -> dict[str, Any]:
    """A Hugging Face config.json, its text_config's keys over the top level's where it has one
    (multimodal checkpoints): what vLLM and TensorRT-LLM size a model's text decoder from."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {**config, **(config.get("text_config") or {})}


class Runtime(Protocol):
    def version(self) -> str | None:
        """The installed version of the package it runs on, or None."""

    def name(self) -> str:
        """What a gate result's ``runtime`` field says."""

    def unavailable_reason(self) -> str | None:
        """Why it cannot run on this host, or None. Never raises."""

    def open_session(self, model: Path, *, threads: int, tokenizer_dir: Path | None = None) -> Session:
        """The artifact at ``model`` loaded once (``tokenizer_dir``: the checkpoint an engine
        was built from, where the runtime needs it)."""


def _signature(function) -> tuple[int, tuple[str, ...]]:
    """(positional parameters, keyword-only parameters without a default or given by the protocol)."""
    parameters = [p for name, p in inspect.signature(function).parameters.items() if name != "self"]
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    return positional, tuple(p.name for p in parameters if p.kind == p.KEYWORD_ONLY)


def contract_problems(module: ModuleType, protocol: type = Runtime) -> list[str]:
    """What ``module`` lacks or defines differently from ``protocol`` (empty: it meets it). A
    runtime may take further keyword-only parameters, with defaults."""
    problems = []
    for name in dir(protocol):
        member = getattr(protocol, name)
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        function = getattr(module, name, None)
        if not callable(function):
            problems.append(f"{name}() is missing")
            continue
        wanted_positional, wanted_keywords = _signature(member)
        positional, keywords = _signature(function)
        extra = [p for p in inspect.signature(function).parameters.values()
                 if p.kind == p.KEYWORD_ONLY and p.name not in wanted_keywords and p.default is p.empty]
        if positional != wanted_positional or not set(wanted_keywords) <= set(keywords) or extra:
            problems.append(f"{name}{inspect.signature(function)} should match {name}{inspect.signature(member)}")
    return problems
