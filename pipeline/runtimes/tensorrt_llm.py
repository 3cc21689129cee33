"""TensorRT-LLM 1.2.x as a runtime: ``trtllm-build`` engines, context logits, batch-1 and concurrent speed.

Written against TensorRT-LLM 1.2 (the last release line with ``trtllm-build`` and the
TensorRT engine backend; CHANGELOG.md says when they went), read in its source: tensorrt_llm/commands/build.py (flags), llmapi/llm.py
(``_TrtLLM``, exported as ``tensorrt_llm._tensorrt_engine.LLM``: the default
``tensorrt_llm.LLM`` is the PyTorch backend and refuses an engine directory),
sampling_params.py and executor/result.py (``return_context_logits``,
``RequestOutput.context_logits``: [prompt_len, padded vocab] on the host, in the engine's
``logits_dtype``). This machine cannot install it: nothing here has run; the module is
imported only where TensorRT-LLM is installed, and reports its absence otherwise.

Accuracy builds gather context logits (``--gather_context_logits``, without which the
executor refuses ``return_context_logits``) in float32 (``--logits_dtype float32``; the
default for a bf16 model is float16).

Checked call by call against 1.2.0rc2 (the version the ``trtllm`` extra pins):
- every ``trtllm-build`` flag of ``build_command`` is in commands/build.py ``parse_arguments``
  or plugin/plugin.py ``add_plugin_argument``. ``--max_input_len`` is accepted but ignored
  with padding removal and fused attention (builder.py ``_init_max_seq_len`` says so), so
  prompts are bounded by ``--max_seq_len`` and ``--max_num_tokens``;
- ``LLM(model, tokenizer, kv_cache_config)``, ``KvCacheConfig(free_gpu_memory_fraction,
  enable_block_reuse)``, ``SamplingParams(max_tokens, min_tokens, ignore_eos, temperature,
  detokenize, return_context_logits, stop_token_ids)``, ``generate``,
  ``generate_async(streaming=True)`` and ``shutdown`` as llmapi/llm.py and sampling_params.py
  define them. ``temperature=0.0`` is
  greedy in effect: the sampler divides by t + 1e-6;
- the W8A16 handover's layout step and quantizer check: ``weight_only_kernel_layout``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.runtimes import Session

# the engine path (trtllm-build, TensorRT engines) exists in TensorRT-LLM below this version
ENGINE_PATH_REMOVED_IN = (1, 3)
KV_CACHE_MEMORY_FRACTION = 0.5


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("tensorrt-llm")


def name() -> str:
    return f"TensorRT-LLM {version()}"


def _release_tuple(text: str) -> tuple[int, int]:
    major, minor = (text.split("rc")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def device() -> str:
    """It runs only on a CUDA GPU (``unavailable_reason`` says when there is none)."""
    return "gpu"


def unavailable_reason() -> str | None:
    """Why TensorRT-LLM's engine path cannot run here, or None (no torch import: the GPU is
    host.json's, else nvidia-smi's)."""
    from pipeline.host import has_cuda_gpu

    installed = version()
    if installed is None:
        return ("needs a CUDA GPU and tensorrt_llm<1.3: TensorRT-LLM is not installed (install `qpipe[trtllm]` "
                "on a GPU host; it pins its own torch and CUDA)")
    if _release_tuple(installed) >= ENGINE_PATH_REMOVED_IN:
        return (f"TensorRT-LLM {installed} has no engine path (trtllm-build and TensorRT engines were removed "
                "after 1.2): serve the unified checkpoint hf_checkpoint/ (FP8) with its PyTorch backend, "
                "`LLM(model=...)`; INT8 legacy checkpoints need TensorRT-LLM 1.2.x")
    if not has_cuda_gpu():
        return "needs a CUDA GPU for TensorRT-LLM engines; this host has none"
    return None


def engine_target() -> dict[str, Any]:
    """What an engine is tied to: the GPU architecture and the TensorRT version."""
    import tensorrt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "sm": f"sm{major}{minor}", "tensorrt": tensorrt.__version__,
            "tensorrt_llm": version()}


def engine_dir_name(target: dict[str, Any]) -> str:
    return f"{target['sm']}-trt{target['tensorrt']}"


def gemm_plugin(quant_algo: str | None, dtype: str) -> str:
    """FP8 GEMMs through the FP8 plugin; SmoothQuant's INT8 GEMMs are TensorRT's own and
    weight-only INT8 turns on its own plugin, so the others use the model dtype's plugin."""
    return "fp8" if quant_algo == "FP8" else dtype


