"""Probe the machine: CPU, memory, measured memory bandwidth, GPU, runtimes.

The host stage runs on every `dvc repro` (always_changed) but rewrites host.json with the
same bytes while the machine is the same: the bandwidth is measured once per hardware and
runtime fingerprint and reused after that (`qpipe host --remeasure` forces a new
measurement). Gate stages depend on host.json, so they re-run exactly when the host changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# import name -> distribution name
RUNTIMES = {
    "llama_cpp": "llama-cpp-python",
    "vllm": "vllm",
    "tensorrt_llm": "tensorrt-llm",
    "modelopt": "nvidia-modelopt",
    "llmcompressor": "llmcompressor",
    "transformers": "transformers",
    "torch": "torch",
}


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    physical: set[tuple[str, str]] = set()
    flags: set[str] = set()
    try:
        current_physical = "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "physical id":
                current_physical = value
            elif key == "core id":
                physical.add((current_physical, value))
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    logical = os.cpu_count() or 1
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            if f in flags]
    return {
        "model": model,
        "logical_cores": logical,
        "physical_cores": len(physical) or logical,
        "simd": simd,
    }


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, Any]]:
    """GPUs as nvidia-smi reports them (no torch import, so `doctor` stays fast)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    query = "name,memory.total,driver_version,compute_cap"
    try:
        result = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in result.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            found.append({"name": parts[0], "memory_gb": round(float(parts[1]) / 1024, 1),
                          "driver": parts[2], "compute_capability": parts[3]})
    cuda = driver_cuda_version(smi) if found else None
    return [{**gpu, "cuda": cuda} for gpu in found]


def driver_cuda_version(smi: str) -> str | None:
    """The CUDA version the driver supports, from nvidia-smi's header ("CUDA Version: 12.8"):
    its --query-gpu fields do not include it."""
    import re

    try:
        header = subprocess.run([smi], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    return found.group(1) if found else None


def torch_sees_cuda() -> bool:
    """Whether this environment's torch can run on a CUDA GPU (a CPU build of torch cannot)."""
    import torch

    return torch.cuda.is_available()


def has_usable_gpu(host_info: dict[str, Any] | None = None) -> bool:
    """The one answer to "is there a usable GPU here": a CUDA GPU that nvidia-smi reports and that
    this environment's torch can use. A CPU build of torch on a GPU host has none, so calibration,
    its recipe knob and the memory checks all say CPU. As host.json (the host stage's probe, or
    `host_info` given) records it, else probed now; torch is imported only where nvidia-smi
    found a GPU."""
    from pipeline import layout

    if host_info is None and layout.HOST_FILE.is_file():
        host_info = json.loads(layout.HOST_FILE.read_text())
    if host_info is not None:
        return bool(host_info.get("gpus")) and bool(host_info.get("torch_cuda"))
    return bool(gpus()) and torch_sees_cuda()


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution (by package metadata, without importing it), or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def runtimes() -> dict[str, str | None]:
    """Installed version of each runtime package, or None. Found by package metadata, not
    imported (importing vllm or tensorrt_llm takes many seconds)."""
    found = {}
    for module, distribution in RUNTIMES.items():
        if importlib.util.find_spec(module) is None:
            found[module] = None
        else:
            found[module] = package_version(distribution) or "unknown"
    return found


def measure_bandwidth_gb_s(total_mib: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Copy bandwidth: each thread copies its own slice of a large array; bytes read plus
    bytes written, per second, best of `repeats` (so one cold pass does not count)."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    per_thread = total_mib * 2**20 // threads // 8
    sources = [np.ones(per_thread) for _ in range(threads)]
    targets = [np.empty(per_thread) for _ in range(threads)]

    def copy(index: int) -> None:
        np.copyto(targets[index], sources[index])

    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=copy, args=(i,)) for i in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        best = max(best, 2 * per_thread * 8 * threads / elapsed / 1e9)
    return round(best, 1)


def measure_gpu_bandwidth_gb_s(total_mib: int = 1024, repeats: int = 10) -> float | None:
    """Device-to-device copy bandwidth of GPU 0 (bytes read + written), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    source = torch.empty(total_mib * 2**20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = max(best, 2 * source.numel() / (time.perf_counter() - started) / 1e9)
    return round(best, 1)


def probe(previous: dict[str, Any] | None = None, remeasure: bool = False) -> dict[str, Any]:
    identity = {
        "cpu": cpu_info(),
        "memory_gb": memory_gb(),
        "gpus": gpus(),
        "runtimes": runtimes(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "python": platform.python_version(),
    }
    if identity["gpus"]:  # import torch only where nvidia-smi found a device (has_usable_gpu)
        identity["torch_cuda"] = torch_sees_cuda()
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    # one measurement per machine and fingerprint, so that every clone on it writes the same
    # host.json and DVC's run-cache serves one clone's stages to another
    stored = user_cache_dir() / f"bandwidth-{fingerprint}.json"
    if not remeasure and previous and previous.get("fingerprint") == fingerprint:
        bandwidth = previous["bandwidth"]
    elif not remeasure and stored.is_file():
        bandwidth = json.loads(stored.read_text())
    else:
        bandwidth = {
            "gb_s": measure_bandwidth_gb_s(threads=identity["cpu"]["logical_cores"]),
            "method": "numpy copy of 1 GiB split over all logical cores; bytes read + written; best of 5",
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if identity.get("torch_cuda"):
            bandwidth["gpu_gb_s"] = measure_gpu_bandwidth_gb_s()
            bandwidth["gpu_method"] = "torch device-to-device copy of 1 GiB; bytes read + written; best of 10"
    if remeasure or not stored.is_file():
        from pipeline.files import write_json

        write_json(stored, bandwidth)
    return {"fingerprint": fingerprint, **identity, "bandwidth": bandwidth}


def user_cache_dir() -> Path:
    """qpipe's per-user cache ($XDG_CACHE_HOME/qpipe, else ~/.cache/qpipe): each fingerprint's
    measured bandwidth and the host-wide speed lock (gates.speed.lock_path)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qpipe"


def worker_threads(requested: int, cpu: dict[str, Any] | None = None) -> int:
    """Threads for builds and gates: what params ask for, else one per physical core."""
    return requested or (cpu or cpu_info())["physical_cores"]


def summary(host: dict[str, Any]) -> dict[str, Any]:
    """The `host` block of a gate result."""
    gpu = host["gpus"][0]["name"] if host.get("gpus") else None
    return {"cpu": host["cpu"]["model"], "cores": host["cpu"]["physical_cores"], "gpu": gpu,
            "bandwidth_gb_s": host["bandwidth"]["gb_s"], "gpu_bandwidth_gb_s": host["bandwidth"].get("gpu_gb_s"),
            "fingerprint": host["fingerprint"]}
