"""TensorRT-LLM as a runtime: its PyTorch backend (Hugging Face / ModelOpt unified checkpoints)
and its legacy engine backend (``trtllm-build`` engines), with context logits, batch-1 and
concurrent speed.

Two backends, one module (sections below: availability, the LLM-API session code both share,
the PyTorch backend, the legacy engine backend):
- the PyTorch backend, ``tensorrt_llm.LLM`` (the default class since 1.0): ``open_session`` on a
  checkpoint directory (config.json + safetensors; a ModelOpt unified checkpoint adds
  hf_quant_config.json). It serves FP8, NVFP4 (Blackwell only: compute capability 10.x/12.x,
  ``nvfp4_unavailable_reason``), W4A16/W4A8 AWQ and INT8 weight-only, but not INT8 SmoothQuant;
- the legacy engine backend, ``tensorrt_llm._tensorrt_engine.LLM``: ``open_engine_session`` on an
  engine that ``trtllm-build`` (``build_engine``) built from a TensorRT-LLM checkpoint. TensorRT-LLM's
  main branch deleted it in 2026 (PR #15918); ``engine_unavailable_reason`` finds a TensorRT-LLM
  without it from its package metadata (no ``trtllm-build`` console script), without importing it.

qpipe pins tensorrt-llm 1.2.1, the last release line with both backends. This machine cannot
install TensorRT-LLM and 1.2.1's own source could not be fetched here: nothing here has run on
it. The calls were read in TensorRT-LLM's source around 1.2 (1.2.0rc2, the release notes, and
main as of early 2026 for what changed), and the tests hold fakes with those shapes:
- ``tensorrt_llm.LLM(model, tokenizer=None, tokenizer_mode, skip_tokenizer_init,
  trust_remote_code, tensor_parallel_size, dtype="auto", revision, tokenizer_revision, **kwargs)``
  (llmapi/llm.py), its kwargs validated against the args model: ``max_seq_len``,
  ``max_batch_size``, ``max_num_tokens`` (default 8192), ``kv_cache_config``;
- ``KvCacheConfig`` (llmapi/llm_args.py, pydantic, unknown fields refused):
  ``free_gpu_memory_fraction``, ``enable_block_reuse`` (off: with reuse a shared prefix returns
  logits for the recomputed suffix only), ``max_attention_window`` (one window per layer; a
  shorter list repeats);
- ``SamplingParams(max_tokens, min_tokens, ignore_eos, temperature, detokenize,
  return_context_logits, stop_token_ids)`` (sampling_params.py); ``temperature=0.0`` is greedy;
  ``RequestOutput.context_logits`` (executor/result.py): [prompt_len, vocab] on the host, in the
  model's logits dtype for the PyTorch backend (bf16 for a bf16 model: the session's runtime
  name says which), in the engine's ``--logits_dtype`` (float32 here) for an engine, whose
  vocabulary is padded;
- limits: with chunked prefill off, a prompt longer than ``max_num_tokens`` raises (ValueError
  in 1.1, ``tensorrt_llm.executor.RequestError`` later) and so does prompt + max_tokens beyond
  ``max_seq_len``. Each session reports its limit as ``max_sequence_tokens`` (the task gate cuts
  its requests to it: one short of max_seq_len, as a context-logits request generates one token,
  and at most max_num_tokens) and refuses a longer request with BadInput naming the params key; an
  engine's limits are its ``config.json`` ``build_config`` (``max_seq_len``, ``max_batch_size``,
  ``max_num_tokens``). An engine queues requests beyond its ``max_batch_size`` silently, which
  caps throughput: a speed concurrency above it is refused;
- sliding windows: a TensorRT-LLM checkpoint does not carry a Hugging Face config's
  ``sliding_window`` and ``max_attention_window`` defaults to the whole sequence, so both
  sessions set it from the HF config (``attention_windows``): Mistral-style uniform windows,
  Gemma 2/3 and Qwen 2 per-layer patterns;
- ``trtllm-build`` flags (commands/build.py ``parse_arguments``, plugin/plugin.py
  ``add_plugin_argument``); ``--max_input_len`` is accepted but ignored with padding removal and
  fused attention (builder.py ``_init_max_seq_len``), so prompts are bounded by ``--max_seq_len``
  and ``--max_num_tokens``. Accuracy engines gather context logits (``--gather_context_logits``)
  in float32 (``--logits_dtype float32``);
- the W8A16 handover's layout step: the pure-Python
  ``tensorrt_llm.quantization.functional.preprocess_weights_for_mixed_gemm(tensor, quant_mode,
  act_dtype, sm_=-1, do_weight_interleave=True)``, whose signature 1.2 and main share (the C++ op
  of that name changed its arity between versions), checked on the GPU against TensorRT-LLM's own
  quantizer (``weight_only_kernel_layout``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pipeline.runtimes import Session, hf_text_config

if TYPE_CHECKING:
    from pipeline.config import SpeedParams

# the last release line with both the PyTorch backend and the legacy engine backend
LAST_ENGINE_RELEASE = "1.2.1"
KV_CACHE_MEMORY_FRACTION = 0.5
# the PyTorch backend's sequence length where the caller names none (at most the model's own)
DEFAULT_MAX_SEQ_LEN = 4096
# the PyTorch backend's batch where the caller names none; a larger speed concurrency restarts it
DEFAULT_MAX_BATCH_SIZE = 8
# TensorRT-LLM's own default max_num_tokens (llm_args.py); raised to max_seq_len where that is larger
DEFAULT_MAX_NUM_TOKENS = 8192
# compute capability major of the first GPU generation with NVFP4 kernels (Blackwell)
NVFP4_MIN_COMPUTE_MAJOR = 10

# ---------------------------------------------------------------- names and availability


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("tensorrt-llm")


def name(*, logits_dtype: str | None = None) -> str:
    """The PyTorch backend's runtime name (with the dtype its context logits come in, where known)."""
    detail = f", {logits_dtype} context logits" if logits_dtype else ""
    return f"TensorRT-LLM {version()} (PyTorch backend{detail})"


