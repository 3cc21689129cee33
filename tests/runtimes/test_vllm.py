"""The vLLM runtime's argument building and result parsing, against the shapes vLLM's own
source defines (vllm/logprobs.py: Logprob, create_prompt_logprobs; vllm/v1/metrics/stats.py:
RequestStateStats). vLLM itself cannot be installed here: it needs CUDA and its own torch."""

from dataclasses import dataclass, field

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


@dataclass
class MPLinearLayerConfig:  # vllm/model_executor/kernels/linear/mixed_precision/MPLinearKernel.py, 0.33.0
    full_weight_shape: tuple[int, int]
    partition_weight_shape: tuple[int, int]
    weight_type: object
    act_type: object
    group_size: int
    zero_points: bool
    out_type: object = None


# vllm/config/cache.py CacheDType, 0.33.0
CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla", "nvfp4_ds_mla",
                "turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc", "octave_k3v4",
                "octave_k3v3", "octave_k3v3_compact", "ultraquant_4bit", "int4_per_token_head",
                "int8_per_token_head", "fp8_per_token_head", "nvfp4", "nvfp4_4over6")


@dataclass
class EngineArgs:  # vllm/engine/arg_utils.py, 0.33.0: the fields engine_kwargs sets (LLM(**kwargs) passes them on)
    model: str = "Qwen/Qwen3-0.6B"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    max_logprobs: int = 20
    seed: int = 0
    gpu_memory_utilization: float = 0.92
    enable_prefix_caching: bool | None = None
    disable_log_stats: bool = False

    def __post_init__(self):
        if self.kv_cache_dtype not in CACHE_DTYPES:  # CacheConfig's validation
            raise ValueError(f"Invalid kv_cache_dtype: {self.kv_cache_dtype}")


@dataclass
class MPLinearLayerConfigWithGIdx:  # the releases before and after 0.33 require has_g_idx
    full_weight_shape: tuple[int, int]
    partition_weight_shape: tuple[int, int]
    weight_type: object
    act_type: object
    group_size: int
    zero_points: bool
    has_g_idx: bool
    out_type: object = None


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
    stored = (reference[:-1], -reference[np.arange(length - 1), tokens[1:]], reference[:-1].argmax(axis=-1))
    exact = accuracy.window_scores(artifact, tokens, *stored)
    rows = vllm.dense_logprobs(prompt_logprobs(artifact, tokens, top_n=16), vocab)
    assert rows.shape == (length, vocab)
    approx = accuracy.window_scores(rows, tokens, *stored)
    np.testing.assert_allclose(approx["nll"], exact["nll"], atol=1e-5)
    np.testing.assert_array_equal(approx["top1"], exact["top1"])
    assert not np.allclose(approx["kld"], exact["kld"], rtol=0.05), "top-16 of 300 spreads the rest evenly"
    # every token returned: nothing is approximated
    full = vllm.dense_logprobs(prompt_logprobs(artifact, tokens, top_n=vocab), vocab)
    np.testing.assert_allclose(accuracy.window_scores(full, tokens, *stored)["kld"], exact["kld"], atol=1e-5)


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


def fake_vllm(monkeypatch, chooser=None, cleanup=None, llm_class=None, config_class=MPLinearLayerConfig):
    """A stand-in vllm package with the names our module imports, where vLLM is absent."""
    import sys
    import types

    modules = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.distributed", "vllm.scalar_type", "vllm.model_executor", "vllm.model_executor.kernels",
        "vllm.model_executor.kernels.linear", "vllm.model_executor.kernels.linear.mixed_precision")}
    modules["vllm.scalar_type"].scalar_types = types.SimpleNamespace(uint4="uint4", uint4b8="uint4b8",
                                                                     uint8="uint8", uint8b128="uint8b128")
    modules["vllm.model_executor.kernels.linear.mixed_precision"].MPLinearLayerConfig = config_class
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


def test_kernel_problems_fill_has_g_idx_where_the_installed_config_requires_it_and_name_an_api_they_do_not_know(
        monkeypatch):
    asked = []
    layers = {"model.layers.0.mlp.down_proj": (1536, 576)}
    fake_vllm(monkeypatch, chooser=asked.append, config_class=MPLinearLayerConfigWithGIdx)
    assert vllm.kernel_problems(layers, bits=4, group_size=64, symmetric=True, dtype="bfloat16") == []
    assert asked[0].has_g_idx is False

    @dataclass
    class Renamed:  # a release whose config has a required field qpipe does not know
        full_weight_shape: tuple
        partition_weight_shape: tuple
        weight_type: object
        activation_type: object
        group_size: int
        zero_points: bool

    fake_vllm(monkeypatch, chooser=asked.append, config_class=Renamed)
    (problem,) = vllm.kernel_problems(layers, bits=4, group_size=64, symmetric=True, dtype="bfloat16")
    assert "MPLinearLayerConfig takes other fields than qpipe passes" in problem and "act_type" in problem


