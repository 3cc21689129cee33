"""Peak memory of a heavy stage, estimated from the checkpoint's config before anything loads.

Every heavy stage (reference, each build, each gate) calls ``ensure_fits`` first: a stage that
cannot fit refuses with exit 3, its estimate, what the host has and the fix, instead of being
killed by the kernel halfway (an 8B reference in fp32 needs about 34 GB).

An estimate on the CPU is a fixed process overhead (Python, torch, transformers and the tool)
plus bytes per model parameter plus bytes per logit of one window (window_tokens x vocabulary),
with ``Factors`` per stage: ``REFERENCE`` here, each format's build and gate factors in its
``INFO``, plus what a stage holds whole besides (the artifact a gate maps, a window of the
reference's log-probs). The factors are fitted to peaks measured at four shapes, 135M parameters to Llama-3.1-8B at full depth
(``benchmarks/memory_estimate.py`` and ``benchmarks/scale.py``, docs/methodology.md "Memory"),
so that every estimate sits above every measured peak. On a GPU only a floor is checked (the
weights and one window's logits), until GPU peaks are measured.

What the host has is MemAvailable, capped by the cgroup's memory.max where a container sets
one (CI runners), or the free memory of GPU 0 for a stage that runs there. The check can be
skipped with QPIPE_SKIP_MEMORY_CHECK=1 for a host where the estimate is known to be wrong.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from pipeline.errors import HostLacks

GIB = 2**30
SKIP_ENV = "QPIPE_SKIP_MEMORY_CHECK"

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

class Factors(NamedTuple):
    """How a stage's peak memory on the CPU grows: a fixed overhead, bytes per model parameter
    per byte of the stage's dtype, bytes per logit of one window (window_tokens x vocabulary),
    and bytes per element of the model's largest weight (a tool that converts one tensor at a
    time peaks with the largest: the embedding, 525M elements in Llama-3.1-8B).

    Fitted to the peaks measured on SmolLM2-135M, and on synthetic checkpoints of Llama-3.2-1B's
    shape and Llama-3.1-8B's at 2 and all 32 layers (docs/methodology.md, "Memory"): the least
    overhead and slope that keep every estimate above every measured peak. Each format's build
    and gate factors are in its ``INFO``."""

    overhead: float
    per_parameter: float
    per_logit: float
    per_largest_tensor: float = 0.0


# the unquantized model in reference.dtype; logits, their fp32 copy, a chunk's log-softmax
REFERENCE = Factors(0.85 * GIB, 1.0, 14.0)
# the sensitivity stage: the unquantized model in sensitivity.dtype; the logits of all its windows
# at once (window_tokens counts them all): the base logits and probabilities in fp32, a pass's
# logits and their fp32 copy (the KL terms are worked a few positions at a time); one group's weights kept aside plus the fp32 round trip's copies,
# at most the largest tensor (the embedding) in fp32 three times; every decoder layer's output,
# held besides (``sensitivity.memory_need``). Derived from REFERENCE's
# terms, not fitted like the others: benchmarks/memory_estimate.py does not run this stage yet.
SENSITIVITY = Factors(0.85 * GIB, 1.0, 16.0, 12.0)


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    vocabulary: int
    largest_tensor: int = 0  # elements of the largest weight

    @classmethod
    def of(cls, checkpoint_dir: Path) -> "ModelSize":
        """The size of a checkpoint; the source stage's counts from source.json where it has them."""
        info = Path(checkpoint_dir) / "source.json"
        counted = json.loads(info.read_text()) if info.is_file() else {}
        if not (counted.get("parameters") and counted.get("largest_tensor")):
            counted["parameters"], counted["largest_tensor"] = meta_counts(checkpoint_dir)
        return cls(counted["parameters"], text_vocabulary(checkpoint_dir), counted["largest_tensor"])