def build_command(checkpoint_dir: Path, output_dir: Path, *, quant_algo: str | None, kv_cache_quant_algo: str | None,
                  dtype: str, max_batch_size: int, max_input_len: int, max_seq_len: int,
                  max_num_tokens: int) -> list[str]:
    """The ``trtllm-build`` command line for an accuracy-and-speed engine."""
    command = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--max_batch_size", str(max_batch_size),
        "--max_input_len", str(max_input_len),
        "--max_seq_len", str(max_seq_len),
        "--max_num_tokens", str(max_num_tokens),
        "--gemm_plugin", gemm_plugin(quant_algo, dtype),
        "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable",
        "--gather_context_logits",
        "--logits_dtype", "float32",
        "--workers", "1",
    ]
    if quant_algo == "FP8" and kv_cache_quant_algo == "FP8":
        command += ["--use_fp8_context_fmha", "enable"]
    return command


def weight_only_kernel_layout(activation_dtype):
    """TensorRT-LLM's own layout step for an int8 [in, out] weight of its weight-only GEMM on
    this GPU: ``torch.ops.trtllm.preprocess_weights_for_mixed_gemm``, the C++ function
    (cutlass_kernels/cutlass_preprocessors.cpp) that its quantizer ``symmetric_quantize``
    applies to the codes it computes. Before handing it out, it is checked on this GPU against
    that quantizer: on a float weight whose codes TensorRT-LLM reproduces (each column's amax at
    +127), laying out TensorRT-LLM's own unprocessed codes must give its processed bytes."""
    import torch
    import tensorrt_llm  # noqa: F401  (registers torch.ops.trtllm)

    def layout(codes):
        return torch.ops.trtllm.preprocess_weights_for_mixed_gemm(codes.contiguous().cpu(), torch.int8,
                                                                   activation_dtype)

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(256, 128, generator=generator)  # [in, out]
    probe[0] = probe.abs().amax(dim=0)  # +amax in every output column
    unprocessed, processed, _ = torch.ops.trtllm._symmetric_quantize_last_axis_of_batched_matrix(probe, torch.int8)
    if not torch.equal(layout(unprocessed), processed):
        from pipeline.errors import ToolFailed

        raise ToolFailed("TensorRT-LLM's weight-only layout step does not reproduce its own quantizer's bytes here",
                         where="torch.ops.trtllm.preprocess_weights_for_mixed_gemm",
                         fix="report it with this TensorRT-LLM version; the W8A16 engine is not built")
    return layout


def build_engine(checkpoint_dir: Path, output_dir: Path, *, max_batch_size: int, max_input_len: int,
                 max_seq_len: int, max_num_tokens: int, log=print) -> dict[str, Any]:
    """Run trtllm-build on a TensorRT-LLM checkpoint; return the command and its seconds
    (``timings_s``, which the engine stage keeps in its run record)."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    quant = config.get("quantization") or {}
    command = build_command(checkpoint_dir, output_dir, quant_algo=quant.get("quant_algo"),
                            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), dtype=config["dtype"],
                            max_batch_size=max_batch_size, max_input_len=max_input_len,
                            max_seq_len=max_seq_len, max_num_tokens=max_num_tokens)
    log("engine: " + " ".join(command))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        from pipeline.errors import QpipeError

        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise QpipeError(f"trtllm-build failed (exit {result.returncode}): {' / '.join(tail)}",
                         where=str(checkpoint_dir), fix="see the command above; nothing was written to artifacts/")
    return {"command": command, "timings_s": {"trtllm_build_s": round(seconds, 2)}}


# ---------------------------------------------------------------- running an engine


def _checkpoint_of(engine_dir: Path, tokenizer_dir: Path | None) -> Path:
    """The checkpoint an engine was built from (its tokenizer and HF config): a caller must say."""
    if tokenizer_dir is None:
        raise ValueError(f"TensorRT-LLM needs the checkpoint that {engine_dir} was built from (tokenizer_dir)")
    return Path(tokenizer_dir)


def _llm(engine_dir: Path, tokenizer_dir: Path):
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import KvCacheConfig

    return LLM(model=str(engine_dir), tokenizer=str(tokenizer_dir),
               kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=KV_CACHE_MEMORY_FRACTION,
                                             enable_block_reuse=False))


def _shutdown(llm) -> None:
    import gc

    llm.shutdown()
    del llm
    gc.collect()


def context_logits_params() -> dict[str, Any]:
    return {"max_tokens": 1, "temperature": 0.0, "return_context_logits": True, "detokenize": False}


def generation_params(gen_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly gen_tokens tokens."""
    return {"max_tokens": gen_tokens, "min_tokens": gen_tokens, "ignore_eos": True, "temperature": 0.0,
            "detokenize": False}


