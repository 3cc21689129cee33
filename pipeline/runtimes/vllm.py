"""vLLM as a runtime: prompt log-probs for the accuracy gate, batch-1 and concurrent speed.

Written against vLLM's offline API (``vllm.LLM``, ``SamplingParams``, ``RequestOutput``), read
in its source (vllm/entrypoints/llm.py, sampling_params.py, logprobs.py, v1/metrics/stats.py);
this module is imported only where vLLM is installed, and reports its absence otherwise.

Prompt log-probs: ``SamplingParams(prompt_logprobs=N)`` returns, per prompt token, ``None`` for
the first token and then a ``dict[token_id, Logprob]`` holding the top-N tokens plus the
actual prompt token (N or N+1 entries). They are the float32 log-softmax of the raw model
logits: vLLM's default ``logprobs_mode`` (``raw_logprobs``), which prompt log-probs follow as
well (v1/worker/gpu/sample/prompt_logprob.py, the V2 model runner 0.33 uses on CUDA). ``N`` may not exceed the engine's ``max_logprobs`` (default
20), so the engine is started with ``max_logprobs=TOP_N``.

KLD from top-N only, so approximate: the accuracy gate's KLD is over the whole vocabulary,
and vLLM returns N tokens per position. Every token outside vLLM's top-N is given an equal
share of the mass vLLM left outside its returned tokens (``dense_logprobs`` builds the [T, V]
rows that way), so the KLD is exact only where the reference's mass lies within vLLM's top-N.
NLL (the actual token is always returned) and top-1 (rank 1 is always returned) are exact.
The section's runtime name says so.

Speed: TTFT and decode time come from the request's own metrics (``RequestOutput.metrics``,
filled when the engine is started with ``disable_log_stats=False``), else from wall-clock time.

Kernels: a 4-bit layer loads only where one of vLLM's mixed-precision kernels implements its
shape, scheme and dtype; otherwise ``LLM()`` raises. ``kernel_problems`` asks the installed
vLLM's own ``choose_mp_linear_kernel`` for every layer shape first, with the config that
compressed-tensors' ``CompressedTensorsWNA16.create_weights`` builds, in the dtype vLLM's
``dtype="auto"`` serves the checkpoint in (``serving_dtype``). The config's fields are 0.33's;
``has_g_idx``, which the releases before and after it require, is filled where the installed
class has it, and a class with other fields is reported as a problem, not raised.

Memory: the engine's weights and KV cache live in its core process (vLLM's default
``VLLM_ENABLE_V1_MULTIPROCESSING=1``). A gate starts one engine (``VllmSession``) for its
accuracy windows, task requests and speed. ``max_model_len`` is fixed when an engine starts:
the first starts with ``FIRST_MAX_MODEL_LEN`` (at most the model's own positions), which every
request of a gate fits, and a longer request stops it and starts one with room for it, up to the
length vLLM derives from the config (``derived_max_model_len``; ``LLM()`` refuses a longer one),
which the task gate cuts its requests to (``Session.max_sequence_tokens``). The session
that owns an ``LLM`` shuts its process down (``engine_core.shutdown()``,
v1/engine/core_client.py), drops its own last reference and then runs vLLM's
``cleanup_dist_env_and_memory`` (vllm/distributed/parallel_state.py), as vLLM's test
fixtures do, so a second engine in the same process finds its memory free.

Checked against vLLM 0.33.0 (the version the ``vllm`` extra pins).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pipeline.runtimes import Session, hf_text_config

if TYPE_CHECKING:
    from pipeline.config import SpeedParams

# top log-probs requested per prompt position (and the engine's max_logprobs)
TOP_N = 128
# the least max_model_len an engine starts with (at most the model's own): a gate's windows,
# task requests and speed prompt all fit, so one engine serves the gate. vLLM sizes its KV
# cache by gpu_memory_utilization whatever this is; it only has to hold one such sequence.
FIRST_MAX_MODEL_LEN = 4096
GPU_MEMORY_UTILIZATION = 0.85
# float32's resolution of a sum near 1 (half an ulp): the least rest mass per returned log-prob
REST_FLOOR = 2.0**-24


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("vllm")


def name() -> str:
    return f"vLLM {version()} (KLD from the top-{TOP_N} prompt log-probs: approximate)"


def device() -> str:
    """It runs only on a CUDA GPU (``unavailable_reason`` says when there is none)."""
    return "gpu"


def unavailable_reason() -> str | None:
    if version() is None:
        return ("needs vLLM and a CUDA GPU: vLLM is not installed (the gates import it: install `qpipe[vllm]` "
                "into qpipe's own environment on a GPU host; it pins its own CUDA build of torch)")
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU for vLLM; this host has none"
    return None


def engine_kwargs(model_dir: Path, *, max_model_len: int, max_logprobs: int = TOP_N,
                  kv_cache_dtype: str = "auto") -> dict[str, Any]:
    """Arguments for ``vllm.LLM``: the checkpoint's own dtype and quantization config, the KV
    cache in `kv_cache_dtype` (auto: the model's dtype; fp8), no prefix caching (every prompt is
    computed in full), request metrics on."""
    return {
        "model": str(model_dir),
        "dtype": "auto",
        "kv_cache_dtype": kv_cache_dtype,
        "max_model_len": max_model_len,
        "max_logprobs": max_logprobs,
        "seed": 0,
        "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        "enable_prefix_caching": False,
        "disable_log_stats": False,
    }


def prompt_logprob_params(top_n: int = TOP_N) -> dict[str, Any]:
    return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_n, "detokenize": False}


def generation_params(gen_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly gen_tokens tokens."""
    return {"max_tokens": gen_tokens, "min_tokens": gen_tokens, "ignore_eos": True, "temperature": 0.0,
            "detokenize": False}


