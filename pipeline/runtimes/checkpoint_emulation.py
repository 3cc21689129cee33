"""An emulation of TensorRT-LLM's quantized arithmetic that reads a ModelOpt checkpoint from disk.

Where TensorRT-LLM or a CUDA GPU is absent, the accuracy gate of a ModelOpt build still scores
the files as written: this module reads the stored quantized weights and their scales, the
stored activation scales and the KV-cache format, rebuilds every Linear layer in PyTorch with
that arithmetic, and runs the model over the reference windows. It never touches the model
ModelOpt calibrated in memory: its purpose is to prove the files on disk are right.

Two layouts, both written by ModelOpt's exporters:

- ``trtllm`` (the legacy TensorRT-LLM checkpoint ``trtllm-build`` reads): config.json with
  ``quantization.quant_algo`` and ``rank0.safetensors`` with TensorRT-LLM's names
  (``transformer.layers.N.attention.qkv``: q, k and v fused with shared activation scales);
- ``hf`` (the unified checkpoint TensorRT-LLM's PyTorch backend and vLLM load): config.json with
  ``quantization_config.quant_method: modelopt``, hf_quant_config.json and HF tensor names
  with ``weight_scale`` / ``input_scale``.

The arithmetic, per ``quant_algo`` (scales are dequantization scales, real = code x scale):

- ``FP8``: weight = fp8(e4m3) codes x per-tensor ``weights_scaling_factor``; the input is
  quantized to e4m3 with the per-tensor ``activation_scaling_factor`` (x / s, saturated at
  +-448, rounded to nearest even by the cast) and dequantized; the product accumulates in fp32.
- ``W8A8_SQ_PER_CHANNEL`` (SmoothQuant): the input is first multiplied by the stored
  ``prequant_scaling_factor`` (the smoothing vector), then quantized to int8 with the
  per-tensor ``activation_scaling_factor`` (round half to even, clamp to [-128, 127]); weight =
  int8 codes x per-output-channel ``weights_scaling_factor``.
- ``W8A16`` (weight-only): weight = int8 codes x per-output-channel scale; the input is not
  quantized.
- ``kv_cache_quant_algo: FP8``: keys (after RoPE) and values are quantized to e4m3 with the
  layer's ``kv_cache_scaling_factor`` before attention, as a cache would store them.

Non-quantized tensors (embeddings, norms, lm_head) keep their stored dtype (bf16), and the
activations between layers are rounded to that dtype, as the engine's are. Anything else
(another quant_algo, KV-cache format, architecture, RoPE scaling or tensor parallelism) is
refused with ``UnsupportedCheckpoint``, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.errors import BadInput

FP8_E4M3_MAX = 448.0
# quant_algo -> what the emulation does with it; None is an unquantized checkpoint
QUANT_ALGOS = {
    "FP8": "fp8 e4m3 weights and activations, per-tensor scales",
    "W8A8_SQ_PER_CHANNEL": "SmoothQuant int8 weights per channel, int8 activations per tensor",
    "W8A16": "int8 weights per channel, bf16 activations",
}
KV_CACHE_ALGOS = {None: "bf16 KV cache", "FP8": "fp8 e4m3 KV cache"}
ARCHITECTURES = ("LlamaForCausalLM",)
ATTENTION_NAME = "qpipe_quantized_kv"


class UnsupportedCheckpoint(BadInput):
    """The checkpoint asks for arithmetic this emulation does not implement."""


def name(checkpoint_dir: Path) -> str:
    """``emulated:<what it emulates>``, for the gate's runtime field."""
    from pipeline.host import package_version

    config = read_config(checkpoint_dir)
    return (f"emulated:{config['layout']} checkpoint {config['quant_algo'] or 'unquantized'}"
            f" + {KV_CACHE_ALGOS[config['kv_cache_quant_algo']]} ({QUANT_ALGOS.get(config['quant_algo'], 'bf16')}), "
            f"TensorRT-LLM arithmetic in PyTorch {package_version('torch')}")


def unavailable_reason() -> str | None:
    return None  # torch and transformers are core dependencies


