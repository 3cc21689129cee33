"""transformers as a runtime: scores a checkpoint directory as written, for accuracy only.

Used where a format's native runtime is absent but transformers reads the format itself:
a compressed-tensors directory is decompressed on load (packed int4 -> dense weights in the
checkpoint's dtype) and run by PyTorch. Its gate sections name this runtime, so nobody takes
the figures for vLLM's. It has no speed gate: transformers is not what anyone serves with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np


def name() -> str:
    from pipeline.host import package_version

    return (f"transformers {package_version('transformers')} (compressed-tensors "
            f"{package_version('compressed-tensors') or 'not installed'}, decompressed to dense; "
            f"torch {package_version('torch')})")


def unavailable_reason() -> str | None:
    return None  # transformers is a core dependency


def load(model_dir: Path, threads: int):
    """The model in the dtype its config.json names, on a CUDA GPU if there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()


def window_logits(model_dir: Path, windows: np.ndarray, *, threads: int) -> Iterator[np.ndarray]:
    import torch

    model = load(model_dir, threads)
    with torch.inference_mode():
        for window in windows:
            ids = torch.as_tensor(window, dtype=torch.long, device=model.device)[None]
            yield model(ids).logits[0].float().cpu().numpy()


def tokenize(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
