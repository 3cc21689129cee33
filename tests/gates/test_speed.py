import pytest

from pipeline import measure
from pipeline.gates import speed


def test_roofline_arithmetic():
    # 100 GB/s over 50 MB per token = 2000 tok/s
    assert speed.roofline_tok_s(100, 50e6) == pytest.approx(2000)


def test_roofline_rejects_non_positive_inputs():
    with pytest.raises(ValueError):
        speed.roofline_tok_s(0, 1)
    with pytest.raises(ValueError):
        speed.roofline_tok_s(10, 0)


def test_mean_decode_context():
    assert speed.mean_decode_context(512, 128) == 576


NO_BANDWIDTH = {"gb_s": None, "source": "none here"}


def test_section_fraction_and_missing_bandwidth():
    measured = {"prefill_tok_s": 400.0, "decode_tok_s": 100.0, "ttft_ms": 1300.0, "itl_ms": 10.0, "runs": [{}, {}]}
    section = speed.section(measured, runtime="x", prompt_tokens=512, gen_tokens=128, threads=2,
                            bandwidth={"gb_s": 40.0, "source": "CPU"}, bytes_per_token={"total": 100e6})
    assert section["roofline_tok_s"] == pytest.approx(400)
    assert section["roofline_fraction"] == pytest.approx(0.25)
    assert section["repeats"] == 2 and section["device"] == "cpu" and section["bandwidth_gb_s"] == 40.0
    unmeasured = speed.section(measured, runtime="x", prompt_tokens=512, gen_tokens=128, threads=2,
                               bandwidth=NO_BANDWIDTH, bytes_per_token={"total": 100e6})
    assert unmeasured["roofline_fraction"] is None and unmeasured["bandwidth_source"] == "none here"


def test_the_roofline_takes_the_bandwidth_of_the_memory_the_run_read():
    host = {"bandwidth": {"gb_s": 50.0, "method": "numpy copy", "gpu_gb_s": 4000.0, "gpu_method": "torch copy"}}
    assert speed.roofline_bandwidth(host, "cpu") == {"gb_s": 50.0, "source": "CPU: numpy copy"}
    assert speed.roofline_bandwidth(host, "gpu") == {"gb_s": 4000.0, "source": "GPU: torch copy"}
    partial = speed.roofline_bandwidth(host, "gpu+cpu")
    assert partial["gb_s"] is None and "partial offload" in partial["source"]
    unmeasured = speed.roofline_bandwidth({"bandwidth": {"gb_s": 50.0, "method": "numpy copy"}}, "gpu")
    assert unmeasured["gb_s"] is None and "qpipe host --remeasure" in unmeasured["source"]
    measured = {"prefill_tok_s": 4e4, "decode_tok_s": 500.0, "ttft_ms": 1.0, "itl_ms": 2.0, "device": "gpu",
                "n_gpu_layers": 999, "offloaded_layers": 33, "layers": 33, "backends": "CUDA", "gpu_info": "NVIDIA H200"}
    section = speed.section(measured, runtime="llama.cpp", prompt_tokens=8, gen_tokens=8, threads=1,
                            bandwidth=speed.roofline_bandwidth(host, "gpu"), bytes_per_token={"total": 4e9})
    assert section["roofline_tok_s"] == pytest.approx(1000) and section["roofline_fraction"] == pytest.approx(0.5)
    assert (section["device"], section["offloaded_layers"], section["backends"]) == ("gpu", 33, "CUDA")


def section_for(decode=100.0, prefill=400.0):
    measured = {"prefill_tok_s": prefill, "decode_tok_s": decode, "ttft_ms": 1.0, "itl_ms": 1.0}
    return speed.section(measured, runtime="x", prompt_tokens=8, gen_tokens=8, threads=1,
                         bandwidth=NO_BANDWIDTH, bytes_per_token={"total": 1.0})