# ---------------------------------------------------------------- reading the checkpoint


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The facts the emulation needs, from either layout's config files, or a refusal."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise BadInput("no config.json in the checkpoint", where=str(checkpoint_dir),
                       fix="rebuild it: `dvc repro` (or `qpipe build <recipe>`)")
    config = json.loads(config_path.read_text())
    if "quantization" in config and "architecture" in config:
        facts = _trtllm_facts(config, str(config_path))
    elif (checkpoint_dir / "hf_quant_config.json").is_file():
        quant = json.loads((checkpoint_dir / "hf_quant_config.json").read_text())["quantization"]
        facts = _hf_facts(config, quant, str(config_path))
    else:
        raise UnsupportedCheckpoint(
            "not a ModelOpt checkpoint: config.json has neither TensorRT-LLM's `quantization` nor a "
            "hf_quant_config.json beside it", where=str(config_path),
            fix="point the emulation at a directory written by ModelOpt's exporters")
    where = f"{config_path}: quantization"
    if facts["quant_algo"] is not None and facts["quant_algo"] not in QUANT_ALGOS:
        raise UnsupportedCheckpoint(
            f"quant_algo {facts['quant_algo']!r} is not one the emulation knows; it refuses rather than guess",
            where=where, fix=f"use a recipe whose export is one of: {', '.join(QUANT_ALGOS)}")
    if facts["kv_cache_quant_algo"] not in KV_CACHE_ALGOS:
        raise UnsupportedCheckpoint(
            f"kv_cache_quant_algo {facts['kv_cache_quant_algo']!r} is not one the emulation knows",
            where=where, fix="use kv_cache: fp8 or kv_cache: none in the recipe")
    return facts


def _trtllm_facts(config: dict[str, Any], where: str) -> dict[str, Any]:
    if config["architecture"] not in ARCHITECTURES:
        raise UnsupportedCheckpoint(f"architecture {config['architecture']} is not emulated",
                                    where=f"{where}: architecture", fix=f"supported: {', '.join(ARCHITECTURES)}")
    mapping = config.get("mapping", {})
    if mapping.get("world_size", 1) != 1:
        raise UnsupportedCheckpoint(f"a {mapping['world_size']}-rank checkpoint is not emulated",
                                    where=f"{where}: mapping", fix="export with inference_tensor_parallel=1")
    if config.get("position_embedding_type") != "rope_gpt_neox" or config.get("rotary_scaling"):
        raise UnsupportedCheckpoint(
            f"position embedding {config.get('position_embedding_type')} "
            f"(scaling {config.get('rotary_scaling')}) is not emulated",
            where=f"{where}: position_embedding_type", fix="only plain rope_gpt_neox is emulated")
    quant = config["quantization"]
    return {
        "layout": "trtllm",
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "dtype": config["dtype"],
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_dim": config.get("head_size") or config["hidden_size"] // config["num_attention_heads"],
        "rms_norm_eps": config["norm_epsilon"],
        "hidden_act": config["hidden_act"],
        # TensorRT-LLM's default when the key is missing, so a dropped RoPE base shows in the scores
        "rope_theta": config.get("rotary_base", 10000.0),
        "max_position_embeddings": config["max_position_embeddings"],
        "tie_word_embeddings": bool(config.get("share_embedding_table")),
    }


def _hf_facts(config: dict[str, Any], quant: dict[str, Any], where: str) -> dict[str, Any]:
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise UnsupportedCheckpoint(f"architecture {architecture} is not emulated", where=f"{where}: architectures",
                                    fix=f"supported: {', '.join(ARCHITECTURES)}")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedCheckpoint(f"RoPE type {rope['rope_type']} is not emulated", where=f"{where}: rope_parameters",
                                    fix="only default RoPE is emulated")
    heads = config["num_attention_heads"]
    return {
        "layout": "hf",
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "dtype": config.get("dtype") or config.get("torch_dtype") or "bfloat16",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "rms_norm_eps": config["rms_norm_eps"],
        "hidden_act": config["hidden_act"],
        "rope_theta": rope["rope_theta"],
        "max_position_embeddings": config["max_position_embeddings"],
        "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
    }


# ---------------------------------------------------------------- the arithmetic


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored codes (fp8 or int8) x their dequantization scale (per tensor, or per output
    channel for a [out, in] weight), in fp32."""
    scale = scale.float()
    scale = scale.reshape(-1, *([1] * (codes.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    return codes.to(torch.float32) * scale


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to e4m3 with a per-tensor scale and back (what the engine's fp8 input sees)."""
    scale = scale.float().reshape(())
    codes = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.to(torch.float32) * scale


def fake_quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to int8 with a per-tensor scale and back: round half to even, clamp [-128, 127]."""
    scale = scale.float().reshape(())
    return (x.float() / scale).round().clamp(-128, 127) * scale


class EmulatedLinear(torch.nn.Module):
    """y = quantize(x * smoothing) @ dequantize(W).T in fp32, rounded to the model's dtype."""

    def __init__(self, weight: torch.Tensor, *, input_format: str | None, input_scale: torch.Tensor | None,
                 smoothing: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)  # dequantized, fp32
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.register_buffer("smoothing", smoothing, persistent=False)
        self.input_format = input_format
        self.out_dtype = out_dtype
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.smoothing is not None:
            x = x * self.smoothing.float()
        if self.input_format == "fp8":
            x = fake_quantize_fp8(x, self.input_scale)
        elif self.input_format == "int8":
            x = fake_quantize_int8(x, self.input_scale)
        return torch.nn.functional.linear(x, self.weight).to(self.out_dtype)


