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

from pipeline.runtimes import Session


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("transformers")


def name() -> str:
    from pipeline.host import package_version

    return (f"transformers {package_version('transformers')} (compressed-tensors "
            f"{package_version('compressed-tensors') or 'not installed'}, decompressed to dense; "
            f"torch {package_version('torch')})")


def unavailable_reason() -> str | None:
    return None  # transformers is a core dependency


def attention_implementation(config) -> str | None:
    """The attention that computes the model as defined: "eager" where the config soft-caps
    attention logits (Gemma 2), because transformers 5.17 picks SDPA by default and its SDPA
    path ignores ``softcap``; else None (transformers' default)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def load_causal_lm(model_dir: Path, *, cast_kv: bool = False, **kwargs):
    """AutoModelForCausalLM.from_pretrained with the attention that computes the model as defined
    (with `cast_kv`, that attention behind ``kv_cast_attention``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = attention_implementation(AutoConfig.from_pretrained(model_dir))
    if cast_kv:
        attention = kv_cast_attention(attention or "sdpa")
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, **kwargs)


FP8_E4M3_MAX = 448.0
# the attribute of an attention module holding its KV cache's storage: a function of (keys, values)
# giving them back as the cache holds them
KV_CAST = "qpipe_kv_cast"


def fake_quantize_fp8(x, scale):
    """Quantize to e4m3 with a per-tensor dequantization scale and back (what an engine's fp8
    input or cache holds): x times the fp32 reciprocal of the scale, saturated at +-448, rounded
    to nearest even, as TensorRT-LLM's per-tensor quantize kernel computes it
    (cudaFp8Utils.cu, ``factor = 1.0f / s``); a true division rounds some ties the other way."""
    import torch

    scale = scale.float().reshape(())
    codes = (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.to(torch.float32) * scale


def fp8_kv_cast(k_scale, v_scale):
    """A KV_CAST: keys and values quantized to e4m3 with their per-tensor scales and back."""
    def cast(key, value):
        return fake_quantize_fp8(key, k_scale).to(key.dtype), fake_quantize_fp8(value, v_scale).to(value.dtype)

    return cast


def kv_cast_attention(base: str) -> str:
    """The name of an attention, registered with transformers, that is `base` (sdpa, or the model
    module's own eager one where soft-capping needs it) with a quantized KV cache's storage
    applied first: a module with KV_CAST gets its keys (after RoPE) and values through it, as a
    cache stores them before attention reads them. The base's mask is registered too: for a name
    it does not know, transformers builds no mask at all, which drops sliding windows (and, for
    eager attention, causality)."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        cast = getattr(module, KV_CAST, None)
        if cast is not None:
            key, value = cast(key, value)
        if base == "eager":
            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = AttentionInterface._global_mapping[base]
        return function(module, query, key, value, attention_mask, **kwargs)

    name = f"qpipe_quantized_kv_{base}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


def attention_modules(model) -> list:
    """The model's attention modules, first layer first."""
    return [module for name, module in model.named_modules() if name.endswith("self_attn")]


def meta_model(model_dir: Path):
    """The checkpoint's model built from its config on the meta device: every module and shape,
    no weights read and no memory taken."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_widths(model_dir: Path) -> dict[str, int]:
    """Input width of every nn.Linear of the checkpoint's model, from ``meta_model`` (no weights read)."""
    import torch

    return {name: module.in_features for name, module in meta_model(model_dir).named_modules()
            if isinstance(module, torch.nn.Linear)}


def torch_device() -> str:
    """Where torch runs a model here: a CUDA GPU if there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device() -> str:
    """Where the gates' transformers runs go here ("gpu" or "cpu", as gate results say it)."""
    return "gpu" if torch_device() == "cuda" else "cpu"


# KV caches the model can be scored with, as vLLM's kv_cache_dtype names them -> what the runtime name adds
KV_CACHE_DTYPES = {"auto": "", "fp8": "; fp8 e4m3 KV cache, scale 1.0, as vLLM stores it without calibrated scales"}


def load(model_dir: Path, threads: int, kv_cache_dtype: str = "auto"):
    """The model in the dtype its config.json names, on a CUDA GPU if there is one; with
    `kv_cache_dtype` fp8, keys and values cast to e4m3 with scale 1.0 before attention, which is
    what vLLM's fp8 cache stores for a checkpoint without KV scales (vLLM's k_scale = v_scale = 1.0)."""
    import torch

    torch.set_num_threads(threads)
    model = load_causal_lm(model_dir, cast_kv=kv_cache_dtype == "fp8", dtype="auto")
    if kv_cache_dtype == "fp8":
        for module in attention_modules(model):
            setattr(module, KV_CAST, fp8_kv_cast(torch.tensor(1.0), torch.tensor(1.0)))
    return model.to(torch_device()).eval()


def open_session(model_dir: Path, *, threads: int, tokenizer_dir: Path | None = None,
                 kv_cache_dtype: str = "auto") -> "ModelSession":
    return ModelSession(load(model_dir, threads, kv_cache_dtype), runtime=name() + KV_CACHE_DTYPES[kv_cache_dtype],
                        device=device())


class ModelSession(Session):
    """A loaded PyTorch model (transformers', or the checkpoint emulation's) scored in place."""

    def __init__(self, model, *, runtime: str, device: str):
        self.model, self.runtime, self.device = model, runtime, device

    def window_logits(self, windows) -> Iterator[np.ndarray]:
        yield from model_window_logits(self.model, windows)

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        yield from model_generate(self.model, prompts, max_tokens=max_tokens, stop_ids=stop_ids)

    def close(self) -> None:
        self.model = None


# windows shorter than this are scored several at a time, padded on the right to the longest of
# their batch, at most this many tokens a batch with the padding: a batch's logits are no larger
# than one 512-token window's, and an accuracy gate's windows (512 tokens or more) go one at a time
BATCH_TOKENS = 512


def model_window_logits(model, windows) -> Iterator[np.ndarray]:
    """[len(window), V] float32 logits of each window (token id sequences of any lengths), in
    order. Consecutive short windows (a task's choices of one question, lm-eval's requests) share
    a forward pass (``window_batches``); a padded position is never attended to, so a window's
    logits are its own, rounded as a batched matmul rounds."""
    import torch

    with torch.inference_mode():
        for batch in window_batches(windows):
            longest = max(len(window) for window in batch)
            ids = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, window in enumerate(batch):
                ids[row, :len(window)] = torch.as_tensor(np.asarray(window), dtype=torch.long)
                mask[row, :len(window)] = 1
            padded = bool((mask == 0).any())
            logits = model(ids.to(model.device), attention_mask=mask.to(model.device) if padded else None).logits
            for row, window in enumerate(batch):
                yield logits[row, :len(window)].float().cpu().numpy()


def window_batches(windows) -> Iterator[list]:
    """Consecutive windows grouped so that each group, padded to its longest, holds at most
    BATCH_TOKENS tokens (a window that long or longer alone)."""
    batch, longest = [], 0
    for window in windows:
        wider = max(longest, len(window))
        if batch and wider * (len(batch) + 1) > BATCH_TOKENS:
            yield batch
            batch, wider = [], len(window)
        batch.append(window)
        longest = wider
    if batch:
        yield batch


def model_generate(model, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
    """Greedy continuation ids of each prompt, one at a time (no padding), up to `max_tokens`
    ids or the first of `stop_ids`, which is kept. A fresh GenerationConfig: the checkpoint's
    own may sample or penalize repeats."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(stop_ids) or None,
                              pad_token_id=stop_ids[0] if stop_ids else None)
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=model.device)
            output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            yield output[0, ids.shape[1]:].tolist()


def tokenize(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
