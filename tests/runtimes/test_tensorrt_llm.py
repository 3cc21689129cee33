import json

import pytest
import torch

from pipeline.runtimes import tensorrt_llm


@pytest.fixture
def gpu_host(monkeypatch):
    """Whether the host has a CUDA GPU, as host.json or nvidia-smi would say: set per test."""
    import pipeline.host

    def set_gpu(present: bool) -> None:
        monkeypatch.setattr(pipeline.host, "has_cuda_gpu", lambda: present)

    return set_gpu


def test_absent_tensorrt_llm_is_reported_not_imported(monkeypatch, gpu_host):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: None)
    gpu_host(True)
    assert "TensorRT-LLM is not installed" in tensorrt_llm.unavailable_reason()


@pytest.mark.parametrize("installed", ["1.3.0", "1.3.0rc1", "2.0.1"])
def test_versions_without_the_engine_path_point_to_the_unified_checkpoint(monkeypatch, gpu_host, installed):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: installed)
    gpu_host(True)
    reason = tensorrt_llm.unavailable_reason()
    assert f"TensorRT-LLM {installed} has no engine path" in reason
    assert "hf_checkpoint/" in reason and "1.2.x" in reason


def test_a_1_2_release_needs_a_gpu(monkeypatch, gpu_host):
    monkeypatch.setattr(tensorrt_llm, "version", lambda: "1.2.0rc2")
    gpu_host(True)
    assert tensorrt_llm.unavailable_reason() is None
    gpu_host(False)
    assert "needs a CUDA GPU" in tensorrt_llm.unavailable_reason()


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


# ---------------------------------------------------------------- running an engine, with the
# shapes TensorRT-LLM 1.2's source defines (llmapi/llm.py, sampling_params.py,
# executor/result.py); TensorRT-LLM itself cannot be installed here.


class FakeSamplingParams:
    FIELDS = {"max_tokens", "min_tokens", "ignore_eos", "temperature", "detokenize", "return_context_logits"}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        assert not unknown, f"not a SamplingParams field: {unknown}"
        self.__dict__.update(kwargs)


class FakeCompletion:
    def __init__(self, token_ids):
        self.token_ids = token_ids


class FakeRequestOutput:
    def __init__(self, context_logits=None, token_ids=()):
        self.context_logits = context_logits  # [prompt_len, padded vocab], on the host
        self.outputs = [FakeCompletion(list(token_ids))]


class FakeEngineLLM:
    """tensorrt_llm._tensorrt_engine.LLM as the runtime uses it."""

    padded_vocab = 16

    def __init__(self):
        self.shut_down = False

    def generate(self, prompts, params, use_tqdm=True):
        if prompts and isinstance(prompts[0], int):  # one token-id prompt -> one RequestOutput
            logits = torch.arange(len(prompts) * self.padded_vocab, dtype=torch.float16).reshape(len(prompts), -1)
            return FakeRequestOutput(context_logits=logits if params.return_context_logits else None)
        return [FakeRequestOutput(token_ids=range(params.max_tokens)) for _ in prompts]

    async def _stream(self, prompt, params):
        for produced in range(1, params.max_tokens + 1):
            yield FakeRequestOutput(token_ids=range(produced))

    def generate_async(self, prompt, params, streaming=False):
        assert streaming
        return self._stream(prompt, params)

    def shutdown(self):
        self.shut_down = True


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    import sys
    import types

    module = types.ModuleType("tensorrt_llm")
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    llm = FakeEngineLLM()
    monkeypatch.setattr(tensorrt_llm, "_llm", lambda engine_dir, tokenizer_dir: llm)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    return llm, tmp_path


def test_context_logits_lose_the_engines_vocabulary_padding(fake_engine):
    import numpy as np

    llm, tokenizer_dir = fake_engine
    windows = np.array([[1, 2, 3], [4, 5, 6]])
    with tensorrt_llm.open_session("engine", threads=1, tokenizer_dir=tokenizer_dir) as session:
        logits = list(session.window_logits(windows))
        assert session.runtime.endswith(" engine") and not llm.shut_down
    assert [item.shape for item in logits] == [(3, 10), (3, 10)]
    assert logits[0].dtype == np.float32 and logits[0][1, 0] == 16.0  # row 1 starts after 16 padded columns
    assert llm.shut_down


def test_speed_streams_batch_1_and_measures_concurrent_output(fake_engine):
    llm, tokenizer_dir = fake_engine
    with tensorrt_llm.open_session("engine", threads=1, tokenizer_dir=tokenizer_dir) as session:
        result = session.measure_speed(list(range(32)), gen_tokens=8, repeats=3, warmup=1, concurrency=4)
    assert len(result["runs"]) == 3 and result["concurrency"] == 4
    assert all(run["timing_source"] == "wall clock, streamed" for run in result["runs"])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms", "output_tok_s"):
        assert result[key] > 0
    assert llm.shut_down