def engine_name() -> str:
    """The legacy engine backend's runtime name."""
    return f"TensorRT-LLM {version()} engine"


def device() -> str:
    """It runs only on a CUDA GPU (the availability functions say when there is none)."""
    return "gpu"


NOT_INSTALLED = ("TensorRT-LLM is not installed (install `qpipe[trtllm]` on a GPU host; it pins its own torch "
                 "and CUDA)")


def unavailable_reason() -> str | None:
    """Why the PyTorch backend cannot run here, or None (no torch import where host.json says)."""
    from pipeline.host import has_usable_gpu

    if version() is None:
        return f"needs a CUDA GPU and TensorRT-LLM: {NOT_INSTALLED}"
    if not has_usable_gpu():
        return "needs a CUDA GPU for TensorRT-LLM; this host has none that torch can use"
    return None


def has_engine_builder() -> bool:
    """Whether the installed TensorRT-LLM declares the ``trtllm-build`` console script (1.2.x
    does; releases without the legacy engine backend do not), read from its package metadata."""
    from importlib import metadata

    try:
        entry_points = metadata.distribution("tensorrt-llm").entry_points
    except metadata.PackageNotFoundError:
        return False
    return any(point.group == "console_scripts" and point.name == "trtllm-build" for point in entry_points)


def engine_unavailable_reason() -> str | None:
    """Why the legacy engine backend (trtllm-build, TensorRT engines) cannot run here, or None."""
    from pipeline.host import has_usable_gpu

    installed = version()
    if installed is None:
        return f"needs a CUDA GPU and TensorRT-LLM {LAST_ENGINE_RELEASE}: {NOT_INSTALLED}"
    if not has_usable_gpu():
        return "needs a CUDA GPU for TensorRT-LLM engines; this host has none that torch can use"
    if not has_engine_builder():
        return (f"TensorRT-LLM {installed} has no legacy engine backend (no trtllm-build; {LAST_ENGINE_RELEASE} is "
                "the last release line with it): serve the unified checkpoint hf_checkpoint/ with its PyTorch "
                f"backend; INT8 SmoothQuant checkpoints need TensorRT-LLM {LAST_ENGINE_RELEASE}")
    return None


