"""The vLLM runtime's argument building and result parsing, against the shapes vLLM's own
source defines (vllm/logprobs.py: Logprob, create_prompt_logprobs; vllm/v1/metrics/stats.py:
RequestStateStats). vLLM itself cannot be installed here: it needs CUDA and its own torch."""

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.gates import accuracy
from pipeline.runtimes import vllm


@dataclass
class Logprob:  # vllm/logprobs.py
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestStateStats:  # vllm/v1/metrics/stats.py
    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0
    is_corrupted: bool = False


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def prompt_logprobs(logprobs, tokens, top_n):
    """What vLLM returns for one prompt: None, then per position the top-N plus the actual
    next token (a dict, so N entries when that token is among the top N)."""
    result = [None]
    for position in range(len(tokens) - 1):
        row = logprobs[position]
        order = np.argsort(-row)
        entry = {int(t): Logprob(float(row[t]), rank=r + 1) for r, t in enumerate(order[:top_n])}
        actual = int(tokens[position + 1])
        entry.setdefault(actual, Logprob(float(row[actual]), rank=int((row > row[actual]).sum()) + 1))
        result.append(entry)
    return result


def test_engine_and_sampling_arguments():
    kwargs = vllm.engine_kwargs("artifacts/builds/awq-w4a16", max_model_len=520)
    assert kwargs["model"] == "artifacts/builds/awq-w4a16" and kwargs["max_logprobs"] == vllm.TOP_N
    assert kwargs["enable_prefix_caching"] is False and kwargs["disable_log_stats"] is False
    params = vllm.prompt_logprob_params()
    assert params["prompt_logprobs"] <= kwargs["max_logprobs"], "vLLM rejects prompt_logprobs > max_logprobs"
    assert params["max_tokens"] == 1 and params["temperature"] == 0.0
    assert vllm.generation_params(64)["min_tokens"] == 64


def test_dense_rows_give_exact_nll_and_top1_and_exact_kld_only_with_every_token():
    rng = np.random.default_rng(0)
    vocab, length = 300, 40
    artifact = log_softmax(rng.normal(size=(length, vocab)) * 3)
    reference = log_softmax(np.log(np.exp(artifact) + 0.01 * rng.random((length, vocab))))
    tokens = rng.integers(0, vocab, size=length)
    reference_of = lambda start, stop: reference[start:stop]  # noqa: E731
    exact = accuracy.window_scores(artifact, tokens, reference_of)
    rows = vllm.dense_logprobs(prompt_logprobs(artifact, tokens, top_n=16), vocab)
    assert rows.shape == (length, vocab)
    approx = accuracy.window_scores(rows, tokens, reference_of)
    np.testing.assert_allclose(approx["nll"], exact["nll"], atol=1e-5)
    np.testing.assert_array_equal(approx["top1"], exact["top1"])
    assert not np.allclose(approx["kld"], exact["kld"], rtol=0.05), "top-16 of 300 spreads the rest evenly"
    # every token returned: nothing is approximated
    full = vllm.dense_logprobs(prompt_logprobs(artifact, tokens, top_n=vocab), vocab)
    np.testing.assert_allclose(accuracy.window_scores(full, tokens, reference_of)["kld"], exact["kld"], atol=1e-5)


def test_timings_from_request_metrics_and_from_wall_clock():
    class Output:
        metrics = RequestStateStats(num_generation_tokens=64, first_token_ts=10.0, last_token_ts=10.63,
                                    first_token_latency=0.012)

    timing = vllm.request_timings(Output(), wall_s=1.0, first_token_wall_s=0.02)
    assert timing == {"ttft_s": 0.012, "decode_s": pytest.approx(0.63), "source": "request metrics"}

    class Offline:  # LLM(...) defaults to disable_log_stats=True: metrics is None
        metrics = None

    timing = vllm.request_timings(Offline(), wall_s=1.0, first_token_wall_s=0.02)
    assert timing == {"ttft_s": 0.02, "decode_s": 0.98, "source": "wall clock"}


def test_absence_is_reported_not_raised():
    if vllm.version() is None:
        assert "vLLM is not installed" in vllm.unavailable_reason()
    else:
        import torch

        assert (vllm.unavailable_reason() is None) == torch.cuda.is_available()