def test_a_confident_position_gives_a_finite_kld_not_one_of_1e25():
    """vLLM's float32 log-softmax at a position whose top token holds all but 1e-12 of the
    mass: the returned exponentials sum to 1 or more, and the unreturned tokens used to get
    float32's minimum as their log-prob."""
    import torch

    vocab, top_n = 50_000, 128
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    logits[:, 7] = 40.0
    logprobs = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()  # float32, as vLLM computes them
    tokens = np.array([7, 7, 7])
    returned = prompt_logprobs(logprobs, tokens, top_n=top_n)
    assert any(sum(np.exp(np.float64(lp.logprob)) for lp in entry.values()) >= 1.0 for entry in returned[1:])
    rows = vllm.dense_logprobs(returned, vocab)
    assert np.isfinite(rows).all()
    stored = (logprobs[:-1], -logprobs[np.arange(2), tokens[1:]], logprobs[:-1].argmax(axis=-1))
    scores = accuracy.window_scores(rows, tokens, *stored)
    assert np.all(scores["kld"] < 1e-5), scores["kld"]
    np.testing.assert_allclose(np.exp(rows[:2].astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)


def test_the_engine_length_is_the_one_vllm_derives_from_the_config(tmp_path):
    import json

    def derived(**config):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return vllm.derived_max_model_len(tmp_path)

    assert derived(max_position_embeddings=8192) == 8192
    assert derived(max_position_embeddings=8192, seq_length=4096) == 4096  # the least of the keys
    assert derived(vocab_size=8) == 2048
    assert derived(max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 2.0}) == 8192
    assert derived(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 8.0}) == 131072
    assert derived(text_config={"max_position_embeddings": 32768}) == 32768


def test_a_float32_checkpoint_is_checked_in_the_dtype_vllm_serves_it_in():
    assert vllm.serving_dtype("float16") == "float16" and vllm.serving_dtype("bfloat16") == "bfloat16"
    assert vllm.serving_dtype("float32") == "bfloat16" and vllm.serving_dtype(None) == "bfloat16"


def test_a_session_keeps_one_engine_until_a_longer_request_and_drops_its_last_reference_before_the_clean_up(
        monkeypatch, tmp_path):
    import json
    import weakref

    from pipeline.errors import BadInput

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
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "max_position_embeddings": 8192}))
    session = vllm.open_session(tmp_path, threads=1)
    assert session.max_sequence_tokens == 8192
    rows = list(session.window_logits(np.zeros((2, 4), dtype=np.int32)))
    list(session.generate([[1, 2]], max_tokens=2, stop_ids=[]))
    list(session.generate([[1] * 4000], max_tokens=96, stop_ids=[]))
    assert len(rows) == 2 and rows[0].shape == (4, 8)
    # one engine for all three: it starts with FIRST_MAX_MODEL_LEN
    assert len(engines) == 1 and not Core.stopped and lengths == [vllm.FIRST_MAX_MODEL_LEN]
    list(session.window_logits(np.zeros((1, 5000), dtype=np.int32)))
    assert len(engines) == 2 and Core.stopped and at_cleanup == [True]  # a longer window: the first engine went
    assert lengths == [vllm.FIRST_MAX_MODEL_LEN, 5001]
    with pytest.raises(BadInput, match="longer than the 8192 vLLM serves"):  # LLM() would raise
        list(session.window_logits(np.zeros((1, 8192), dtype=np.int32)))
    assert len(engines) == 2
    session.close()
    assert at_cleanup == [True, True] and session._llm is None
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "max_position_embeddings": 64}))
    short = vllm.open_session(tmp_path, threads=1)
    list(short.generate([[1, 2]], max_tokens=2, stop_ids=[]))
    assert lengths[-1] == 64  # never more than the model's own


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_the_engine_starts_with_the_builds_kv_cache_as_vllms_engine_args_take_it(monkeypatch, tmp_path, kv_cache_dtype):
    import json
    import typing

    from pipeline.formats import awq

    started = []

    class LLM:
        def __init__(self, **kwargs):
            started.append(EngineArgs(**kwargs))

        def generate(self, requests, params, use_tqdm=False):
            return [type("Output", (), {"outputs": [type("Completion", (), {"token_ids": [1]})()]})()]

    fake_vllm(monkeypatch, llm_class=LLM)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8, "max_position_embeddings": 8192}))
    session = vllm.open_session(tmp_path, threads=1, kv_cache_dtype=kv_cache_dtype)
    list(session.generate([[1, 2]], max_tokens=1, stop_ids=[]))
    assert started[0].kv_cache_dtype == kv_cache_dtype
    assert session.runtime.endswith("fp8 KV cache") is (kv_cache_dtype == "fp8")
    assert set(typing.get_args(awq.Recipe.model_fields["kv_cache"].annotation)) <= set(CACHE_DTYPES)