def compute_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability as host.json (the host stage's probe) records it, else
    as nvidia-smi reports it now; None where neither says."""
    from pipeline import host, layout

    gpus = json.loads(layout.HOST_FILE.read_text()).get("gpus") if layout.HOST_FILE.is_file() else None
    for gpu in gpus or host.gpus():
        major, _, minor = str(gpu.get("compute_capability") or "").partition(".")
        if major.isdigit():
            return int(major), int(minor) if minor.isdigit() else 0
    return None


def nvfp4_unavailable_reason() -> str | None:
    """Why an NVFP4 checkpoint cannot run here, or None: the PyTorch backend on a Blackwell GPU."""
    reason = unavailable_reason()
    if reason:
        return reason
    capability = compute_capability()
    if capability is None:
        return "NVFP4 needs a Blackwell GPU (compute capability 10.0 or higher); nvidia-smi did not say this GPU's"
    if capability[0] < NVFP4_MIN_COMPUTE_MAJOR:
        return (f"NVFP4 needs a Blackwell GPU (compute capability 10.0 or higher); this GPU's is "
                f"{capability[0]}.{capability[1]}")
    return None


# ---------------------------------------------------------------- shared LLM-API session code


def attention_windows(config: dict[str, Any], max_seq_len: int) -> list[int] | None:
    """``KvCacheConfig.max_attention_window`` for a model with a sliding window (one entry per
    layer: the window, or max_seq_len for a full-attention layer); None where no window is
    shorter than max_seq_len, so that no window changes what a layer sees."""
    from pipeline.geometry import sliding_attention

    window, sliding_layers = sliding_attention(config)
    if window is None:
        return None
    windows = [min(window, max_seq_len) if sliding else max_seq_len for sliding in sliding_layers]
    return windows if any(size < max_seq_len for size in windows) else None


def kv_cache_config(windows: list[int] | None):
    """No block reuse (every prompt computed in full: with reuse a shared prefix returns context
    logits for the recomputed suffix only), and the model's sliding windows."""
    from tensorrt_llm.llmapi import KvCacheConfig

    return KvCacheConfig(free_gpu_memory_fraction=KV_CACHE_MEMORY_FRACTION, enable_block_reuse=False,
                         **({"max_attention_window": windows} if windows else {}))


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


WINDOWS_KEY = "params.yaml: reference.window_tokens"
TASKS_KEY = "params.yaml: tasks (a task request)"
SPEED_LENGTH_KEY = "params.yaml: speed.prompt_tokens + speed.gen_tokens"
SPEED_CONCURRENCY_KEY = "params.yaml: speed.concurrency"


class LlmApiSession(Session):
    """What both backends' sessions share: TensorRT-LLM's LLM API, one request at a time for
    logits and tasks, streamed batch-1 and concurrent generation for speed. A subclass sets the
    limits (``_set_limits``) and ``limit_source`` (what fixed them), and serves an LLM sized for a
    batch (``_serving``)."""

    device = "gpu"
    max_seq_len: int | None = None  # prompt + generated tokens of one request
    max_prompt_tokens: int | None = None  # max_num_tokens: a prompt in one step (chunked prefill off)
    limit_source = ""
    vocab_size = 0

    def _set_limits(self, max_seq_len: int | None, max_prompt_tokens: int | None) -> None:
        """The limits, and ``max_sequence_tokens``, which the task gate cuts its requests to: one
        short of max_seq_len, since its windows are context-logits requests, which generate one
        token, and no more than a prompt may be."""
        self.max_seq_len, self.max_prompt_tokens = max_seq_len, max_prompt_tokens
        bounds = [bound for bound in (max_seq_len and max_seq_len - 1, max_prompt_tokens) if bound]
        self.max_sequence_tokens = min(bounds) if bounds else None

    def _serving(self, batch: int = 1):
        """The LLM, able to run `batch` requests at once."""
        raise NotImplementedError

    def _check_length(self, prompt_tokens: int, generated: int, where: str) -> None:
        """BadInput for a request TensorRT-LLM would fail on (or, in some versions, crash the
        executor over): longer than max_seq_len, or a prompt beyond max_num_tokens."""
        from pipeline.errors import BadInput

        total, limit = prompt_tokens + generated, self.max_seq_len
        if limit is not None and total > limit:
            raise BadInput(f"a request of {prompt_tokens} prompt + {generated} generated tokens is longer than the "
                           f"{limit} tokens {self.runtime} runs ({self.limit_source} max_seq_len)", where=where,
                           fix=f"lower it to at most {limit} tokens in all" + self._larger_limit_fix())
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise BadInput(f"a {prompt_tokens}-token prompt is longer than the {self.max_prompt_tokens} tokens "
                           f"{self.runtime} takes in one step ({self.limit_source} max_num_tokens)", where=where,
                           fix=f"lower it to at most {self.max_prompt_tokens} prompt tokens" + self._larger_limit_fix())

    def _larger_limit_fix(self) -> str:
        return ""

    def window_logits(self, windows) -> Iterator[np.ndarray]:
        """[T, V] float32 context logits per window (the vocabulary cut to the config's, which an
        engine pads)."""
        from tensorrt_llm import SamplingParams

        params = SamplingParams(**context_logits_params())
        for window in windows:
            self._check_length(len(window), 1, WINDOWS_KEY)
            output = self._serving().generate([int(t) for t in window], params, use_tqdm=False)
            self._saw_logits(output.context_logits)
            yield output.context_logits[:, :self.vocab_size].float().cpu().numpy()

    def _saw_logits(self, logits) -> None:
        """Where the runtime name should say the dtype the logits came in."""

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        """Stop ids through ``SamplingParams.stop_token_ids`` (tensorrt_llm/sampling_params.py)."""
        from tensorrt_llm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids),
                                detokenize=False)
        for prompt in prompts:
            self._check_length(len(prompt), max_tokens, TASKS_KEY)
            output = self._serving().generate([int(t) for t in prompt], params, use_tqdm=False)
            yield list(output.outputs[0].token_ids)

    def measure_speed(self, prompt: list[int], speed: SpeedParams) -> dict[str, Any]:
        """Batch-1 greedy generation streamed (TTFT, ITL; median of `speed.repeats` after
        `speed.warmup`), then `speed.concurrency` copies of the prompt at once for output
        throughput, all in one batch."""
        import asyncio

        from tensorrt_llm import SamplingParams

        from pipeline.measure import batch1_run, summarize_runs

        self._check_length(len(prompt), speed.gen_tokens, SPEED_LENGTH_KEY)
        llm = self._serving(speed.concurrency)
        params = SamplingParams(**generation_params(speed.gen_tokens))
        runs = []
        for run in range(speed.warmup + speed.repeats):
            timing = asyncio.run(_timed_stream(llm, prompt, params))
            if run < speed.warmup:
                continue
            runs.append(batch1_run(len(prompt), ttft_s=timing["ttft_s"], decode_s=timing["decode_s"],
                                   decoded=timing["tokens"], source="wall clock, streamed"))
        started = time.perf_counter()
        outputs = llm.generate([list(prompt)] * speed.concurrency, params, use_tqdm=False)
        wall = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {**summarize_runs(runs, concurrency=speed.concurrency, generated=generated, wall_s=wall),
                "device": device()}