def logsumexp(values: np.ndarray) -> float:
    top = float(values.max())
    return top + float(np.log(np.exp(values - top).sum()))


def dense_logprobs(prompt_logprobs: list, vocab_size: int) -> np.ndarray:
    """[T, V] log-probs, row p predicting token p+1, from one request's prompt log-probs.

    Tokens vLLM did not return share the remaining mass of their row equally. vLLM's log-probs
    are a float32 log-softmax, so where the top token holds nearly all the mass their
    exponentials sum to 1 or more; the rest is then below float32's resolution of that sum and
    is taken as that resolution (``REST_FLOOR`` per returned token), never 0: a zero rest gave
    every unreturned token float32's least value as its log-prob, and the reference's mass there
    a KLD of 1e25 or more. The gate's log-softmax renormalizes the row. The last row (which
    predicts nothing in the window) is uniform.
    """
    length = len(prompt_logprobs)
    rows = np.full((length, vocab_size), -np.log(vocab_size), dtype=np.float32)
    for position, entry in enumerate(prompt_logprobs[1:]):
        ids = np.fromiter(entry.keys(), dtype=np.int64, count=len(entry))
        values = np.fromiter((lp.logprob for lp in entry.values()), dtype=np.float64, count=len(entry))
        missing = vocab_size - len(ids)
        if missing:
            returned = logsumexp(values)
            floor = len(ids) * REST_FLOOR
            log_rest = np.log(-np.expm1(returned)) if returned < np.log1p(-floor) else np.log(floor)
            rows[position].fill(log_rest - np.log(missing))
        rows[position, ids] = values
    return rows


def _vocab_size(model_dir: Path) -> int:
    return int(hf_text_config(model_dir)["vocab_size"])


# config keys vLLM derives a model's length from, the least of those present
# (transformers_utils/model_arch_config_convertor.py); 2048 where none is
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE scalings whose factor vLLM does not multiply that length by (config/model.py)
UNSCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def derived_max_model_len(model_dir: Path) -> int:
    """The longest sequence vLLM serves this model with unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is
    set: a larger ``max_model_len`` makes ``LLM()`` raise (``_get_and_verify_max_len``)."""
    config = hf_text_config(model_dir)
    lengths = [int(config[key]) for key in LENGTH_KEYS if isinstance(config.get(key), int)]
    derived = min(lengths) if lengths else 2048
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type and rope_type not in UNSCALED_ROPE_TYPES and rope.get("factor"):
        derived = int(derived * rope["factor"])
    return derived