async def _timed_stream(llm, prompt: list[int], params) -> dict[str, Any]:
    """One streamed request: wall-clock time to the first token and between tokens."""
    started = time.perf_counter()
    stamps = []
    seen = 0
    async for output in llm.generate_async(list(prompt), params, streaming=True):
        produced = len(output.outputs[0].token_ids)
        if produced > seen:
            stamps.extend([time.perf_counter()] * (produced - seen))
            seen = produced
    return {"ttft_s": stamps[0] - started, "decode_s": stamps[-1] - stamps[0], "tokens": len(stamps)}


def open_session(engine_dir: Path, *, threads: int, tokenizer_dir: Path | None = None) -> "EngineSession":
    """The engine at `engine_dir`, with the checkpoint it was built from (its tokenizer and HF
    config) at `tokenizer_dir`."""
    return EngineSession(Path(engine_dir), _checkpoint_of(engine_dir, tokenizer_dir))


class EngineSession(Session):
    """One TensorRT-LLM engine, loaded when the session opens (its sequence limits were fixed
    when it was built)."""

    def __init__(self, engine_dir: Path, checkpoint_dir: Path):
        self.checkpoint_dir = checkpoint_dir
        self.runtime, self.device = f"{name()} engine", device()
        self._llm = _llm(engine_dir, checkpoint_dir)

    def window_logits(self, windows) -> Iterator[np.ndarray]:
        """[T, V] context logits per window (the engine pads the vocabulary; the padding is cut)."""
        from tensorrt_llm import SamplingParams

        vocab = json.loads((self.checkpoint_dir / "config.json").read_text())["vocab_size"]
        params = SamplingParams(**context_logits_params())
        for window in windows:
            output = self._llm.generate([int(t) for t in window], params, use_tqdm=False)
            yield output.context_logits[:, :vocab].float().cpu().numpy()

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        """Stop ids through ``SamplingParams.stop_token_ids`` (tensorrt_llm/sampling_params.py)."""
        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids),
                                detokenize=False)
        for prompt in prompts:
            output = self._llm.generate([int(t) for t in prompt], params, use_tqdm=False)
            yield list(output.outputs[0].token_ids)

    def measure_speed(self, prompt: list[int], *, gen_tokens: int, repeats: int, warmup: int,
                      concurrency: int) -> dict[str, Any]:
        """Batch-1 greedy generation streamed (TTFT, ITL; median of `repeats` after `warmup`),
        then `concurrency` copies of the prompt at once for output throughput."""
        import asyncio

        from tensorrt_llm import SamplingParams

        from pipeline.measure import batch1_run, summarize_runs

        params = SamplingParams(**generation_params(gen_tokens))
        runs = []
        for run in range(warmup + repeats):
            timing = asyncio.run(_timed_stream(self._llm, prompt, params))
            if run < warmup:
                continue
            runs.append(batch1_run(len(prompt), ttft_s=timing["ttft_s"], decode_s=timing["decode_s"],
                                   decoded=timing["tokens"], source="wall clock, streamed"))
        started = time.perf_counter()
        outputs = self._llm.generate([list(prompt)] * concurrency, params, use_tqdm=False)
        wall = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {**summarize_runs(runs, concurrency=concurrency, generated=generated, wall_s=wall), "device": device()}

    def close(self) -> None:
        if self._llm is not None:
            _shutdown(self._llm)
            self._llm = None
