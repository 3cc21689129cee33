import dataclasses
import json
import sys
import types
from importlib import metadata
from typing import Any, List, Optional

import numpy as np
import pydantic
import pytest
import torch

from pipeline.config import SpeedParams
from pipeline.errors import BadInput, ToolFailed
from pipeline.runtimes import tensorrt_llm


@pytest.fixture
def gpu_host(monkeypatch):
    """Whether the host has a CUDA GPU, as host.json or nvidia-smi would say: set per test."""
    import pipeline.host

    def set_gpu(present: bool) -> None:
        monkeypatch.setattr(pipeline.host, "has_usable_gpu", lambda: present)

    return set_gpu


@pytest.fixture
def entry_points(monkeypatch):
    """The console scripts tensorrt-llm's package metadata declares: set per test (1.2.1
    declares trtllm-build=tensorrt_llm.commands.build:main; main after PR #15918 does not)."""

    def declare(*scripts: str) -> None:
        points = [metadata.EntryPoint(name=script, value=f"tensorrt_llm.commands.{script}:main",
                                      group="console_scripts") for script in scripts]
        distribution = types.SimpleNamespace(entry_points=metadata.EntryPoints(points))
        monkeypatch.setattr(metadata, "distribution",
                            lambda name: distribution if name == "tensorrt-llm" else pytest.fail(name))

    return declare


# ---------------------------------------------------------------- availability


def test_absent_tensorrt_llm_is_reported_not_imported(monkeypatch, gpu_host):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: None)
    gpu_host(True)
    assert "TensorRT-LLM is not installed" in tensorrt_llm.unavailable_reason()
    assert "TensorRT-LLM is not installed" in tensorrt_llm.engine_unavailable_reason()


def test_the_pytorch_backend_needs_a_gpu(monkeypatch, gpu_host):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.3.0")
    gpu_host(True)
    assert tensorrt_llm.unavailable_reason() is None
    gpu_host(False)
    assert "needs a CUDA GPU" in tensorrt_llm.unavailable_reason()


def test_a_release_without_trtllm_build_has_no_engine_backend(monkeypatch, gpu_host, entry_points):
    """Found from the package's entry points, whatever its version says (main dropped the
    backend before a release number told)."""
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.3.0rc1")
    gpu_host(True)
    entry_points("trtllm-serve", "trtllm-bench", "trtllm-eval")
    reason = tensorrt_llm.engine_unavailable_reason()
    assert "TensorRT-LLM 1.3.0rc1 has no legacy engine backend" in reason
    assert "1.2.1 is the last release line" in reason and "hf_checkpoint/" in reason
    assert tensorrt_llm.unavailable_reason() is None  # the PyTorch backend still runs


def test_a_release_with_trtllm_build_runs_engines_on_a_gpu(monkeypatch, gpu_host, entry_points):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.1")
    entry_points("trtllm-build", "trtllm-serve")
    gpu_host(True)
    assert tensorrt_llm.engine_unavailable_reason() is None
    gpu_host(False)
    assert "this host has none" in tensorrt_llm.engine_unavailable_reason()


@pytest.mark.parametrize("capability, runs", [("9.0", False), ("8.9", False), ("10.0", True), ("12.0", True)])
def test_nvfp4_needs_blackwell(monkeypatch, tmp_path, gpu_host, capability, runs):
    import pipeline.host
    from pipeline import layout

    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.1")
    gpu_host(True)
    monkeypatch.setattr(layout, "HOST_FILE", tmp_path / "host.json")
    layout.HOST_FILE.write_text(json.dumps({"gpus": [{"name": "GPU", "compute_capability": capability}]}))
    monkeypatch.setattr(pipeline.host, "gpus", lambda: pytest.fail("host.json says"))
    reason = tensorrt_llm.nvfp4_unavailable_reason()
    assert (reason is None) == runs
    if not runs:
        assert "compute capability 10.0 or higher" in reason and capability in reason


def test_nvfp4_reads_nvidia_smi_without_host_json(monkeypatch, tmp_path, gpu_host):
    import pipeline.host
    from pipeline import layout

    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.1")
    gpu_host(True)
    monkeypatch.setattr(layout, "HOST_FILE", tmp_path / "host.json")
    monkeypatch.setattr(pipeline.host, "gpus", lambda: [{"name": "B200", "compute_capability": "10.0"}])
    assert tensorrt_llm.compute_capability() == (10, 0)
    assert tensorrt_llm.nvfp4_unavailable_reason() is None


