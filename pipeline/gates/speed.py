"""Speed gate: batch-1 prefill / decode / TTFT / ITL on the native runtime, and the roofline.

Each runtime says how it timed (``timing_source``) and how much its repeats spread
(``spread``): llama.cpp's prefill and decode are llama-bench's own (``runtimes.llama_cpp``).

Decode at batch 1 is memory-bound: each token reads every weight once (plus the KV cache),
so the fastest possible decode rate on a host is

    roofline_tok_s = bandwidth (bytes/s) / bytes read per decoded token,

and roofline_fraction = measured decode_tok_s / roofline_tok_s says how much of the host's
measured memory bandwidth the runtime turns into tokens. The bandwidth comes from host.json,
bytes read plus bytes written: the CPU's multi-threaded array copy for a runtime that ran on
the CPU, the GPU's device-to-device copy for one that ran on the GPU (the runtime's measured
``device``). A llama.cpp run with only some layers offloaded reads from both memories, so it
gets no roofline, and says why. Speed is never emulated: without the native runtime the
section is `not_run`.

decode_speedup (and prefill_speedup) = the artifact's rate / the unquantized model's rate in
the same format, runtime, prompt and settings, measured once per host by the baseline stage.
Both are measured, so both carry this host's run-to-run noise.
"""

from __future__ import annotations