def test_speedup_against_the_unquantized_baseline():
    result = speed.with_speedup(section_for(150.0, 500.0), {"status": "ok", "decode_tok_s": 100.0, "prefill_tok_s": 400.0})
    assert result["decode_speedup"] == pytest.approx(1.5)
    assert result["prefill_speedup"] == pytest.approx(1.25)
    assert result["baseline_decode_tok_s"] == 100.0


def test_no_baseline_leaves_speedup_unmeasured_with_a_reason():
    result = speed.with_speedup(section_for(), None)
    assert result["decode_speedup"] is None and "baseline" in result["decode_speedup_reason"]
    absent = speed.with_speedup(section_for(), {"status": "not_run", "reason": "needs a CUDA GPU"})
    assert absent["decode_speedup_reason"] == "needs a CUDA GPU"


def test_decode_at_each_depth_gets_its_roofline_at_that_depths_kv_bytes_and_its_speedup():
    measured = {"decode_at_depth": {"4096": {"decode_tok_s": 50.0, "stdev": 1.0, "samples": [49.0, 51.0]}}}
    read_at = []

    def bytes_at(context):
        read_at.append(context)
        return {"kv_cache": 1e6, "total": 5e6}

    result = speed.by_depth(measured, depths=[4096], gen_tokens=128, bandwidth_gb_s=1.0, bytes_at=bytes_at,
                            baseline={"decode_at_depth": {"4096": {"decode_tok_s": 40.0}}})
    figures = result["depths"]["4096"]
    assert result["status"] == "ok" and read_at == [4096 + 64]  # the mean context over the 128 decode steps
    assert figures["roofline_tok_s"] == pytest.approx(200.0) and figures["roofline_fraction"] == pytest.approx(0.25)
    assert figures["decode_speedup"] == pytest.approx(1.25) and figures["kv_cache_bytes"] == 1e6
    unmeasured = speed.by_depth(measured, depths=[4096], gen_tokens=128, bandwidth_gb_s=None, bytes_at=bytes_at,
                                baseline=None)["depths"]["4096"]
    assert unmeasured["roofline_fraction"] is None and unmeasured["decode_speedup"] is None


def test_a_runtime_that_measures_no_depths_leaves_them_not_run():
    result = speed.by_depth({"decode_tok_s": 1.0}, depths=[4096], gen_tokens=8, bandwidth_gb_s=1.0,
                            bytes_at=lambda context: {}, baseline=None)
    assert result["status"] == "not_run" and "depth prompt_tokens only" in result["reason"]


def test_a_second_speed_measurement_waits_for_the_first(tmp_path, monkeypatch):
    import fcntl
    import subprocess
    import sys

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = speed.lock_path()
    assert path == tmp_path / "qpipe" / "speed.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; from pipeline.gates import speed; "
        "h = open(speed.lock_path().parent.mkdir(parents=True, exist_ok=True) or speed.lock_path(), 'a'); "
        "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(path, "a") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a speed measurement waits on
    finally:
        holder.communicate("release\n", timeout=30)
    with speed.HostLock() as held:
        pass
    assert set(held.record()) == {"lock_wait_s", "other_cpu_cores", "held_from", "held_until"}
    assert held.record()["other_cpu_cores"] >= 0 and held.record()["held_from"] <= held.record()["held_until"]