def fake_vllm(monkeypatch, chooser=None, cleanup=None, llm_class=None):
    """A stand-in vllm package with the names our module imports, where vLLM is absent."""
    import sys
    import types

    modules = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.distributed", "vllm.scalar_type", "vllm.model_executor", "vllm.model_executor.kernels",
        "vllm.model_executor.kernels.linear", "vllm.model_executor.kernels.linear.mixed_precision")}
    modules["vllm.scalar_type"].scalar_types = types.SimpleNamespace(uint4="uint4", uint4b8="uint4b8",
                                                                     uint8="uint8", uint8b128="uint8b128")
    modules["vllm.model_executor.kernels.linear.mixed_precision"].MPLinearLayerConfig = \
        lambda **fields: types.SimpleNamespace(**fields)
    modules["vllm.model_executor.kernels.linear"].choose_mp_linear_kernel = chooser
    modules["vllm.distributed"].cleanup_dist_env_and_memory = cleanup
    modules["vllm"].LLM = llm_class
    modules["vllm"].SamplingParams = lambda **kwargs: kwargs
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_kernel_problems_ask_vllms_own_kernel_choice_for_each_distinct_shape(monkeypatch):
    asked = []

    def choose(config):  # the rule of an older Marlin, the only kernel with zero points there
        asked.append(config)
        if config.full_weight_shape[0] % 128:
            raise ValueError("Failed to find a kernel that can implement the WNA16 linear layer. Reasons: \n"
                             " MarlinLinearKernel cannot implement due to: input not divisible by 128")
        return object

    fake_vllm(monkeypatch, chooser=choose)
    layers = {"model.layers.0.self_attn.qkv_proj": (576, 960), "model.layers.0.mlp.down_proj": (1536, 576),
              "model.layers.1.self_attn.qkv_proj": (576, 960)}
    problems = vllm.kernel_problems(layers, bits=4, group_size=64, symmetric=False, dtype="bfloat16")
    assert problems == ["model.layers.0.self_attn.qkv_proj (576 -> 960): MarlinLinearKernel cannot implement due "
                        "to: input not divisible by 128"]
    assert len(asked) == 2  # one question per distinct shape
    first = asked[0]
    assert (first.full_weight_shape, first.partition_weight_shape) == ((576, 960), (576, 960))
    assert (first.weight_type, first.zero_points, first.group_size) == ("uint4", True, 64)
    assert str(first.act_type) == "torch.bfloat16"
    assert vllm.kernel_problems(layers, bits=4, group_size=64, symmetric=True, dtype="float16") != [] and \
        asked[-1].weight_type == "uint4b8" and asked[-1].zero_points is False


def test_a_session_keeps_one_engine_until_a_longer_request_and_drops_its_last_reference_before_the_clean_up(
        monkeypatch, tmp_path):
    import json
    import weakref

    engines, at_cleanup, lengths = [], [], []

    class Core:
        stopped = False

        def shutdown(self):
            Core.stopped = True

    class LLM:
        def __init__(self, **kwargs):
            self.llm_engine = type("Engine", (), {"engine_core": Core()})()
            engines.append(weakref.ref(self))
            lengths.append(kwargs["max_model_len"])

        def generate(self, requests, params, use_tqdm=False):
            logprobs = [None] + [{1: type("Logprob", (), {"logprob": -0.1})()}] * 3
            return [type("Output", (), {"prompt_logprobs": logprobs, "outputs": [type("Completion", (), {
                "token_ids": [1]})()]})() for _ in requests]

    fake_vllm(monkeypatch, cleanup=lambda shutdown_ray: at_cleanup.append(engines[-1]() is None), llm_class=LLM)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "max_position_embeddings": 64}))
    session = vllm.open_session(tmp_path, threads=1)
    rows = list(session.window_logits(np.zeros((2, 4), dtype=np.int32)))
    list(session.generate([[1, 2]], max_tokens=2, stop_ids=[]))
    list(session.generate([[1] * 40], max_tokens=20, stop_ids=[]))
    assert len(rows) == 2 and rows[0].shape == (4, 8)
    # one engine for all three: it starts with the model's 64 positions (FIRST_MAX_MODEL_LEN or fewer)
    assert len(engines) == 1 and not Core.stopped and lengths == [64]
    list(session.window_logits(np.zeros((1, 80), dtype=np.int32)))
    assert len(engines) == 2 and Core.stopped and at_cleanup == [True]  # a longer window: the first engine went
    assert lengths == [64, 88]
    session.close()
    assert at_cleanup == [True, True] and session._llm is None