INPUT_FORMAT = {"FP8": "fp8", "W8A8_SQ_PER_CHANNEL": "int8", "W8A16": None}


def linear_from_tensors(tensors: dict[str, Any], quant_algo: str | None, out_dtype: torch.dtype) -> torch.nn.Module:
    """One Linear from its stored tensors (weight, weight_scale, input_scale, smoothing)."""
    weight = tensors["weight"]
    if weight.dtype not in (torch.float8_e4m3fn, torch.int8):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight.data = weight
        return linear
    if quant_algo not in QUANT_ALGOS:
        raise UnsupportedCheckpoint(f"a {weight.dtype} weight in a checkpoint whose quant_algo is {quant_algo!r}",
                                    where="quantization", fix="re-export the checkpoint")
    input_format = INPUT_FORMAT[quant_algo]
    return EmulatedLinear(
        dequantize(weight, tensors["weight_scale"]),
        input_format=input_format,
        input_scale=tensors["input_scale"] if input_format else None,
        smoothing=tensors.get("smoothing"),
        out_dtype=out_dtype,
    )


# ---------------------------------------------------------------- layouts -> HF module names


TRTLLM_LINEARS = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj",
                  "mlp.gate": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
TRTLLM_SUFFIXES = {"weight": "weight", "weights_scaling_factor": "weight_scale",
                   "activation_scaling_factor": "input_scale", "prequant_scaling_factor": "smoothing"}
# ModelOpt writes kv_cache_scaling_factor = max(k, v, 1.0) beside the k_ and v_ ones; TensorRT-LLM
# 1.2 uses the kv_ one for both (and builds it from k_ and v_ by max only where it is missing)
KV_SCALE_NAMES = {"attention.kv_cache_scaling_factor": "kv", "attention.k_cache_scaling_factor": "k",
                  "attention.v_cache_scaling_factor": "v"}
HF_SUFFIXES = {"weight": "weight", "weight_scale": "weight_scale", "input_scale": "input_scale",
               "pre_quant_scale": "smoothing"}