@functools.lru_cache(maxsize=8)
def meta_counts(checkpoint_dir: Path) -> tuple[int, int]:
    """(parameters, elements of the largest weight) of the checkpoint's model, built from its
    config on the meta device (no weights are read; tied embeddings count once). Counted once
    per checkpoint and process: `qpipe doctor --checkpoint` sizes every stage of every recipe
    from it."""
    from pipeline.runtimes.transformers import meta_model

    sizes = [p.numel() for p in meta_model(checkpoint_dir).parameters()]
    return sum(sizes), max(sizes)


def text_vocabulary(checkpoint_dir: Path) -> int:
    """The vocabulary from config.json, or its text_config (multimodal checkpoints)."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    return int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)


class Need(NamedTuple):
    """What one stage's estimate is made of. A stage records it beside the estimate, so that a
    peak measured once can be set against the estimate of any later factors
    (benchmarks/memory_table.py renders docs/methodology.md's table from such records).
    `factors` may be several: a stage that runs tools one after another (a GGUF build's
    converter, then llama-imatrix) needs the most that one of them needs."""

    factors: Factors | tuple[Factors, ...]
    size: ModelSize
    window_tokens: int
    dtype: str = "bfloat16"
    mapped_bytes: int = 0
    device: str = "cpu"

    @property
    def bytes(self) -> int:
        phases = (self.factors,) if isinstance(self.factors, Factors) else self.factors
        return max(estimate(factors, self.size, window_tokens=self.window_tokens, dtype=self.dtype,
                            mapped_bytes=self.mapped_bytes, device=self.device) for factors in phases)

    def inputs(self) -> dict[str, int | str]:
        """The estimate's inputs besides its factors (which the stage's kind, format and recipe name)."""
        return {"parameters": self.size.parameters, "vocabulary": self.size.vocabulary,
                "largest_tensor": self.size.largest_tensor, "window_tokens": self.window_tokens,
                "dtype": self.dtype, "mapped_bytes": self.mapped_bytes, "device": self.device}


def estimate(factors: Factors, size: ModelSize, *, window_tokens: int, dtype: str = "bfloat16",
             mapped_bytes: int = 0, device: str = "cpu") -> int:
    """Peak bytes of a stage growing by `factors` on a model of `size`; `mapped_bytes`
    is what the stage holds whole besides (a GGUF artifact it maps, a window of the
    reference's log-probs). On CUDA it is the least the stage needs
    on the GPU, the weights in `dtype` and one window's logits twice: GPU peaks have not been
    measured, and the CPU factors count host copies that never reach the GPU."""
    if device == "cuda":
        return int(DTYPE_BYTES[dtype] * size.parameters + 8 * window_tokens * size.vocabulary)
    return int(factors.overhead + factors.per_parameter * DTYPE_BYTES[dtype] * size.parameters
               + factors.per_logit * window_tokens * size.vocabulary
               + factors.per_largest_tensor * size.largest_tensor + mapped_bytes)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a stage may use now: free GPU memory on CUDA; else MemAvailable, capped by a
    cgroup limit. None where the host does not say."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    found += _cgroup_headroom()
    return min(found) if found else None


def _cgroup_headroom() -> list[int]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return [max(int(limit) - usage, 0)]
    return []


def ensure_fits(need: Need, *, stage: str, fix: str) -> dict:
    """Refuse (exit 3) before loading when `need` exceeds what the host has; return the
    estimate, its inputs and the available memory in GB, for the stage's record."""
    need_bytes, device = need.bytes, need.device
    have = available_bytes(device)
    record = {"estimate_gb": round(need_bytes / 1e9, 2), "available_gb": None if have is None else round(have / 1e9, 2),
              "device": device, "inputs": need.inputs()}
    if have is not None and need_bytes > have and os.environ.get(SKIP_ENV) != "1":
        where = "GPU 0" if device == "cuda" else "this host's memory"
        raise HostLacks(f"{stage} needs about {need_bytes / 1e9:.1f} GB and {where} has {have / 1e9:.1f} GB free",
                        where=where, fix=f"{fix}; or set {SKIP_ENV}=1 if the estimate is wrong for this host")
    return record