def _shut_down(llm) -> None:
    """Stop the engine's core process, which holds its GPU memory."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _free_memory() -> None:
    """vLLM's own clean-up, once the owner has dropped its last reference to the engine."""
    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory(shutdown_ray=False)


def mp_linear_layer_config(config_class, **fields):
    """vLLM's ``MPLinearLayerConfig`` for one layer, as compressed-tensors' WNA16 scheme builds it.
    0.33's dataclass has no ``has_g_idx``; the releases that have it require it (a checkpoint
    without activation reordering: False)."""
    import dataclasses

    if "has_g_idx" in {field.name for field in dataclasses.fields(config_class)}:
        fields["has_g_idx"] = False
    return config_class(**fields)


def kernel_problems(layers: dict[str, tuple[int, int]], *, bits: int, group_size: int, symmetric: bool,
                    dtype: str) -> list[str]:
    """Each distinct [in, out] layer shape no mixed-precision kernel of the installed vLLM
    implements, with the layer it is found in and vLLM's own reasons (empty: all load). A vLLM
    whose kernel-selection API differs from the one read here is one problem, saying so."""
    import torch

    try:
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
        from vllm.model_executor.kernels.linear.mixed_precision import MPLinearLayerConfig
        from vllm.scalar_type import scalar_types
    except ImportError as error:
        return [f"vLLM {version()} has no kernel-selection API where qpipe reads it (checked against 0.33.0): {error}"]

    # compressed_tensors_wNa16.py: WNA16_SUPPORTED_TYPES_MAP / WNA16_ZP_SUPPORTED_TYPES_MAP
    weight_type = getattr(scalar_types, {(4, True): "uint4b8", (4, False): "uint4",
                                         (8, True): "uint8b128", (8, False): "uint8"}[(bits, symmetric)])
    problems, seen = [], set()
    for name, shape in layers.items():
        if shape in seen:
            continue
        seen.add(shape)
        try:
            config = mp_linear_layer_config(MPLinearLayerConfig, full_weight_shape=shape, partition_weight_shape=shape,
                                            weight_type=weight_type, act_type=getattr(torch, dtype),
                                            group_size=group_size, zero_points=not symmetric)
        except TypeError as error:
            return [f"vLLM {version()}'s MPLinearLayerConfig takes other fields than qpipe passes (checked against "
                    f"0.33.0): {error}"]
        try:
            choose_mp_linear_kernel(config)
        except ValueError as error:
            reasons = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
            problems.append(f"{name} ({shape[0]} -> {shape[1]}): {reasons or error}")
    return problems


def serving_dtype(config_dtype: str | None) -> str:
    """The dtype vLLM's ``dtype="auto"`` runs a checkpoint in (``_resolve_auto_dtype``): its own
    16-bit dtype, and a float32 one downcast to bfloat16 (float16 on GPUs before compute
    capability 8.0, which lack bf16)."""
    if config_dtype in ("bfloat16", "float16"):
        return config_dtype
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] < 8:
        return "float16"
    return "bfloat16"


def request_timings(output, wall_s: float, first_token_wall_s: float) -> dict[str, Any]:
    """TTFT and decode time of one request: its engine metrics where filled, else wall time
    (TTFT then is the wall time of a one-token request with the same prompt)."""
    metrics = getattr(output, "metrics", None)
    if metrics is not None and getattr(metrics, "first_token_latency", 0) > 0:
        return {"ttft_s": metrics.first_token_latency,
                "decode_s": metrics.last_token_ts - metrics.first_token_ts, "source": "request metrics"}
    return {"ttft_s": first_token_wall_s, "decode_s": wall_s - first_token_wall_s, "source": "wall clock"}


def open_session(model_dir: Path, *, threads: int, tokenizer_dir: Path | None = None,
                 kv_cache_dtype: str = "auto") -> "VllmSession":
    return VllmSession(Path(model_dir), kv_cache_dtype=kv_cache_dtype)