def _load_tensors(checkpoint_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise BadInput("no safetensors files in the checkpoint", where=str(checkpoint_dir),
                       fix="rebuild it: `dvc repro`")
    return tensors


def layer_tensors(tensors: dict[str, Any], facts: dict[str, Any]) -> tuple[dict, dict[str, dict], dict]:
    """Split a checkpoint's tensors into (plain HF parameters, {HF linear name: its tensors},
    {layer index: kv cache scale}). The trtllm layout's fused qkv becomes q, k and v, each
    keeping the shared scales (per-channel scales are split with their rows)."""
    plain: dict[str, Any] = {}
    linears: dict[str, dict[str, Any]] = {}
    kv_scales: dict[int, Any] = {}
    q_rows = facts["num_attention_heads"] * facts["head_dim"]
    kv_rows = facts["num_key_value_heads"] * facts["head_dim"]

    def add(module: str, suffix: str, tensor) -> None:
        linears.setdefault(module, {})[suffix] = tensor

    if facts["layout"] == "hf":
        for key, tensor in tensors.items():
            module, _, suffix = key.rpartition(".")
            if suffix in ("k_scale", "v_scale"):
                kv_scales.setdefault(int(key.split(".")[2]), {})[suffix[0]] = tensor
            elif module.endswith("_proj") and suffix in HF_SUFFIXES:
                add(module, HF_SUFFIXES[suffix], tensor)
            else:
                plain[key] = tensor
        return plain, linears, kv_scales

    renames = {"transformer.vocab_embedding.weight": "model.embed_tokens.weight",
               "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    for key, tensor in tensors.items():
        if key in renames:
            plain[renames[key]] = tensor
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "layers"]:
            raise UnsupportedCheckpoint(f"unexpected tensor {key}", where="rank0.safetensors",
                                        fix="the emulation reads Llama-style TensorRT-LLM checkpoints only")
        index, rest = int(parts[2]), ".".join(parts[3:])
        prefix = f"model.layers.{index}"
        module, _, suffix = rest.rpartition(".")
        if module in ("input_layernorm", "post_layernorm"):
            hf = "input_layernorm" if module == "input_layernorm" else "post_attention_layernorm"
            plain[f"{prefix}.{hf}.{suffix}"] = tensor
        elif rest in KV_SCALE_NAMES:
            kv_scales.setdefault(index, {})[KV_SCALE_NAMES[rest]] = tensor
        elif module == "attention.qkv" and suffix in TRTLLM_SUFFIXES:
            name = TRTLLM_SUFFIXES[suffix]
            if name in ("weight", "weight_scale") and tensor.numel() > 1:
                q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            else:
                q = k = v = tensor
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                add(f"{prefix}.self_attn.{proj}", name, part)
        elif module in TRTLLM_LINEARS and suffix in TRTLLM_SUFFIXES:
            add(f"{prefix}.{TRTLLM_LINEARS[module]}", TRTLLM_SUFFIXES[suffix], tensor)
        else:
            raise UnsupportedCheckpoint(f"unexpected tensor {key}", where="rank0.safetensors",
                                        fix="the emulation reads Llama-style TensorRT-LLM checkpoints only")
    return plain, linears, kv_scales


# ---------------------------------------------------------------- the model


def _quantized_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention with the KV cache's storage format applied to keys and values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scales = getattr(module, "qpipe_kv_scales", None)
    if scales is not None:
        key = fake_quantize_fp8(key, scales["k"]).to(key.dtype)
        value = fake_quantize_fp8(value, scales["v"]).to(value.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def kv_scale_pair(scales: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The scales keys and values are stored with: the unified checkpoint's k_scale and
    v_scale apart; in a TensorRT-LLM checkpoint one shared scale, kv_cache_scaling_factor, or
    where only k_ and v_ are stored their maximum, as TensorRT-LLM 1.2's loader does."""
    if layout == "hf":
        return {"k": scales["k"], "v": scales["v"]}
    shared = scales["kv"] if "kv" in scales else torch.maximum(scales["k"], scales["v"])
    return {"k": shared, "v": shared}


def load(checkpoint_dir: Path, threads: int):
    """The emulated model: an HF Llama in the checkpoint's dtype whose Linear layers are
    rebuilt from the stored codes and scales."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    facts = read_config(checkpoint_dir)
    dtype = getattr(torch, facts["dtype"])
    AttentionInterface.register(ATTENTION_NAME, _quantized_kv_attention)
    config = LlamaConfig(
        vocab_size=facts["vocab_size"], hidden_size=facts["hidden_size"],
        intermediate_size=facts["intermediate_size"], num_hidden_layers=facts["num_hidden_layers"],
        num_attention_heads=facts["num_attention_heads"], num_key_value_heads=facts["num_key_value_heads"],
        head_dim=facts["head_dim"], rms_norm_eps=facts["rms_norm_eps"], hidden_act=facts["hidden_act"],
        max_position_embeddings=facts["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(facts["rope_theta"])},
        tie_word_embeddings=facts["tie_word_embeddings"], attention_bias=False, mlp_bias=False,
    )
    config._attn_implementation = ATTENTION_NAME
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plain, linears, kv_scales = layer_tensors(_load_tensors(checkpoint_dir), facts)
    for module_name, tensors in linears.items():
        parent_name, _, child = module_name.rpartition(".")
        model.get_submodule(parent_name).register_module(
            child, linear_from_tensors(tensors, facts["quant_algo"], dtype))
    if facts["tie_word_embeddings"]:
        plain.setdefault("lm_head.weight", plain["model.embed_tokens.weight"])
    missing = model.load_state_dict(plain, strict=False, assign=True).missing_keys
    missing = [key for key in missing if not key.endswith("rotary_emb.inv_freq")]
    if missing:
        raise UnsupportedCheckpoint(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}",
                                    where=str(checkpoint_dir), fix="re-export the checkpoint")
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # inv_freq is computed, not stored
    if facts["kv_cache_quant_algo"] == "FP8":
        for index, layer in enumerate(model.model.layers):
            if index not in kv_scales:
                raise UnsupportedCheckpoint(f"layer {index} has no KV-cache scale although the cache is FP8",
                                            where=str(checkpoint_dir), fix="re-export the checkpoint")
            layer.self_attn.qpipe_kv_scales = kv_scale_pair(kv_scales[index], facts["layout"])
    return model.eval()


def window_logits(checkpoint_dir: Path, windows: np.ndarray, *, threads: int) -> Iterator[np.ndarray]:
    model = load(checkpoint_dir, threads)
    with torch.inference_mode():
        for window in windows:
            ids = torch.as_tensor(window, dtype=torch.long)[None]
            yield model(ids).logits[0].float().numpy()