def roofline_tok_s(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    if bandwidth_gb_s <= 0 or bytes_per_token <= 0:
        raise ValueError("bandwidth and bytes per token must be positive")
    return bandwidth_gb_s * 1e9 / bytes_per_token


def roofline_bandwidth(host_info: dict, device: str) -> dict:
    """The bandwidth the roofline of a run on `device` ("cpu", "gpu", "gpu+cpu") divides by:
    {"gb_s": figure or None, "source": what it is, or why there is none}."""
    bandwidth = host_info["bandwidth"]
    if device == "cpu":
        return {"gb_s": bandwidth["gb_s"], "source": f"CPU: {bandwidth['method']}"}
    if device == "gpu" and bandwidth.get("gpu_gb_s"):
        return {"gb_s": bandwidth["gpu_gb_s"], "source": f"GPU: {bandwidth['gpu_method']}"}
    if device == "gpu":
        return {"gb_s": None, "source": "no GPU bandwidth in host.json (run `qpipe host --remeasure` on this GPU host)"}
    return {"gb_s": None, "source": "a partial offload reads weights from both CPU and GPU memory: no one bandwidth"}


def host_and_threads(speed_params) -> tuple[dict, int]:
    """host.json (written by the host stage) and the thread count gates and baselines run with."""
    from pipeline import host, layout
    from pipeline.errors import BadInput
    from pipeline.files import read_json

    if not layout.HOST_FILE.is_file():
        raise BadInput("no host description", where=str(layout.HOST_FILE), fix="run `qpipe host` first")
    host_info = read_json(layout.HOST_FILE)
    return host_info, host.worker_threads(speed_params.threads, host_info["cpu"])


def speed_prompt(ref, speed_params) -> list[int]:
    """The first `speed.prompt_tokens` ids of the evaluation text: the same prompt everywhere."""
    prompt = ref.text_tokens[: speed_params.prompt_tokens].tolist()
    if len(prompt) < speed_params.prompt_tokens:
        from pipeline.errors import BadInput

        raise BadInput(f"the evaluation text has only {len(prompt)} tokens for a "
                       f"{speed_params.prompt_tokens}-token speed prompt",
                       where="params.yaml: speed.prompt_tokens", fix="lower it or use a longer text")
    return prompt


def mean_decode_context(prompt_tokens: int, gen_tokens: int) -> float:
    """Average context length over the decode steps (the KV cache read grows each step)."""
    return prompt_tokens + gen_tokens / 2


def section(measured: dict, *, runtime: str, prompt_tokens: int, gen_tokens: int, threads: int,
            bandwidth: dict, bytes_per_token: dict[str, float]) -> dict:
    result = {
        "status": "ok",
        "runtime": runtime,
        "device": measured.get("device", "cpu"),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": measured["prefill_tok_s"],
        "decode_tok_s": measured["decode_tok_s"],
        "ttft_ms": measured["ttft_ms"],
        "itl_ms": measured["itl_ms"],
        "bytes_per_token": bytes_per_token["total"],
        "roofline_tok_s": None,
        "roofline_fraction": None,
        "repeats": len(measured.get("runs", [])),
    }
    # what the runtime measured besides: its timing source, the spread of its repeats and, for
    # llama.cpp, the Python API's own decode rate
    for key in ("timing_source", "spread", "api_decode_tok_s", "n_gpu_layers", "offloaded_layers", "layers",
                "backends", "gpu_info"):
        if key in measured:
            result[key] = measured[key]
    if "output_tok_s" in measured:  # runtimes that batch: throughput at params speed.concurrency
        result["concurrency"] = measured["concurrency"]
        result["output_tok_s"] = measured["output_tok_s"]
    result["bandwidth_gb_s"], result["bandwidth_source"] = bandwidth["gb_s"], bandwidth["source"]
    if bandwidth["gb_s"]:
        roof = roofline_tok_s(bandwidth["gb_s"], bytes_per_token["total"])
        result["roofline_tok_s"] = roof
        result["roofline_fraction"] = measured["decode_tok_s"] / roof
    return result


def by_depth(measured: dict, *, depths: list[int], gen_tokens: int, bandwidth_gb_s: float | None,
             bytes_at, baseline: dict | None) -> dict:
    """Decode at each of params speed.depths, as the runtime measured it, with its roofline:
    the weights plus the KV cache read at that depth (over the decode steps, in the cache's own
    dtype: `bytes_at(context_tokens)`, the format's decode_bytes_per_token), and its speedup
    against the unquantized model's decode at the same depth."""
    if "decode_at_depth" not in measured:
        return {"status": "not_run", "reason": "this runtime measures decode at depth prompt_tokens only"}
    baseline_rates = (baseline or {}).get("decode_at_depth") or {}
    figures = {}
    for depth in depths:
        rate = measured["decode_at_depth"][str(depth)]
        read = bytes_at(mean_decode_context(depth, gen_tokens))
        roof = roofline_tok_s(bandwidth_gb_s, read["total"]) if bandwidth_gb_s else None
        base = baseline_rates.get(str(depth), {}).get("decode_tok_s")
        figures[str(depth)] = {
            "decode_tok_s": rate["decode_tok_s"], "stdev": rate["stdev"], "samples": rate["samples"],
            "kv_cache_bytes": read["kv_cache"], "bytes_per_token": read["total"], "roofline_tok_s": roof,
            "roofline_fraction": rate["decode_tok_s"] / roof if roof else None,
            "baseline_decode_tok_s": base, "decode_speedup": rate["decode_tok_s"] / base if base else None}
    return {"status": "ok", "depths": figures}


def with_speedup(section: dict, baseline: dict | None) -> dict:
    if not baseline or baseline.get("status") != "ok":
        section["decode_speedup"] = section["prefill_speedup"] = None
        section["decode_speedup_reason"] = (baseline or {}).get("reason", "no baseline measured (run the baseline stage)")
        return section
    section["baseline_decode_tok_s"] = baseline["decode_tok_s"]
    section["decode_speedup"] = section["decode_tok_s"] / baseline["decode_tok_s"]
    section["prefill_speedup"] = section["prefill_tok_s"] / baseline["prefill_tok_s"]
    return section


# ---------------------------------------------------------------- one measurement per host at a time

# others' CPU use, in cores averaged over the measurement, above which a CPU speed figure is not trusted
MAX_OTHER_CORES = 0.5


def lock_path():
    """The host-wide lock: one per user, in the user's cache directory. Speed measurements hold
    it exclusively, CPU-heavy work (reference, builds, accuracy scoring) shares it, so queued DVC
    experiments, two `dvc repro` runs and a CI runner's parallel jobs never measure speed while
    another qpipe process computes, nor two speeds at once."""
    from pipeline.host import user_cache_dir

    return user_cache_dir() / "speed.lock"


class HostLock:
    """``with HostLock(exclusive=True) as held:`` waits for the host-wide lock and, while it is
    held, measures what other processes do with the CPUs; ``held.record()`` after the block gives
    the seconds waited, the cores others kept busy and when it was held. ``exclusive=False`` is
    the shared hold of heavy work, which waits only while a speed measurement runs."""

    def __init__(self, exclusive: bool = True):
        self.exclusive = exclusive

    def __enter__(self) -> "HostLock":
        import fcntl
        import time

        path = lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a")
        started = time.perf_counter()
        fcntl.flock(self._handle, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        self.waited_s = time.perf_counter() - started
        self.held_from = time.time()
        self._start = (time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        import fcntl
        import time

        end = (time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds())
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        self.other_cores = max(others, 0.0) / wall if wall > 0 else 0.0
        self.held_until = time.time()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()

    def record(self) -> dict:
        return {"lock_wait_s": round(self.waited_s, 2), "other_cpu_cores": round(self.other_cores, 2),
                "held_from": round(self.held_from, 3), "held_until": round(self.held_until, 3)}


def heavy_work() -> HostLock:
    """The shared hold for CPU-heavy work."""
    return HostLock(exclusive=False)


def cpu_busy_seconds() -> float:
    """CPU seconds all processes spent busy so far, summed over cores (/proc/stat)."""
    import os

    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (its threads: llama.cpp runs in it) and its waited children."""
    import os

    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# a contended CPU measurement is taken again, after a pause, up to this many tries in all: what
# contends is mostly DVC's hashing and interpreter start-up of a queued experiment, which pass
MEASUREMENT_TRIES = 3
CONTENDED_PAUSE_S = 10.0


def measure_uncontended(measure, *, cpu_runtime: bool, log) -> tuple:
    """``measure()`` under the exclusive host lock; on a CPU runtime, again while others kept
    more than MAX_OTHER_CORES busy, up to MEASUREMENT_TRIES tries. The lock is let go during the
    pause so that a waiting qpipe process can finish its heavy step. Returns the last figures and
    the lock's record with ``tries``."""
    import time

    for attempt in range(1, MEASUREMENT_TRIES + 1):
        with HostLock() as held:
            measured = measure()
        record = {**held.record(), "tries": attempt}
        if not cpu_runtime or record["other_cpu_cores"] <= MAX_OTHER_CORES or attempt == MEASUREMENT_TRIES:
            return measured, record
        log(f"speed: other processes kept {record['other_cpu_cores']:.2f} cores busy; measuring again in "
            f"{CONTENDED_PAUSE_S:.0f} s (try {attempt + 1} of {MEASUREMENT_TRIES})")
        time.sleep(CONTENDED_PAUSE_S)


def contended(section: dict, record: dict, *, cpu_runtime: bool) -> dict:
    """Mark a CPU speed section measured while others kept more than MAX_OTHER_CORES busy: its
    figures stay in the record, and the checks treat them as not measured."""
    section["measurement"] = record
    if cpu_runtime and record["other_cpu_cores"] > MAX_OTHER_CORES:
        section["status"] = "contended"
        section["reason"] = (f"other processes kept {record['other_cpu_cores']:.2f} cores busy during the "
                             f"measurement (limit {MAX_OTHER_CORES}, {record.get('tries', 1)} tries): the "
                             f"figures are recorded but not judged")
    return section
