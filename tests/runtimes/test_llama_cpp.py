"""The llama.cpp runtime on the real embedded GGUF (a Q4_1 file llama.cpp loads as is)."""

import numpy as np
import pytest

from pipeline.config import SpeedParams
from pipeline.runtimes import llama_cpp
from pipeline.source import embedded_gguf


@pytest.fixture(scope="module")
def model_path():
    return embedded_gguf("smollm2-135m")


def scored(path, windows) -> list[np.ndarray]:
    with llama_cpp.open_session(path, threads=2) as session:
        return [logits.copy() for logits in session.window_logits(windows)]


def generated(path, prompts, max_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    with llama_cpp.open_session(path, threads=2) as session:
        return list(session.generate(prompts, max_tokens=max_tokens, stop_ids=stop_ids))


def test_window_logits_shape_and_determinism(model_path):
    tokens = np.array(llama_cpp.tokenize(model_path, "def add(a, b):\n    return a + b\n" * 3)[:24])
    windows = np.stack([tokens, tokens])
    first, second = scored(model_path, windows)
    assert first.shape == (24, 49152)
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=1e-4, atol=1e-4)
    # the model predicts the repeated code: most next tokens in the 2nd and 3rd copy are top-1
    predicted = first[:-1].argmax(axis=1) == tokens[1:]
    assert predicted[len(tokens) // 2:].mean() > 0.5


def test_measure_speed_takes_prefill_and_decode_from_llama_bench_and_latency_from_the_api(model_path):
    prompt = llama_cpp.tokenize(model_path, "The quick brown fox jumps over the lazy dog. " * 4)
    result = llama_cpp.measure_speed(model_path, prompt, SpeedParams(gen_tokens=8, repeats=2, warmup=1), threads=2)
    for key in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_ms", "api_decode_tok_s"]:
        assert result[key] > 0
    assert len(result["runs"]) == 2
    spread = result["spread"]
    assert len(spread["decode_tok_s"]["samples"]) == 2 and len(spread["prefill_tok_s"]["samples"]) == 2
    assert result["decode_tok_s"] == pytest.approx(sum(spread["decode_tok_s"]["samples"]) / 2, rel=1e-3)
    assert spread["itl_ms"]["p10"] <= result["itl_ms"] <= spread["itl_ms"]["p90"]
    assert f"pp{len(prompt)} and tg8 at depth {len(prompt)}" in result["timing_source"]
    assert (result["device"], result["offloaded_layers"], result["layers"]) == ("cpu", 0, 31)  # 30 blocks + output
    assert result["backends"] == "CPU"  # llama-bench's own record


def test_offload_follows_llama_cpps_own_answer(model_path, monkeypatch):
    import llama_cpp as bindings

    # this build's real answer: the CPU-only wheel CI builds cannot offload
    assert llama_cpp.supports_gpu_offload() is bool(bindings.llama_supports_gpu_offload()) is False
    assert [llama_cpp.gpu_layers(n) for n in (-1, 0, 12)] == [0, 0, 0]
    monkeypatch.setattr(bindings, "llama_supports_gpu_offload", lambda: True)  # a CUDA build's answer
    assert [llama_cpp.gpu_layers(n) for n in (-1, 0, 12)] == [llama_cpp.ALL_LAYERS, 0, 12]
    assert llama_cpp.offload(model_path, llama_cpp.ALL_LAYERS)["device"] == "gpu"
    assert llama_cpp.offload(model_path, 12) == {"n_gpu_layers": 12, "offloaded_layers": 12, "layers": 31,
                                                 "device": "gpu+cpu"}


@pytest.mark.parametrize("offloads, requested, expected", [(False, -1, 0), (True, -1, llama_cpp.ALL_LAYERS),
                                                           (True, 12, 12)])
def test_each_offload_branch_passes_its_layers_to_llama_bench_and_the_api(model_path, monkeypatch, tmp_path, offloads,
                                                                          requested, expected):
    """The GGUF format reads params speed.n_gpu_layers from the speed params it is handed, and
    the KV-cache types from the build's record."""
    import llama_cpp as bindings

    from pipeline.formats import gguf

    monkeypatch.setattr(bindings, "llama_supports_gpu_offload", lambda: offloads)
    commands, opened = [], []

    def bench(command, **kwargs):
        commands.append(command)
        depth = int(command[command.index("-d") + 1]) if "-d" in command else 0
        record = {"avg_ts": 10.0, "stddev_ts": 0.0, "samples_ts": [10.0], "build_commit": "x", "backends": "CPU",
                  "n_depth": depth}
        return type("Done", (), {"returncode": 0, "stdout": __import__("json").dumps([record]), "stderr": ""})()

    monkeypatch.setattr(llama_cpp.subprocess, "run", bench)
    monkeypatch.setattr(llama_cpp, "api_latency", lambda *a, **k: opened.append(k["n_gpu_layers"]) or
                        {"ttft_ms": 1.0, "itl_ms": 1.0, "decode_tok_s": 10.0, "itl_p10_ms": 1.0, "itl_p90_ms": 1.0})
    monkeypatch.setattr(llama_cpp, "open_model", lambda *a, **k: opened.append(k["n_gpu_layers"]) or
                        (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(gguf, "artifact_path", lambda build_dir: model_path)
    (tmp_path / "build.json").write_text('{"kv_cache": {"k": "q8_0", "v": "q4_0"}}')
    speed = SpeedParams(gen_tokens=4, repeats=1, warmup=0, concurrency=1, n_gpu_layers=requested)
    with gguf.open_session(tmp_path, 2, speed) as session:
        measured = session.measure_speed([1, 2, 3], speed)
        assert all(command[command.index("-ngl") + 1] == str(expected) for command in commands) and len(commands) == 2
        assert all(command[command.index("-ctk"):command.index("-ctv") + 2] == ["-ctk", "q8_0", "-ctv", "q4_0"]
                   for command in commands)
        assert measured["device"] == llama_cpp.offload(model_path, expected)["device"] and opened == [expected]
        assert measured["n_gpu_layers"] == expected
        with pytest.raises(RuntimeError, match="stop"):
            list(session.window_logits(np.zeros((1, 4), dtype=np.int32)))
        assert opened == [expected, expected]
        assert session.device == measured["device"]


def test_llama_bench_records_are_its_own_json(model_path):
    records = llama_cpp.llama_bench(model_path, prompt_tokens=16, gen_tokens=4, repeats=1, threads=1)
    assert (records["prefill"]["n_prompt"], records["prefill"]["n_gen"], records["prefill"]["n_depth"]) == (16, 0, 0)
    assert (records["decode"]["n_prompt"], records["decode"]["n_gen"], records["decode"]["n_depth"]) == (0, 4, 16)
    assert records["decode"]["n_threads"] == 1 and records["decode"]["n_gpu_layers"] == 0
    assert records["decode"]["flash_attn"] == 1  # on, as the Python API runs it


def test_llama_bench_measures_decode_at_each_depth_in_one_run_with_the_cache_types(model_path):
    records = llama_cpp.llama_bench(model_path, prompt_tokens=16, gen_tokens=4, repeats=1, threads=1,
                                    cache_types={"k": "q8_0", "v": "q4_0"}, depths=[48, 16])
    assert records["decode"]["n_depth"] == 16 and sorted(records["depths"]) == [16, 48]
    assert records["depths"][48]["n_depth"] == 48 and records["depths"][48]["n_gen"] == 4
    for record in (records["prefill"], records["decode"], records["depths"][48]):
        assert (record["type_k"], record["type_v"], record["flash_attn"]) == ("q8_0", "q4_0", 1)


def test_measure_speed_reports_decode_at_each_depth(model_path):
    prompt = llama_cpp.tokenize(model_path, "The quick brown fox jumps over the lazy dog. " * 4)[:16]
    result = llama_cpp.measure_speed(model_path, prompt, SpeedParams(gen_tokens=4, repeats=1, warmup=0, depths=[64]),
                                     threads=2, cache_types={"k": "q8_0", "v": "q8_0"})
    (depth,) = result["decode_at_depth"]
    assert depth == "64" and result["decode_at_depth"][depth]["decode_tok_s"] > 0
    assert len(result["decode_at_depth"][depth]["samples"]) == 1
    assert "-ctk q8_0 -ctv q8_0" in result["timing_source"]


def test_a_quantized_kv_cache_moves_the_logits_and_q4_0_more_than_q8_0(model_path):
    """The cache types reach llama.cpp's context: K and V are stored quantized before attention
    reads them, so the logits move from f16's, and more for 4-bit than 8-bit blocks."""
    tokens = np.array(llama_cpp.tokenize(model_path, "def add(a, b):\n    return a + b\n" * 12)[:96])

    def logits(cache_type: str) -> np.ndarray:
        with llama_cpp.open_session(model_path, threads=2, cache_types={"k": cache_type, "v": cache_type}) as session:
            (window,) = [window.copy() for window in session.window_logits(tokens[None])]
            assert session.runtime.endswith("" if cache_type == "f16" else f"K {cache_type} V {cache_type}")
            return window

    f16 = logits("f16")
    q8_moved, q4_moved = (float(np.abs(logits(kind) - f16).mean()) for kind in ("q8_0", "q4_0"))
    assert 0 < q8_moved < q4_moved


def test_a_failing_llama_bench_is_a_tool_failure_naming_the_command(tmp_path):
    from pipeline.errors import ToolFailed

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ToolFailed) as info:
        llama_cpp.llama_bench(broken, prompt_tokens=8, gen_tokens=2, repeats=1, threads=1)
    assert "llama-bench exited" in info.value.what and str(broken) in info.value.where


def test_unavailable_reason_is_none_here():
    assert llama_cpp.unavailable_reason() is None


def test_windows_of_different_lengths_are_each_scored_whole(model_path):
    tokens = llama_cpp.tokenize(model_path, "def add(a, b):\n    return a + b\n" * 2)
    short, long = tokens[:7], tokens[:19]
    logits = scored(model_path, [long, short])
    assert [s.shape[0] for s in logits] == [19, 7]
    np.testing.assert_allclose(logits[1], logits[0][:7], rtol=1e-3, atol=1e-3)  # causal: a prefix scores alike


def test_greedy_generation_follows_the_argmax_of_its_own_logits(model_path):
    prompt = llama_cpp.tokenize(model_path, "def add(a, b):\n    return")
    (produced,) = generated(model_path, [prompt], 6, [])
    assert len(produced) == 6
    sequence = list(prompt)
    for token in produced:
        (logits,) = scored(model_path, [sequence])
        assert token == int(logits[-1].argmax())
        sequence.append(token)
    first = produced[0]
    assert generated(model_path, [prompt], 6, [first]) == [[first]]


def test_one_session_loads_the_model_once_for_windows_and_generation_and_again_only_for_a_longer_request(
        model_path, monkeypatch):
    loads = []
    real_open = llama_cpp.open_model
    monkeypatch.setattr(llama_cpp, "open_model", lambda path, **kwargs: loads.append(kwargs["n_ctx"]) or
                        real_open(path, **kwargs))
    tokens = llama_cpp.tokenize(model_path, "def add(a, b):\n    return a + b\n" * 4)
    with llama_cpp.open_session(model_path, threads=2) as session:
        assert loads == []  # opened on the first request
        whole = [logits.copy() for logits in session.window_logits([tokens[:32], tokens[:16]])]
        (produced,) = session.generate([tokens[:8]], max_tokens=4, stop_ids=[])
        assert loads == [32]  # 8 + 4 tokens fit the context the windows opened
        (again,) = session.window_logits([tokens[:32]])
        np.testing.assert_array_equal(again, whole[0])
        session.generate([tokens[:40]], max_tokens=4, stop_ids=[]).__next__()
        assert loads == [32, 44]  # a longer request reopens it once, with room for it
    assert session._model is None
    assert produced == generated(model_path, [tokens[:8]], 4, [])[0]


def test_header_reader_agrees_with_gguf_reader(model_path):
    from gguf import GGUFReader

    header = llama_cpp.read_header(model_path)
    reference = GGUFReader(model_path)
    assert [(t.name, t.type, t.n_elements, t.n_bytes) for t in header.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reference.tensors]
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.block_count"] == 30
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped


def test_header_reader_refuses_a_non_gguf_file(tmp_path):
    from pipeline.errors import QpipeError

    (tmp_path / "x.gguf").write_bytes(b"NOTGGUF" + b"\x00" * 40)
    with pytest.raises(QpipeError, match="not a GGUF"):
        llama_cpp.read_header(tmp_path / "x.gguf")


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_0"])
def test_round_trip_quantizes_as_ggmls_reference_rows_do(type_name):
    """ggml_quantize_chunk without an importance matrix is ggml's reference quantizer, which
    gguf-py re-implements in numpy for these types: the same values, bit for bit, over threads."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weight = np.random.default_rng(0).standard_normal((37, 576)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    expected = dequantize(quantize(weight, qtype), qtype)
    np.testing.assert_array_equal(llama_cpp.round_trip(weight, type_name, threads=3), expected)
    assert llama_cpp.row_bytes(type_name, 576) == quantize(weight, qtype).shape[1]


def test_round_trip_of_types_gguf_py_cannot_quantize_loses_as_their_bits_say():
    weight = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    errors = {t: float(np.abs(llama_cpp.round_trip(weight, t) - weight).mean()) for t in ("IQ4_NL", "Q4_K", "Q6_K")}
    assert errors["Q6_K"] < errors["Q4_K"] and 0 < errors["IQ4_NL"] < 0.1