# ---------------------------------------------------------------- trtllm-build


def build_command(**overrides):
    knobs = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "dtype": "bfloat16", "max_batch_size": 8,
             "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192, **overrides}
    command = tensorrt_llm.build_command("ckpt", "engine", **knobs)
    return command


def flag(command, name):
    return command[command.index(name) + 1]


def test_fp8_engine_uses_the_fp8_gemm_plugin_and_fp8_context_fmha():
    command = build_command()
    assert command[0] == "trtllm-build"
    assert flag(command, "--checkpoint_dir") == "ckpt" and flag(command, "--output_dir") == "engine"
    assert flag(command, "--gemm_plugin") == "fp8"
    assert flag(command, "--use_paged_context_fmha") == "enable"
    assert flag(command, "--use_fp8_context_fmha") == "enable"
    assert "--gather_context_logits" in command and flag(command, "--logits_dtype") == "float32"
    for name, value in [("--max_batch_size", "8"), ("--max_input_len", "1024"), ("--max_seq_len", "2048"),
                        ("--max_num_tokens", "8192")]:
        assert flag(command, name) == value


@pytest.mark.parametrize("quant_algo", ["W8A8_SQ_PER_CHANNEL", "W8A16"])
def test_int8_engines_use_the_model_dtype_gemm_plugin(quant_algo):
    command = build_command(quant_algo=quant_algo, kv_cache_quant_algo=None)
    assert flag(command, "--gemm_plugin") == "bfloat16"
    assert "--use_fp8_context_fmha" not in command


def test_sampling_params_ask_for_context_logits_and_exact_lengths():
    assert tensorrt_llm.context_logits_params()["return_context_logits"] is True
    params = tensorrt_llm.generation_params(128)
    assert params["max_tokens"] == params["min_tokens"] == 128 and params["ignore_eos"] is True


# ---------------------------------------------------------------- sliding windows


def test_a_mistral_window_applies_to_every_layer():
    config = {"model_type": "mistral", "sliding_window": 256, "num_hidden_layers": 4}
    assert tensorrt_llm.attention_windows(config, 2048) == [256] * 4


def test_no_window_where_none_is_shorter_than_the_sequence_or_it_is_off():
    assert tensorrt_llm.attention_windows({"model_type": "mistral", "sliding_window": 4096,
                                           "num_hidden_layers": 4}, 2048) is None
    assert tensorrt_llm.attention_windows({"model_type": "mistral", "sliding_window": None,
                                           "num_hidden_layers": 4}, 2048) is None
    assert tensorrt_llm.attention_windows({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": False,
                                           "num_hidden_layers": 4}, 2048) is None
    assert tensorrt_llm.attention_windows({"model_type": "llama", "num_hidden_layers": 4}, 2048) is None


def test_gemma_and_qwen_windows_follow_their_layer_patterns():
    assert tensorrt_llm.attention_windows({"model_type": "gemma2", "sliding_window": 512,
                                           "num_hidden_layers": 4}, 2048) == [512, 2048, 512, 2048]
    assert tensorrt_llm.attention_windows({"model_type": "gemma3_text", "sliding_window": 512,
                                           "sliding_window_pattern": 3, "num_hidden_layers": 6},
                                          2048) == [512, 512, 2048, 512, 512, 2048]
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert tensorrt_llm.attention_windows({"model_type": "gemma3_text", "sliding_window": 512,
                                           "layer_types": layer_types, "num_hidden_layers": 3},
                                          1024) == [512, 1024, 512]
    assert tensorrt_llm.attention_windows({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True,
                                           "max_window_layers": 2, "num_hidden_layers": 4},
                                          1024) == [1024, 1024, 256, 256]


# ---------------------------------------------------------------- fakes of TensorRT-LLM's LLM API, with
# the fields and signatures its source defines around 1.2 (llmapi/llm.py, llmapi/llm_args.py,
# sampling_params.py, executor/result.py); TensorRT-LLM itself cannot be installed here.