class VllmSession(Session):
    """One vLLM engine, started on the first request with room for the longest request so far,
    up to the length vLLM derives for the model (``max_sequence_tokens``)."""

    def __init__(self, model_dir: Path, kv_cache_dtype: str = "auto"):
        self.model_dir, self.kv_cache_dtype = model_dir, kv_cache_dtype
        self.runtime = name() + ("" if kv_cache_dtype == "auto" else f", {kv_cache_dtype} KV cache")
        self.device = device()
        self.max_sequence_tokens = derived_max_model_len(model_dir)
        self._llm = None
        self._max_model_len = 0

    def _engine(self, tokens: int):
        if tokens > self.max_sequence_tokens:
            from pipeline.errors import BadInput

            raise BadInput(f"a request of {tokens} tokens is longer than the {self.max_sequence_tokens} vLLM serves "
                           "this model with", where=f"{self.model_dir}/config.json: max_position_embeddings",
                           fix="lower reference.window_tokens or speed.prompt_tokens + speed.gen_tokens")
        if self._llm is None or tokens > self._max_model_len:
            from vllm import LLM

            self.close()
            length = min(max(tokens, FIRST_MAX_MODEL_LEN), self.max_sequence_tokens)
            self._llm = LLM(**engine_kwargs(self.model_dir, max_model_len=length, kv_cache_dtype=self.kv_cache_dtype))
            self._max_model_len = length
        return self._llm

    def window_logits(self, windows) -> Iterator[np.ndarray]:
        """Dense log-probs (``dense_logprobs``) of each window, all windows submitted at once."""
        from vllm import SamplingParams

        llm = self._engine(max(len(window) for window in windows) + 1)  # and the one generated token
        outputs = llm.generate([{"prompt_token_ids": [int(t) for t in w]} for w in windows],
                               SamplingParams(**prompt_logprob_params()), use_tqdm=False)
        vocab = _vocab_size(self.model_dir)
        for output in outputs:
            yield dense_logprobs(output.prompt_logprobs, vocab)

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        """All prompts submitted at once; stop ids through ``SamplingParams.stop_token_ids``
        (vllm/sampling_params.py)."""
        from vllm import SamplingParams

        prompts = [[int(t) for t in prompt] for prompt in prompts]
        llm = self._engine(max(len(prompt) for prompt in prompts) + max_tokens)
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts],
                               SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids),
                                              detokenize=False), use_tqdm=False)
        for output in outputs:
            yield list(output.outputs[0].token_ids)

    def measure_speed(self, prompt: list[int], speed: SpeedParams) -> dict[str, Any]:
        """Batch-1 greedy generation (median of `speed.repeats` runs after `speed.warmup`), then
        `speed.concurrency` copies of the prompt at once for output throughput."""
        from vllm import SamplingParams

        from pipeline.measure import batch1_run, summarize_runs

        llm = self._engine(len(prompt) + speed.gen_tokens)
        params = SamplingParams(**generation_params(speed.gen_tokens))
        first_token = SamplingParams(**generation_params(1))
        request = {"prompt_token_ids": list(prompt)}
        runs = []
        for run in range(speed.warmup + speed.repeats):
            started = time.perf_counter()
            llm.generate([request], first_token, use_tqdm=False)
            first_token_wall = time.perf_counter() - started
            started = time.perf_counter()
            (output,) = llm.generate([request], params, use_tqdm=False)
            wall = time.perf_counter() - started
            if run < speed.warmup:
                continue
            timing = request_timings(output, wall, first_token_wall)
            runs.append(batch1_run(len(prompt), ttft_s=timing["ttft_s"], decode_s=timing["decode_s"],
                                   decoded=len(output.outputs[0].token_ids), source=timing["source"]))
        started = time.perf_counter()
        outputs = llm.generate([request] * speed.concurrency, params, use_tqdm=False)
        wall = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {**summarize_runs(runs, concurrency=speed.concurrency, generated=generated, wall_s=wall),
                "device": device()}

    def close(self) -> None:
        if self._llm is None:
            return
        _shut_down(self._llm)
        self._llm = None  # the session held the last reference: it goes before the clean-up
        _free_memory()