# ---------------------------------------------------------------- the PyTorch backend (checkpoints)


def open_session(model_dir: Path, *, threads: int, tokenizer_dir: Path | None = None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None) -> "CheckpointSession":
    """A Hugging Face or ModelOpt unified checkpoint at `model_dir` on the PyTorch backend
    (`tokenizer_dir`: where its tokenizer is, if not beside it). `max_seq_len`: the longest
    sequence it runs (default: min(4096, the model's max_position_embeddings)); `max_batch_size`:
    the batch it starts with (default 8; a larger speed concurrency restarts it)."""
    return CheckpointSession(Path(model_dir), tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None,
                             max_seq_len=max_seq_len, max_batch_size=max_batch_size)


def default_max_seq_len(config: dict[str, Any]) -> int:
    positions = config.get("max_position_embeddings")
    return min(DEFAULT_MAX_SEQ_LEN, int(positions)) if isinstance(positions, int) else DEFAULT_MAX_SEQ_LEN


def checkpoint_llm_kwargs(model_dir: Path, *, tokenizer_dir: Path | None, max_seq_len: int, max_batch_size: int,
                          windows: list[int] | None) -> dict[str, Any]:
    """Arguments for ``tensorrt_llm.LLM``: the checkpoint's own dtype and quantization config
    (hf_quant_config.json), room for a whole prompt in one step (chunked prefill stays off)."""
    return {"model": str(model_dir), **({"tokenizer": str(tokenizer_dir)} if tokenizer_dir else {}),
            "max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
            "max_num_tokens": max(DEFAULT_MAX_NUM_TOKENS, max_seq_len), "kv_cache_config": kv_cache_config(windows)}