class FakeKvCacheConfig(pydantic.BaseModel):
    """llmapi/llm_args.py's KvCacheConfig: strict (an unknown field raises)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Optional[List[int]] = None
    sink_token_length: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = pydantic.Field(0.9, ge=0, le=1)
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: Optional[float] = None
    secondary_offload_min_priority: Optional[int] = None
    event_buffer_max_size: int = 0
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    dtype: str = "auto"
    mamba_ssm_cache_dtype: str = "auto"
    tokens_per_block: int = 32

    @pydantic.field_validator("max_attention_window")
    @classmethod
    def positive_windows(cls, value):
        if value is not None and (not value or any(not isinstance(w, int) or w <= 0 for w in value)):
            raise ValueError("max_attention_window must be a non-empty list of positive integers")
        return value


@dataclasses.dataclass
class FakeSamplingParams:
    """sampling_params.py's SamplingParams (a dataclass: an unknown keyword is a TypeError)."""

    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    bad: Any = None
    bad_token_ids: Optional[List[int]] = None
    stop: Any = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: Optional[int] = None
    use_beam_search: bool = False
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    length_penalty: Optional[float] = None
    min_p: Optional[float] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_perf_metrics: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


class FakeCompletion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class FakeRequestOutput:
    def __init__(self, context_logits=None, token_ids=()):
        self.context_logits = context_logits  # [prompt_len, vocab], on the host
        self.outputs = [FakeCompletion(list(token_ids))]


# the args model's fields the fakes accept as kwargs (a subset of TorchLlmArgs / TrtLlmArgs)
ARGS_FIELDS = {"max_seq_len", "max_batch_size", "max_num_tokens", "max_input_len", "max_beam_width",
               "kv_cache_config", "enable_chunked_prefill", "disable_overlap_scheduler", "cuda_graph_config",
               "scheduler_config", "enable_iter_perf_stats", "load_format", "skip_tokenizer_init"}


class FakeLLM:
    """What both backends' LLM classes share: upstream's named parameters, kwargs checked against
    the args model, and the request limits the executor enforces."""

    padded_vocab = 0  # 0: the config's vocabulary (the PyTorch backend); an engine pads it
    logits_dtype = torch.bfloat16

    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init=False,
                 trust_remote_code=False, tensor_parallel_size=1, dtype="auto", revision=None,
                 tokenizer_revision=None, **kwargs):
        unknown = set(kwargs) - ARGS_FIELDS
        if unknown:
            raise ValueError(f"unknown arguments: {sorted(unknown)}")
        kv_cache_config = kwargs.get("kv_cache_config")
        assert kv_cache_config is None or isinstance(kv_cache_config, FakeKvCacheConfig)
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.kv_cache_config = kv_cache_config or FakeKvCacheConfig()
        self.limits = self.own_limits(kwargs)
        self.vocab = self.padded_vocab or json.loads((self.config_dir() / "config.json").read_text())["vocab_size"]
        self.largest_batch = 0
        self.shut_down = False
        self.created.append(self)

    def config_dir(self):
        from pathlib import Path

        return Path(self.tokenizer or self.model)

    def own_limits(self, kwargs):
        return {"max_seq_len": kwargs.get("max_seq_len") or 4096, "max_num_tokens": kwargs.get("max_num_tokens", 8192),
                "max_batch_size": kwargs.get("max_batch_size") or 2048}

    def check(self, prompt, params):
        assert isinstance(params, FakeSamplingParams)
        if len(prompt) > self.limits["max_num_tokens"]:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_num_tokens {self.limits['max_num_tokens']}")
        if len(prompt) + params.max_tokens > self.limits["max_seq_len"]:
            raise ValueError(f"prompt + max_tokens exceeds max_seq_len {self.limits['max_seq_len']}")

    def generate(self, inputs, sampling_params=None, use_tqdm=True, lora_request=None):
        assert not self.shut_down
        if inputs and isinstance(inputs[0], int):  # one token-id prompt -> one RequestOutput
            self.check(inputs, sampling_params)
            self.largest_batch = max(self.largest_batch, 1)
            logits = None
            if sampling_params.return_context_logits:
                logits = torch.arange(len(inputs) * self.vocab).reshape(len(inputs), -1).to(self.logits_dtype)
            return FakeRequestOutput(context_logits=logits, token_ids=range(sampling_params.max_tokens))
        for prompt in inputs:
            self.check(prompt, sampling_params)
        self.largest_batch = max(self.largest_batch, len(inputs))
        return [FakeRequestOutput(token_ids=range(sampling_params.max_tokens)) for _ in inputs]

    async def _stream(self, prompt, params):
        for produced in range(1, params.max_tokens + 1):
            yield FakeRequestOutput(token_ids=range(produced))

    def generate_async(self, inputs, sampling_params=None, lora_request=None, streaming=False):
        assert streaming and not self.shut_down
        self.check(inputs, sampling_params)
        return self._stream(inputs, sampling_params)

    @property
    def queued(self):
        """Whether more requests came at once than the executor batches (upstream queues them silently)."""
        return self.largest_batch > self.limits["max_batch_size"]

    def shutdown(self):
        self.shut_down = True