def test_a_contended_cpu_measurement_is_taken_again_until_quiet_or_out_of_tries(tmp_path, monkeypatch):
    import itertools

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(speed, "CONTENDED_PAUSE_S", 0.0)
    monkeypatch.setattr(speed, "own_cpu_seconds", lambda: 0.0)
    busy_tries = {1, 2}
    tries, clock = [], itertools.count(1)

    def measure():
        tries.append(len(tries) + 1)
        return {"decode_tok_s": float(len(tries))}

    def cpu_busy_seconds():  # others add 1000 CPU seconds during each busy try
        return 1000.0 * next(clock) if tries and tries[-1] in busy_tries else 0.0

    monkeypatch.setattr(speed, "cpu_busy_seconds", cpu_busy_seconds)
    said = []
    measured, record = speed.measure_uncontended(measure, cpu_runtime=True, log=said.append)
    assert measured == {"decode_tok_s": 3.0} and record["tries"] == 3 and record["other_cpu_cores"] == 0.0
    assert len(said) == 2 and "measuring again" in said[0] and "try 2 of 3" in said[0]

    busy_tries, tries[:] = {1, 2, 3, 4}, []
    measured, record = speed.measure_uncontended(measure, cpu_runtime=True, log=said.append)
    assert record["tries"] == speed.MEASUREMENT_TRIES and record["other_cpu_cores"] > speed.MAX_OTHER_CORES
    assert speed.contended({"status": "ok"}, record, cpu_runtime=True)["status"] == "contended"

    tries[:] = []  # a GPU runtime's figure does not depend on the CPUs: measured once
    measured, record = speed.measure_uncontended(measure, cpu_runtime=False, log=said.append)
    assert record["tries"] == 1 and tries == [1]


def test_a_cpu_figure_taken_while_others_kept_cores_busy_is_recorded_but_not_judged():
    from pipeline.config import GateLimits
    from pipeline.gates import verdict

    section = {"status": "ok", "decode_tok_s": 21.7, "roofline_fraction": 0.097}
    flagged = speed.contended(dict(section), {"lock_wait_s": 0.0, "other_cpu_cores": 1.6}, cpu_runtime=True)
    assert flagged["status"] == "contended" and flagged["decode_tok_s"] == 21.7
    assert "1.60 cores busy" in flagged["reason"]
    (check,) = verdict.evaluate(GateLimits(min_roofline_fraction=0.1), {"speed": flagged})
    assert check["verdict"] == "not_run" and "cores busy" in check["reason"]
    quiet = speed.contended(dict(section), {"lock_wait_s": 3.2, "other_cpu_cores": 0.1}, cpu_runtime=True)
    assert quiet["status"] == "ok" and quiet["measurement"]["lock_wait_s"] == 3.2
    on_gpu = speed.contended(dict(section), {"lock_wait_s": 0.0, "other_cpu_cores": 3.0}, cpu_runtime=False)
    assert on_gpu["status"] == "ok"


def test_heavy_work_shares_the_lock_and_keeps_speed_out(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probe = ("import fcntl, sys; from pipeline.gates import speed; h = open(speed.lock_path(), 'a')\n"
             "try:\n    fcntl.flock(h, getattr(fcntl, sys.argv[1]) | fcntl.LOCK_NB); print('got')\n"
             "except BlockingIOError:\n    print('blocked')")
    with speed.heavy_work():
        tried = {mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                                      env={**__import__("os").environ}).stdout.strip()
                 for mode in ("LOCK_SH", "LOCK_EX")}
    assert tried == {"LOCK_SH": "got", "LOCK_EX": "blocked"}


def test_batch1_runs_summarize_to_medians_with_their_spread():
    runs = [measure.batch1_run(100, ttft_s=t, decode_s=d, decoded=11, source="wall clock")
            for t, d in ((0.10, 0.50), (0.12, 0.40), (0.20, 0.45))]
    summary = measure.summarize_runs(runs, concurrency=4, generated=400, wall_s=2.0)
    assert summary["decode_tok_s"] == pytest.approx(10 / 0.45) and summary["ttft_ms"] == pytest.approx(120)
    assert summary["spread"]["decode_tok_s"]["samples"] == [r["decode_tok_s"] for r in runs]
    assert summary["spread"]["ttft_ms"]["stdev"] == pytest.approx(52.915, rel=1e-4)
    assert summary["output_tok_s"] == 200
    section = speed.section(summary, runtime="r", prompt_tokens=100, gen_tokens=11, threads=2, bandwidth=NO_BANDWIDTH,
                            bytes_per_token={"total": 1e6})
    assert section["spread"] == summary["spread"] and section["repeats"] == 3