class CheckpointSession(LlmApiSession):
    """One checkpoint on the PyTorch backend, started on the first request, restarted with a
    larger batch where a speed concurrency exceeds it (more requests than ``max_batch_size``
    would queue and cap the throughput measured)."""

    limit_source = "the session's"

    def __init__(self, model_dir: Path, *, tokenizer_dir: Path | None = None, max_seq_len: int | None = None,
                 max_batch_size: int | None = None):
        self.model_dir, self.tokenizer_dir = model_dir, tokenizer_dir
        config = hf_text_config(model_dir)
        self.vocab_size = int(config["vocab_size"])
        length = int(max_seq_len or default_max_seq_len(config))
        self._set_limits(length, max(DEFAULT_MAX_NUM_TOKENS, length))
        self.attention_windows = attention_windows(config, length)
        self.logits_dtype = config.get("torch_dtype") or config.get("dtype")
        self.runtime = name(logits_dtype=self.logits_dtype)
        self.max_batch_size = int(max_batch_size or DEFAULT_MAX_BATCH_SIZE)
        self._llm = None
        self._llm_batch = 0

    def _serving(self, batch: int = 1):
        if self._llm is None or batch > self._llm_batch:
            from tensorrt_llm import LLM

            self.close()
            size = max(self.max_batch_size, batch)
            self._llm = LLM(**checkpoint_llm_kwargs(self.model_dir, tokenizer_dir=self.tokenizer_dir,
                                                    max_seq_len=self.max_seq_len, max_batch_size=size,
                                                    windows=self.attention_windows))
            self._llm_batch = size
        return self._llm

    def _saw_logits(self, logits) -> None:
        dtype = str(getattr(logits, "dtype", "")).removeprefix("torch.")
        if dtype and dtype != self.logits_dtype:
            self.logits_dtype = dtype
            self.runtime = name(logits_dtype=dtype)

    def close(self) -> None:
        if self._llm is not None:
            _shutdown(self._llm)
            self._llm = None
            self._llm_batch = 0


# ---------------------------------------------------------------- the legacy engine backend (trtllm-build)


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


LAYOUT_FUNCTION = "tensorrt_llm.quantization.functional.preprocess_weights_for_mixed_gemm"
QUANTIZER_OP = "torch.ops.trtllm._symmetric_quantize_last_axis_of_batched_matrix"


def _layout_step_failed(step: str, error: BaseException) -> Exception:
    from pipeline.errors import ToolFailed

    message = (str(error).strip().splitlines() or [""])[0][:200]
    return ToolFailed(f"TensorRT-LLM {version()}'s {step} failed: {type(error).__name__}: {message}", where=step,
                      fix=f"install tensorrt-llm=={LAST_ENGINE_RELEASE} (the version qpipe's W8A16 handover was "
                          "read against); the W8A16 engine is not built")


def _trtllm_quantize(weight):
    """TensorRT-LLM's own weight-only quantizer: (unprocessed codes, codes in its kernel layout, scales)."""
    import torch
    import tensorrt_llm  # noqa: F401  (registers torch.ops.trtllm)

    return torch.ops.trtllm._symmetric_quantize_last_axis_of_batched_matrix(weight, torch.int8)