class FakeEngineLLM(FakeLLM):
    """tensorrt_llm._tensorrt_engine.LLM: the limits are the engine's build_config."""

    padded_vocab = 16
    logits_dtype = torch.float32

    def own_limits(self, kwargs):
        from pathlib import Path

        build = json.loads((Path(self.model) / "config.json").read_text())["build_config"]
        return {key: build[key] for key in ("max_seq_len", "max_num_tokens", "max_batch_size")}


@pytest.fixture
def fake_tensorrt_llm(monkeypatch):
    """tensorrt_llm, tensorrt_llm.llmapi and tensorrt_llm._tensorrt_engine as the runtime imports them."""
    root = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    created = []

    class TorchLLM(FakeLLM):
        pass

    class EngineLLM(FakeEngineLLM):
        pass

    TorchLLM.created = EngineLLM.created = created
    root.LLM, root.SamplingParams = TorchLLM, FakeSamplingParams
    llmapi.LLM, llmapi.KvCacheConfig, llmapi.SamplingParams = TorchLLM, FakeKvCacheConfig, FakeSamplingParams
    engine.LLM = EngineLLM
    root.llmapi, root._tensorrt_engine = llmapi, engine
    for module in (root, llmapi, engine):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.1")
    return created


def test_the_fakes_refuse_what_tensorrt_llm_refuses():
    with pytest.raises(pydantic.ValidationError):
        FakeKvCacheConfig(free_gpu_memory_fraction=0.5, enable_kv_reuse=False)
    with pytest.raises(pydantic.ValidationError):
        FakeKvCacheConfig(max_attention_window=[])
    with pytest.raises(TypeError):
        FakeSamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="unknown arguments"):
        FakeLLM("model", max_model_len=4096)


# ---------------------------------------------------------------- the legacy engine backend


def write_engine(tmp_path, *, max_seq_len=64, max_batch_size=4, max_num_tokens=8192, source_config=None):
    engine_dir, checkpoint_dir = tmp_path / "engine", tmp_path / "checkpoint"
    engine_dir.mkdir()
    checkpoint_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps({"build_config": {
        "max_seq_len": max_seq_len, "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens,
        "max_input_len": 1024}}))
    config = {"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 2, **(source_config or {})}
    (checkpoint_dir / "config.json").write_text(json.dumps(config))
    return engine_dir, checkpoint_dir


def test_context_logits_lose_the_engines_vocabulary_padding(fake_tensorrt_llm, tmp_path):
    engine_dir, checkpoint_dir = write_engine(tmp_path)
    windows = np.array([[1, 2, 3], [4, 5, 6]])
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        logits = list(session.window_logits(windows))
        (llm,) = fake_tensorrt_llm
        assert session.runtime == "TensorRT-LLM 1.2.1 engine" and not llm.shut_down
    assert [item.shape for item in logits] == [(3, 10), (3, 10)]
    assert logits[0].dtype == np.float32 and logits[0][1, 0] == 16.0  # row 1 starts after 16 padded columns
    assert llm.kv_cache_config.enable_block_reuse is False
    assert llm.kv_cache_config.max_attention_window is None  # no window in a llama config
    assert llm.shut_down


def test_the_engine_applies_the_source_models_sliding_window(fake_tensorrt_llm, tmp_path):
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_seq_len=2048,
                                              source_config={"model_type": "mistral", "sliding_window": 256})
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir):
        pass
    (llm,) = fake_tensorrt_llm
    assert llm.kv_cache_config.max_attention_window == [256, 256]


@pytest.mark.parametrize("max_num_tokens, longest", [(8192, 63), (48, 48)])
def test_the_engines_limits_bound_task_requests(fake_tensorrt_llm, tmp_path, max_num_tokens, longest):
    """The task gate cuts its requests to max_sequence_tokens: its longest loglikelihood window
    (a context-logits request, one token generated) and its longest generation must both run."""
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_seq_len=64, max_num_tokens=max_num_tokens)
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        assert session.max_sequence_tokens == longest
        assert [len(row) for row in session.window_logits([list(range(longest))])] == [longest]
        assert list(session.generate([list(range(longest - 8))], max_tokens=8, stop_ids=[2])) == [list(range(8))]


