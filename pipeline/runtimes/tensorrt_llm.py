"""TensorRT-LLM 1.2.x as a runtime: ``trtllm-build`` engines, context logits, batch-1 and concurrent speed.

Written against TensorRT-LLM 1.2 (the last release line with ``trtllm-build`` and the
TensorRT engine backend; both were deprecated in February 2026 and removed from main in
mid-2026), read in its source: tensorrt_llm/commands/build.py (flags), llmapi/llm.py
(``_TrtLLM``, exported as ``tensorrt_llm._tensorrt_engine.LLM``: the default
``tensorrt_llm.LLM`` is the PyTorch backend and refuses an engine directory),
sampling_params.py and executor/result.py (``return_context_logits``,
``RequestOutput.context_logits``: [prompt_len, padded vocab] on the host, in the engine's
``logits_dtype``). This machine cannot install it: nothing here has run; the module is
imported only where TensorRT-LLM is installed, and reports its absence otherwise.

Accuracy builds gather context logits (``--gather_context_logits``, without which the
executor refuses ``return_context_logits``) in float32 (``--logits_dtype float32``; the
default for a bf16 model is float16).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

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


def unavailable_reason(has_gpu: bool | None = None) -> str | None:
    """Why TensorRT-LLM's engine path cannot run here, or None. ``has_gpu`` from host.json
    (the engine stage, which must not import torch), else asked of torch."""
    installed = version()
    if installed is None:
        return ("needs a CUDA GPU and tensorrt_llm<1.3: TensorRT-LLM is not installed (install `qpipe[trtllm]` "
                "on a GPU host; it pins its own torch and CUDA)")
    if _release_tuple(installed) >= ENGINE_PATH_REMOVED_IN:
        return (f"TensorRT-LLM {installed} has no engine path (trtllm-build and TensorRT engines were removed "
                "after 1.2): serve the unified checkpoint hf_checkpoint/ (FP8) with its PyTorch backend, "
                "`LLM(model=...)`; INT8 legacy checkpoints need TensorRT-LLM 1.2.x")
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    if not has_gpu:
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


def weight_only_float_checkpoint(checkpoint_dir: Path, out_dir: Path) -> Path:
    """TensorRT-LLM 1.2 takes an int8 W8A16 weight in a checkpoint as already in the
    transposed, preprocessed layout of its weight-only kernels (``preprocess_weights``), while
    ModelOpt writes plain [out, in] codes. TensorRT-LLM's own ModelOpt flow writes float
    weights and lets the loader quantize them per output channel (amax / 127); so does this,
    in fp32, where code x scale re-quantizes to exactly the stored code (in bf16 the rounding
    of each row's amax can move a code by one)."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.runtimes.checkpoint_emulation import dequantize

    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(checkpoint_dir).glob("rank*.safetensors")):
        tensors = load_file(path)
        converted = {}
        for key, tensor in tensors.items():
            if key.endswith(".weights_scaling_factor"):
                continue
            scale = tensors.get(key.removesuffix(".weight") + ".weights_scaling_factor")
            converted[key] = dequantize(tensor, scale) if tensor.dtype == torch.int8 else tensor
        save_file(converted, out_dir / path.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=4))
    return out_dir


def build_engine(checkpoint_dir: Path, output_dir: Path, knobs, *, log=print) -> dict[str, Any]:
    """Run trtllm-build on a ModelOpt TensorRT-LLM checkpoint; return the command and timing."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    quant = config.get("quantization") or {}
    source = Path(checkpoint_dir)
    if quant.get("quant_algo") == "W8A16":
        source = weight_only_float_checkpoint(source, output_dir.parent / (output_dir.name + ".w8a16-input"))
    command = build_command(source, output_dir, quant_algo=quant.get("quant_algo"),
                            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), dtype=config["dtype"],
                            max_batch_size=knobs.max_batch_size, max_input_len=knobs.max_input_len,
                            max_seq_len=knobs.max_seq_len, max_num_tokens=knobs.max_num_tokens)
    log("engine: " + " ".join(command))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if source != Path(checkpoint_dir):
        shutil.rmtree(source)
    if result.returncode != 0:
        from pipeline.errors import QpipeError

        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise QpipeError(f"trtllm-build failed (exit {result.returncode}): {' / '.join(tail)}",
                         where=str(checkpoint_dir), fix="see the command above; nothing was written to artifacts/")
    return {"command": command, "build_s": round(seconds, 2)}


def build_unquantized_engine(source_dir: Path, scratch: Path, knobs) -> Path:
    """An unquantized (bf16) engine of an HF checkpoint, for the baseline: ModelOpt's exporter
    writes the unquantized TensorRT-LLM checkpoint (with the same RoPE-base fix as the
    quantized builds), trtllm-build builds it like the others."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.formats.modelopt import decoder_type, export_trtllm

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.bfloat16)
    checkpoint = scratch / "checkpoint"
    export_trtllm(model, decoder_type(type(model).__name__, str(source_dir)), torch.bfloat16, checkpoint, source_dir)
    build_engine(checkpoint, scratch / "engine", knobs)
    return scratch / "engine"


# ---------------------------------------------------------------- running an engine


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


def window_logits(engine_dir: Path, windows: np.ndarray, *, tokenizer_dir: Path) -> Iterator[np.ndarray]:
    """[T, V] context logits per window (the engine pads the vocabulary; the padding is cut)."""
    from tensorrt_llm import SamplingParams

    vocab = json.loads((Path(tokenizer_dir) / "config.json").read_text())["vocab_size"]
    llm = _llm(engine_dir, tokenizer_dir)
    try:
        params = SamplingParams(**context_logits_params())
        for window in windows:
            output = llm.generate([int(t) for t in window], params, use_tqdm=False)
            yield output.context_logits[:, :vocab].float().cpu().numpy()
    finally:
        _shutdown(llm)


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


def measure_speed(engine_dir: Path, prompt: list[int], *, tokenizer_dir: Path, gen_tokens: int, repeats: int,
                  warmup: int, concurrency: int) -> dict[str, Any]:
    """Batch-1 greedy generation streamed (TTFT, ITL; median of `repeats` after `warmup`),
    then `concurrency` copies of the prompt at once for output throughput."""
    import asyncio

    from tensorrt_llm import SamplingParams

    from pipeline.gates.speed import batch1_run, summarize_runs

    llm = _llm(engine_dir, tokenizer_dir)
    params = SamplingParams(**generation_params(gen_tokens))
    runs = []
    try:
        for run in range(warmup + repeats):
            timing = asyncio.run(_timed_stream(llm, prompt, params))
            if run < warmup:
                continue
            runs.append(batch1_run(len(prompt), ttft_s=timing["ttft_s"], decode_s=timing["decode_s"],
                                   decoded=timing["tokens"], source="wall clock, streamed"))
        started = time.perf_counter()
        outputs = llm.generate([list(prompt)] * concurrency, params, use_tqdm=False)
        wall = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    finally:
        _shutdown(llm)
    return summarize_runs(runs, concurrency=concurrency, generated=generated, wall_s=wall)