def weight_only_kernel_layout(activation_dtype):
    """TensorRT-LLM's own layout step for an int8 [in, out] weight of its weight-only GEMM on
    this GPU: the pure-Python ``preprocess_weights_for_mixed_gemm`` (quantization/functional.py),
    whose signature is stable across 1.2 and main, unlike the C++ op of that name. Before handing
    it out, it is checked on this GPU against TensorRT-LLM's quantizer: on a float weight whose
    codes TensorRT-LLM reproduces (each column's amax at +127), laying out the quantizer's
    unprocessed codes must give its processed bytes. A call either refuses is ToolFailed."""
    import torch

    from pipeline.errors import ToolFailed

    try:
        from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm
    except ImportError as error:
        raise _layout_step_failed(LAYOUT_FUNCTION, error) from error

    def layout(codes):
        try:
            return preprocess_weights_for_mixed_gemm(codes.contiguous().cpu(), torch.int8, activation_dtype)
        except (TypeError, RuntimeError, AssertionError) as error:
            raise _layout_step_failed(LAYOUT_FUNCTION, error) from error

    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(256, 128, generator=generator)  # [in, out]
    probe[0] = probe.abs().amax(dim=0)  # +amax in every output column
    try:
        unprocessed, processed, _ = _trtllm_quantize(probe)
    except (TypeError, RuntimeError, AttributeError, ValueError) as error:
        raise _layout_step_failed(QUANTIZER_OP, error) from error
    if not torch.equal(layout(unprocessed), processed):
        raise ToolFailed("TensorRT-LLM's weight-only layout step does not reproduce its own quantizer's bytes here",
                         where=LAYOUT_FUNCTION,
                         fix=f"report it with TensorRT-LLM {version()}; the W8A16 engine is not built")
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


def engine_build_config(engine_dir: Path) -> dict[str, Any]:
    """The limits trtllm-build fixed (its config.json's ``build_config``: max_seq_len,
    max_batch_size, max_num_tokens, ...)."""
    return json.loads((Path(engine_dir) / "config.json").read_text()).get("build_config") or {}


def _engine_llm(engine_dir: Path, tokenizer_dir: Path, windows: list[int] | None):
    from tensorrt_llm._tensorrt_engine import LLM

    return LLM(model=str(engine_dir), tokenizer=str(tokenizer_dir), kv_cache_config=kv_cache_config(windows))


def open_engine_session(engine_dir: Path, *, threads: int, tokenizer_dir: Path) -> "EngineSession":
    """The engine at `engine_dir`, with the checkpoint it was built from at `tokenizer_dir` (its
    tokenizer, and the Hugging Face config its vocabulary and sliding window are read from)."""
    if tokenizer_dir is None:
        raise ValueError(f"TensorRT-LLM needs the checkpoint that {engine_dir} was built from (tokenizer_dir)")
    return EngineSession(Path(engine_dir), Path(tokenizer_dir))


class EngineSession(LlmApiSession):
    """One TensorRT-LLM engine, loaded when the session opens; its limits were fixed when it was
    built (``engine_build_config``)."""

    limit_source = "the engine's build_config"

    def __init__(self, engine_dir: Path, checkpoint_dir: Path):
        self.engine_dir, self.checkpoint_dir = engine_dir, checkpoint_dir
        self.runtime = engine_name()
        limits = engine_build_config(engine_dir)
        self._set_limits(limits.get("max_seq_len"), limits.get("max_num_tokens"))
        self.max_batch_size = limits.get("max_batch_size")
        config = hf_text_config(checkpoint_dir)
        self.vocab_size = int(config["vocab_size"])
        self.attention_windows = attention_windows(config, self.max_seq_len) if self.max_seq_len else None
        self._llm = _engine_llm(engine_dir, checkpoint_dir, self.attention_windows)

    def _larger_limit_fix(self) -> str:
        return " or rebuild the engine with a larger engine.max_seq_len / engine.max_num_tokens (the recipe)"

    def _serving(self, batch: int = 1):
        if self.max_batch_size is not None and batch > self.max_batch_size:
            from pipeline.errors import BadInput

            raise BadInput(f"{batch} requests at once are more than the engine's max_batch_size "
                           f"{self.max_batch_size}: it would queue the rest and the throughput would be capped",
                           where=f"{SPEED_CONCURRENCY_KEY}; the recipe's engine.max_batch_size",
                           fix=f"lower speed.concurrency to at most {self.max_batch_size}, or rebuild the engine with "
                               f"engine.max_batch_size: {batch} in the recipe")
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            _shutdown(self._llm)
            self._llm = None