@pytest.mark.parametrize("window, key", [(65, "reference.window_tokens"), (49, "reference.window_tokens")])
def test_a_window_longer_than_the_engine_takes_is_refused_before_running(fake_tensorrt_llm, tmp_path, window, key):
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_seq_len=64, max_num_tokens=48)
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        with pytest.raises(BadInput) as info:
            list(session.window_logits([list(range(window))]))
    assert key in info.value.where and "engine.max_seq_len" in info.value.fix
    assert fake_tensorrt_llm[0].largest_batch == 0


def test_a_speed_request_longer_than_the_engine_is_refused(fake_tensorrt_llm, tmp_path):
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_seq_len=64)
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        with pytest.raises(BadInput) as info:
            session.measure_speed(list(range(60)), SpeedParams(gen_tokens=8, repeats=1, warmup=0, concurrency=1))
    assert "speed.prompt_tokens" in info.value.where and "64" in info.value.what


def test_a_concurrency_beyond_the_engines_batch_is_refused(fake_tensorrt_llm, tmp_path):
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_batch_size=4)
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        with pytest.raises(BadInput) as info:
            session.measure_speed(list(range(8)), SpeedParams(gen_tokens=4, repeats=1, warmup=0, concurrency=8))
    assert "speed.concurrency" in info.value.where and "engine.max_batch_size" in info.value.where
    assert "engine.max_batch_size: 8" in info.value.fix and "at most 4" in info.value.fix
    assert fake_tensorrt_llm[0].largest_batch == 0


def test_speed_streams_batch_1_and_measures_concurrent_output(fake_tensorrt_llm, tmp_path):
    engine_dir, checkpoint_dir = write_engine(tmp_path, max_batch_size=4)
    with tensorrt_llm.open_engine_session(engine_dir, threads=1, tokenizer_dir=checkpoint_dir) as session:
        result = session.measure_speed(list(range(32)), SpeedParams(gen_tokens=8, repeats=3, warmup=1, concurrency=4))
    (llm,) = fake_tensorrt_llm
    assert len(result["runs"]) == 3 and result["concurrency"] == 4
    assert all(run["timing_source"] == "wall clock, streamed" for run in result["runs"])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms", "output_tok_s"):
        assert result[key] > 0
    assert llm.largest_batch == 4 and not llm.queued and llm.shut_down


# ---------------------------------------------------------------- the PyTorch backend


