import os

import pytest

from pipeline import host


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Probes here keep their bandwidth in a cache of their own, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_probe_describes_the_host():
    info = host.probe()
    assert info["cpu"]["physical_cores"] >= 1
    assert info["bandwidth"]["gb_s"] > 0.1
    assert info["runtimes"]["llama_cpp"]  # a core dependency
    assert set(host.RUNTIMES) == set(info["runtimes"])
    assert len(info["fingerprint"]) == 16


def test_unchanged_host_reuses_its_bandwidth_so_host_json_is_stable():
    first = host.probe()
    second = host.probe(previous=first)
    assert second == first


def test_changed_fingerprint_or_remeasure_measures_again():
    first = host.probe()
    stale = {**first, "fingerprint": "0" * 16, "bandwidth": {"gb_s": -1}}
    assert host.probe(previous=stale)["bandwidth"]["gb_s"] > 0
    assert host.probe(previous=first, remeasure=True)["bandwidth"]["measured_at"]


def test_summary_for_gate_results():
    summary = host.summary(host.probe())
    assert set(summary) == {"cpu", "cores", "gpu", "bandwidth_gb_s", "gpu_bandwidth_gb_s", "fingerprint"}


def test_gpu_bandwidth_is_none_without_cuda_and_positive_with_it():
    import torch

    value = host.measure_gpu_bandwidth_gb_s(total_mib=64, repeats=2)
    if torch.cuda.is_available():
        assert value > 1
    else:
        assert value is None


def test_a_fresh_clone_on_the_same_machine_reuses_the_machines_bandwidth(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(host, "measure_bandwidth_gb_s", lambda **_: measured.append(1) or 42.0)
    first = host.probe()                     # no host.json yet: measures, and keeps it per fingerprint
    assert host.probe() == first             # another clone, no host.json either: the same file
    assert measured == [1]
    assert (tmp_path / "cache" / "qpipe" / f"bandwidth-{first['fingerprint']}.json").is_file()
    host.probe(remeasure=True)
    assert measured == [1, 1]


def test_gpus_come_from_nvidia_smi_with_the_drivers_cuda_version(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\nif [ -n "$1" ]; then echo "NVIDIA H200, 143771, 570.124.06, 9.0"; else\n'
                   'echo "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8     |"; fi\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert host.gpus() == [{"name": "NVIDIA H200", "memory_gb": 140.4, "driver": "570.124.06",
                            "compute_capability": "9.0", "cuda": "12.8"}]


def test_a_usable_gpu_is_one_nvidia_smi_reports_and_this_torch_can_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no artifacts/host.json
    h200 = [{"name": "NVIDIA H200"}]
    monkeypatch.setattr(host, "measure_bandwidth_gb_s", lambda **_: 42.0)
    monkeypatch.setattr(host, "measure_gpu_bandwidth_gb_s", lambda: 4000.0)
    monkeypatch.setattr(host, "gpus", lambda: h200)
    monkeypatch.setattr(host, "torch_sees_cuda", lambda: False)  # a CPU build of torch on a GPU host
    cpu_torch = host.probe()
    assert cpu_torch["torch_cuda"] is False and not host.has_usable_gpu(cpu_torch)
    assert "gpu_gb_s" not in cpu_torch["bandwidth"]
    assert not host.has_usable_gpu()  # no host.json: probed now, the same answer
    monkeypatch.setattr(host, "torch_sees_cuda", lambda: True)
    assert host.has_usable_gpu(host.probe()) and host.has_usable_gpu()
    monkeypatch.setattr(host, "gpus", list)
    monkeypatch.setattr(host, "torch_sees_cuda", lambda: pytest.fail("torch is imported only where a GPU is"))
    assert "torch_cuda" not in host.probe() and not host.has_usable_gpu()