def write_checkpoint(tmp_path, **config):
    model_dir = tmp_path / "hf_checkpoint"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10,
                                                       "num_hidden_layers": 2, "torch_dtype": "bfloat16",
                                                       "max_position_embeddings": 2048, **config}))
    (model_dir / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    return model_dir


def test_a_checkpoint_runs_on_the_pytorch_backend_with_bf16_context_logits(fake_tensorrt_llm, tmp_path):
    model_dir = write_checkpoint(tmp_path)
    with tensorrt_llm.open_session(model_dir, threads=1) as session:
        assert session.max_seq_len == 2048  # min(4096, max_position_embeddings)
        assert session.max_sequence_tokens == 2047  # a window and the token its logits request generates
        logits = list(session.window_logits([[1, 2, 3]]))
        assert session.runtime == "TensorRT-LLM 1.2.1 (PyTorch backend, bfloat16 context logits)"
    (llm,) = fake_tensorrt_llm
    assert type(llm).__mro__[1] is FakeLLM and llm.model == str(model_dir)
    assert llm.kwargs["max_seq_len"] == 2048 and llm.kwargs["max_batch_size"] == 8
    assert llm.kv_cache_config.enable_block_reuse is False and llm.kv_cache_config.max_attention_window is None
    assert logits[0].shape == (3, 10) and logits[0].dtype == np.float32 and logits[0][1, 0] == 10.0
    assert llm.shut_down


def test_the_checkpoint_session_applies_its_sliding_window(fake_tensorrt_llm, tmp_path):
    model_dir = write_checkpoint(tmp_path, model_type="mistral", sliding_window=512, max_position_embeddings=32768)
    with tensorrt_llm.open_session(model_dir, threads=1) as session:
        assert session.max_seq_len == 4096 and session.max_sequence_tokens == 4095
        list(session.generate([[1, 2]], max_tokens=4, stop_ids=[]))
    assert fake_tensorrt_llm[0].kv_cache_config.max_attention_window == [512, 512]


def test_the_checkpoint_session_is_sized_for_the_speed_concurrency(fake_tensorrt_llm, tmp_path):
    model_dir = write_checkpoint(tmp_path)
    with tensorrt_llm.open_session(model_dir, threads=1) as session:
        list(session.window_logits([[1, 2, 3]]))
        result = session.measure_speed(list(range(32)), SpeedParams(gen_tokens=8, repeats=1, warmup=0, concurrency=16))
        session.measure_speed(list(range(32)), SpeedParams(gen_tokens=8, repeats=1, warmup=0, concurrency=4))
    first, second = fake_tensorrt_llm  # one restart, for the larger batch; none for the smaller
    assert first.kwargs["max_batch_size"] == 8 and first.shut_down
    assert second.kwargs["max_batch_size"] == 16 and second.largest_batch == 16 and not second.queued
    assert result["concurrency"] == 16 and second.shut_down


def test_a_request_longer_than_the_checkpoint_session_runs_is_refused(fake_tensorrt_llm, tmp_path):
    model_dir = write_checkpoint(tmp_path)
    with tensorrt_llm.open_session(model_dir, threads=1, max_seq_len=128) as session:
        assert session.max_sequence_tokens == 127
        with pytest.raises(BadInput) as info:
            list(session.generate([list(range(125))], max_tokens=4, stop_ids=[]))
    assert "tasks" in info.value.where and "128" in info.value.what
    assert fake_tensorrt_llm == []  # refused before the model loaded


# ---------------------------------------------------------------- the W8A16 layout step


@pytest.fixture
def layout_functions(monkeypatch):
    """tensorrt_llm.quantization.functional, with a layout function and a quantizer set per test."""
    quantization = types.ModuleType("tensorrt_llm.quantization")
    functional = types.ModuleType("tensorrt_llm.quantization.functional")
    quantization.functional = functional
    for module in (types.ModuleType("tensorrt_llm"), quantization, functional):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.3.0")

    def set_functions(layout, quantize):
        functional.preprocess_weights_for_mixed_gemm = layout
        monkeypatch.setattr(tensorrt_llm, "_trtllm_quantize", quantize)

    return set_functions


def transposing_quantizer(weight):
    """A quantizer whose 'kernel layout' is a transpose, with TensorRT-LLM's amax / 128 codes."""
    scale = weight.abs().amax(dim=0) / 128
    codes = torch.clamp(torch.round(weight / scale), -128, 127).to(torch.int8)
    return codes, codes.t().contiguous(), scale


def test_the_layout_step_is_checked_against_the_quantizer_and_handed_out(layout_functions):
    calls = []

    def layout(tensor, quant_mode, act_dtype, sm_=-1, do_weight_interleave=True):
        calls.append((quant_mode, act_dtype))
        return tensor.t().contiguous()

    layout_functions(layout, transposing_quantizer)
    kernel_layout = tensorrt_llm.weight_only_kernel_layout(torch.bfloat16)
    codes = torch.arange(6, dtype=torch.int8).reshape(2, 3)
    assert torch.equal(kernel_layout(codes), codes.t())
    assert calls[0] == (torch.int8, torch.bfloat16)


def test_a_layout_that_disagrees_with_the_quantizer_is_a_tool_failure(layout_functions):
    layout_functions(lambda tensor, quant_mode, act_dtype, sm_=-1, do_weight_interleave=True: tensor,
                     transposing_quantizer)
    with pytest.raises(ToolFailed, match="does not reproduce"):
        tensorrt_llm.weight_only_kernel_layout(torch.bfloat16)


def test_a_layout_function_with_another_signature_is_a_tool_failure(layout_functions):
    def two_argument_layout(tensor, quant_mode):  # the C++ op's older arity
        return tensor

    layout_functions(two_argument_layout, transposing_quantizer)
    with pytest.raises(ToolFailed) as info:
        tensorrt_llm.weight_only_kernel_layout(torch.bfloat16)
    assert "TensorRT-LLM 1.3.0" in info.value.what and "TypeError" in info.value.what
    assert info.value.where == tensorrt_llm.LAYOUT_FUNCTION and "tensorrt-llm==1.2.1" in info.value.fix


def test_a_quantizer_that_raises_is_a_tool_failure(layout_functions):
    def schema_mismatch(weight):
        raise RuntimeError("trtllm::_symmetric_quantize_last_axis_of_batched_matrix() expected at most 1 argument")

    layout_functions(lambda tensor, quant_mode, act_dtype, sm_=-1, do_weight_interleave=True: tensor,
                     schema_mismatch)
    with pytest.raises(ToolFailed) as info:
        tensorrt_llm.weight_only_kernel_layout(torch.bfloat16)
    assert info.value.where == tensorrt_llm.QUANTIZER_OP and "RuntimeError" in info.value.what
