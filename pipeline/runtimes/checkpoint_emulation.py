"""An emulation of TensorRT-LLM's quantized arithmetic that reads a ModelOpt checkpoint from disk.

Where TensorRT-LLM or a CUDA GPU is absent, the accuracy gate of a ModelOpt build still scores
the files as written: this module reads the stored quantized weights and their scales, the
stored activation scales and the KV-cache format, places them onto the transformers model of
the checkpoint's own architecture, and runs it over the reference windows. Only the quantized
matmuls and the KV-cache casts are emulated; everything else (norms and their offsets, RoPE and
its scaling, sliding windows, soft-capping, embedding scales, fused projections) is
transformers' own code for that family, so no decoder is written here. It never touches the
model ModelOpt calibrated in memory: its purpose is to prove the files on disk are right.

Two layouts, both written by ModelOpt's exporters:

- ``trtllm`` (the legacy TensorRT-LLM checkpoint ``trtllm-build`` reads): config.json with
  ``quantization.quant_algo`` and ``rank0.safetensors`` with TensorRT-LLM's names
  (``transformer.layers.N.attention.qkv``: q, k and v fused with shared activation scales).
  It does not name the HF architecture's details, so the model's HF config is read from the
  ``source_config.json`` the build keeps beside the checkpoint, and every geometry and RoPE
  field the TensorRT-LLM config does state must agree with it, or the checkpoint is refused;
- ``hf`` (the unified checkpoint TensorRT-LLM's PyTorch backend and vLLM load): config.json with
  ``quantization_config.quant_method: modelopt``, hf_quant_config.json and HF tensor names
  with ``weight_scale`` / ``input_scale``; its config.json is the HF config.

The arithmetic, per ``quant_algo`` (scales are dequantization scales, real = code x scale):

- ``FP8``: weight = fp8(e4m3) codes x per-tensor ``weights_scaling_factor``; the input is
  quantized to e4m3 with the per-tensor ``activation_scaling_factor`` (x x fl(1 / s) in fp32,
  saturated at +-448, rounded to nearest even by the cast, as TensorRT-LLM's kernel does) and
  dequantized; the product accumulates in fp32.
- ``W8A8_SQ_PER_CHANNEL`` (SmoothQuant): the input is first multiplied by the stored
  ``prequant_scaling_factor`` (the smoothing vector), then quantized to int8 with the
  per-tensor ``activation_scaling_factor`` (round half to even, clamp to [-128, 127]); weight =
  int8 codes x per-output-channel ``weights_scaling_factor``.
- ``W8A16`` (weight-only): weight = int8 codes x per-output-channel scale; the input is not
  quantized.
- ``NVFP4`` (the unified checkpoint only): the weight is stored as fp4 e2m1 codes, two a byte
  (the even element in the low nibble; bit 3 of a code is its sign), with an fp8 e4m3 scale per
  block of 16 input values (``weight_scale``) and an fp32 per-tensor ``weight_scale_2``:
  weight = e2m1(code) x weight_scale[block] x weight_scale_2 (ModelOpt's
  ``NVFP4QTensor.dequantize``). The input is quantized the same way per block of 16 along the
  hidden dimension, with the per-tensor ``input_scale`` as its global scale and each block's
  scale computed from the block (TensorRT-LLM's fp4_quantize): s = e4m3(min(amax / (6 x
  input_scale), 448)), x = e2m1(x / (s x input_scale)) x s x input_scale, rounding to the
  nearest e2m1 value, ties to the even code, saturating at 6.
- ``MIXED_PRECISION`` (the unified checkpoint only; ModelOpt writes it when the Linears differ):
  each Linear takes its own ``quant_algo`` from hf_quant_config.json's ``quantized_layers``, with
  that algorithm's arithmetic above; a Linear not listed is unquantized, as TensorRT-LLM's
  PyTorch backend and vLLM load it.
- ``kv_cache_quant_algo: FP8``: keys (after RoPE) and values are quantized to e4m3 with the
  layer's ``kv_cache_scaling_factor`` before attention, as a cache would store them.

A stored bias is added in fp32 after the product. Non-quantized tensors (embeddings, norms,
lm_head) keep their stored dtype (bf16), and the activations between layers are rounded to that
dtype, as the engine's are. Anything else (another quant_algo or KV-cache format, a tensor the
model has no place for, a parameter the checkpoint lacks, tensor parallelism) is refused with
``UnsupportedCheckpoint``, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.errors import BadInput
from pipeline.geometry import Geometry
from pipeline.runtimes.transformers import FP8_E4M3_MAX, KV_CAST, fake_quantize_fp8, fp8_kv_cast

E2M1_MAX = 6.0
NVFP4_BLOCK = 16
# the fp4 e2m1 value of each 4-bit code (bit 3: the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# magnitudes between two e2m1 values; a tie goes to the even code, which is the upper value at
# 0.75, 1.75 and 3.5
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIES_UP = (False, True, False, True, False, True, False)
# quant_algo -> what the emulation does with it; None is an unquantized checkpoint
QUANT_ALGOS = {
    "FP8": "fp8 e4m3 weights and activations, per-tensor scales",
    "W8A8_SQ_PER_CHANNEL": "SmoothQuant int8 weights per channel, int8 activations per tensor",
    "W8A16": "int8 weights per channel, bf16 activations",
    "NVFP4": "fp4 e2m1 weights and activations, fp8 e4m3 scales per block of 16 and a per-tensor scale",
    "MIXED_PRECISION": "each Linear's own quant_algo (quantized_layers), the rest bf16",
}
MIXED_PRECISION = "MIXED_PRECISION"
KV_CACHE_ALGOS = {None: "bf16 KV cache", "FP8": "fp8 e4m3 KV cache",
                  "NVFP4": "nvfp4 KV cache (e2m1, an e4m3 scale a 16 values of a head)"}
# ModelOpt decoder types whose legacy TensorRT-LLM tensor names this module maps back to HF modules
TRTLLM_DECODERS = ("llama", "qwen")
SOURCE_CONFIG = "source_config.json"  # the HF config a build keeps beside a TensorRT-LLM checkpoint


class UnsupportedCheckpoint(BadInput):
    """The checkpoint asks for arithmetic this emulation does not implement."""


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("torch")


def name() -> str:
    return f"the checkpoint emulation (TensorRT-LLM arithmetic in PyTorch {version()})"


def unavailable_reason() -> str | None:
    return None  # torch is a core dependency


def describe(checkpoint_dir: Path) -> str:
    """``emulated:<what it emulates>`` for one checkpoint, the gate's runtime field."""
    from collections import Counter

    from pipeline.host import package_version

    config = read_config(checkpoint_dir)
    layers = Counter(config.get("layer_algos", {}).values())
    mixture = f" ({', '.join(f'{algo} x{count}' for algo, count in sorted(layers.items()))})" if layers else ""
    return (f"emulated:{config['layout']} checkpoint {config['quant_algo'] or 'unquantized'}{mixture}"
            f" + {KV_CACHE_ALGOS[config['kv_cache_quant_algo']]} ({QUANT_ALGOS.get(config['quant_algo'], 'bf16')}), "
            f"TensorRT-LLM arithmetic in PyTorch {package_version('torch')}")


# ---------------------------------------------------------------- reading the checkpoint


def read_config(checkpoint_dir: Path, hf_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts the emulation needs, from either layout's config files, or a refusal. With
    ``hf_config`` (the model's HF config.json, needed to load a ``trtllm`` checkpoint), the
    facts include it, checked against what the TensorRT-LLM config states."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise BadInput("no config.json in the checkpoint", where=str(checkpoint_dir),
                       fix="rebuild it: `dvc repro` (or `qpipe build <recipe>`)")
    config = json.loads(config_path.read_text())
    if "quantization" in config and "architecture" in config:
        facts = _trtllm_facts(config, str(config_path))
        if hf_config is not None:
            check_trtllm_config(config, hf_config, str(config_path))
    elif (checkpoint_dir / "hf_quant_config.json").is_file():
        quant = json.loads((checkpoint_dir / "hf_quant_config.json").read_text())["quantization"]
        hf_config = {key: value for key, value in config.items() if key != "quantization_config"}
        facts = {"layout": "hf", "architecture": (config.get("architectures") or ["?"])[0],
                 "quant_algo": quant.get("quant_algo"), "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
                 "dtype": config.get("dtype") or config.get("torch_dtype") or "bfloat16"}
        if quant.get("quant_algo") == MIXED_PRECISION:
            facts["layer_algos"] = {name: layer.get("quant_algo")
                                    for name, layer in (quant.get("quantized_layers") or {}).items()}
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
    unknown_layers = {name: algo for name, algo in facts.get("layer_algos", {}).items()
                      if algo not in CODE_DTYPES}
    if unknown_layers:
        name, algo = next(iter(unknown_layers.items()))
        raise UnsupportedCheckpoint(f"layer {name}'s quant_algo {algo!r} is not one the emulation knows "
                                    f"({len(unknown_layers)} such layers)", where=f"{where}: quantized_layers",
                                    fix=f"use a recipe whose layers are among: {', '.join(CODE_DTYPES)}")
    if facts["kv_cache_quant_algo"] not in KV_CACHE_ALGOS:
        raise UnsupportedCheckpoint(
            f"kv_cache_quant_algo {facts['kv_cache_quant_algo']!r} is not one the emulation knows",
            where=where, fix="use kv_cache: fp8 or kv_cache: none in the recipe")
    if hf_config is not None:
        geometry = Geometry.from_hf_config(hf_config)
        facts.update(hf_config=hf_config, num_attention_heads=hf_config["num_attention_heads"],
                     num_key_value_heads=geometry.kv_heads, head_dim=geometry.head_dim)
    return facts


def _trtllm_facts(config: dict[str, Any], where: str) -> dict[str, Any]:
    if config.get("decoder", "llama") not in TRTLLM_DECODERS:
        raise UnsupportedCheckpoint(f"TensorRT-LLM decoder {config.get('decoder')!r} ({config['architecture']}) "
                                    "is not emulated", where=f"{where}: decoder",
                                    fix=f"supported decoders: {', '.join(TRTLLM_DECODERS)}")
    mapping = config.get("mapping", {})
    if mapping.get("world_size", 1) != 1:
        raise UnsupportedCheckpoint(f"a {mapping['world_size']}-rank checkpoint is not emulated",
                                    where=f"{where}: mapping", fix="export with inference_tensor_parallel=1")
    quant = config["quantization"]
    return {"layout": "trtllm", "architecture": config["architecture"], "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"), "dtype": config["dtype"]}


def rope_of(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The HF config's RoPE parameters (transformers 5 ``rope_parameters``, else 4's keys)."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def check_trtllm_config(config: dict[str, Any], hf_config: dict[str, Any], where: str) -> None:
    """What the TensorRT-LLM config states must be the HF model's: its geometry and its RoPE
    (a dropped RoPE base or scaling would make the engine compute another model)."""
    heads = hf_config["num_attention_heads"]
    geometry = Geometry.from_hf_config(hf_config)
    rope = rope_of(hf_config)
    expected = {
        "vocab_size": hf_config["vocab_size"], "hidden_size": hf_config["hidden_size"],
        "intermediate_size": hf_config["intermediate_size"], "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": geometry.kv_heads, "head_size": geometry.head_dim,
        # TensorRT-LLM's default when the key is missing, so a dropped RoPE base is caught
        "rotary_base": float(rope["rope_theta"]),
        "rotary_scaling": rope["rope_type"] if rope["rope_type"] != "default" else None,
    }
    stated = {key: config.get(key) for key in expected}
    stated["rotary_base"] = float(config.get("rotary_base", 10000.0))
    scaling = config.get("rotary_scaling")
    stated["rotary_scaling"] = (scaling.get("rope_type") or scaling.get("type")) if scaling else None
    wrong = {key: (stated[key], value) for key, value in expected.items()
             if stated[key] != value and not (key == "num_key_value_heads" and stated[key] is None)}
    if wrong:
        key, (found, want) = next(iter(wrong.items()))
        raise UnsupportedCheckpoint(
            f"the TensorRT-LLM checkpoint's {key} is {found!r}, the model's is {want!r} "
            f"({len(wrong)} field{'s' if len(wrong) > 1 else ''} disagree)", where=f"{where}: {key}",
            fix="rebuild it; if it persists, report it with build.json's tool versions")


# ---------------------------------------------------------------- the arithmetic


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored codes (fp8 or int8) x their dequantization scale (per tensor, or per output
    channel for a [out, in] weight), in fp32."""
    scale = scale.float()
    scale = scale.reshape(-1, *([1] * (codes.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    return codes.to(torch.float32) * scale


def fake_quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to int8 with a per-tensor scale and back: round half to even, clamp [-128, 127]."""
    scale = scale.float().reshape(())
    return (x.float() / scale).round().clamp(-128, 127) * scale


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 weight from [out, in/2] packed e2m1 codes, [out, in/16] e4m3 block scales
    and the per-tensor scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes]
    scales = block_scale.float() * global_scale.float().reshape(())
    return (values.reshape(*scales.shape, NVFP4_BLOCK) * scales.unsqueeze(-1)).reshape(values.shape)


def round_to_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative values rounded to the nearest e2m1 magnitude (ties to the even code), at most 6."""
    bounds = torch.tensor(E2M1_BOUNDS, dtype=magnitude.dtype, device=magnitude.device)
    index = torch.bucketize(magnitude, bounds)  # a value on a bound goes to the lower side
    for position, (bound, up) in enumerate(zip(E2M1_BOUNDS, E2M1_TIES_UP)):
        if up:
            index = index + ((magnitude == bound) & (index == position)).long()
    return torch.tensor(E2M1_VALUES[:8], dtype=magnitude.dtype, device=magnitude.device)[index]


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Quantize to e2m1 in blocks of 16 along the last dimension, each block's e4m3 scale from
    its own amax over the per-tensor ``global_scale``, and back, in fp32."""
    shape = x.shape
    global_scale = global_scale.float().reshape(())
    blocks = x.float().reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (block_amax / (E2M1_MAX * global_scale)).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale = block_scale.float() * global_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.sign(blocks) * round_to_e2m1(blocks.abs() / safe) * scale
    return quantized.reshape(shape)


class EmulatedLinear(torch.nn.Module):
    """y = quantize(x * smoothing) @ dequantize(codes, scale).T (+ bias) in fp32, rounded to the
    model's dtype. It holds the stored codes (1 byte a weight) and their scales, and
    dequantizes one layer's weight at a time, inside its forward: an fp32 copy of every weight
    would be four times the checkpoint (32 GB for an 8B model)."""

    def __init__(self, codes: torch.Tensor, weight_scale: torch.Tensor, *, input_format: str | None,
                 input_scale: torch.Tensor | None, smoothing: torch.Tensor | None, out_dtype: torch.dtype,
                 bias: torch.Tensor | None = None, weight_scale_2: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)  # fp8 e4m3, int8 or packed e2m1, as stored
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.register_buffer("smoothing", smoothing, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.register_buffer("weight_scale_2", weight_scale_2, persistent=False)
        self.input_format = input_format
        self.out_dtype = out_dtype
        self.out_features = codes.shape[0]
        self.in_features = codes.shape[1] * (2 if input_format == "nvfp4" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.smoothing is not None:
            x = x * self.smoothing.float()
        if self.input_format == "fp8":
            x = fake_quantize_fp8(x, self.input_scale)
        elif self.input_format == "int8":
            x = fake_quantize_int8(x, self.input_scale)
        elif self.input_format == "nvfp4":
            x = fake_quantize_nvfp4(x, self.input_scale)
        if self.input_format == "nvfp4":
            weight = dequantize_nvfp4(self.codes, self.weight_scale, self.weight_scale_2)
        else:
            weight = dequantize(self.codes, self.weight_scale)
        return torch.nn.functional.linear(x, weight, self.bias).to(self.out_dtype)


INPUT_FORMAT = {"FP8": "fp8", "W8A8_SQ_PER_CHANNEL": "int8", "W8A16": None, "NVFP4": "nvfp4"}
# the stored dtype of each quant_algo's weight codes
CODE_DTYPES = {"FP8": torch.float8_e4m3fn, "W8A8_SQ_PER_CHANNEL": torch.int8, "W8A16": torch.int8,
               "NVFP4": torch.uint8}


def linear_quant_algo(facts: dict[str, Any], module_name: str, tensors: dict[str, Any]) -> str | None:
    """A Linear's quant_algo: the checkpoint's, or in a MIXED_PRECISION one its quantized_layers
    entry (None where it has none), which must be the algorithm its weight is stored for."""
    if "layer_algos" not in facts:
        return facts["quant_algo"]
    algo = facts["layer_algos"].get(module_name)
    if algo is not None and tensors["weight"].dtype != CODE_DTYPES[algo]:
        raise UnsupportedCheckpoint(f"layer {module_name} is declared {algo} but its weight is stored as "
                                    f"{tensors['weight'].dtype}", where="hf_quant_config.json: quantized_layers",
                                    fix="re-export the checkpoint")
    return algo


def linear_from_tensors(tensors: dict[str, Any], quant_algo: str | None, out_dtype: torch.dtype) -> torch.nn.Module:
    """One Linear from its stored tensors (weight, bias, weight_scale, input_scale, smoothing)."""
    weight, bias = tensors["weight"], tensors.get("bias")
    if weight.dtype not in set(CODE_DTYPES.values()):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        linear.weight.data = weight
        if bias is not None:
            linear.bias.data = bias.to(weight.dtype)
        return linear
    if quant_algo not in QUANT_ALGOS or weight.dtype != CODE_DTYPES[quant_algo]:
        raise UnsupportedCheckpoint(f"a {weight.dtype} weight in a checkpoint whose quant_algo is {quant_algo!r}",
                                    where="quantization", fix="re-export the checkpoint")
    input_format = INPUT_FORMAT[quant_algo]
    return EmulatedLinear(
        weight, tensors["weight_scale"],
        input_format=input_format,
        input_scale=tensors["input_scale"] if input_format else None,
        smoothing=tensors.get("smoothing"),
        out_dtype=out_dtype,
        bias=bias,
        weight_scale_2=tensors.get("weight_scale_2"),
    )


# ---------------------------------------------------------------- layouts -> HF module names


# legacy TensorRT-LLM names (decoders llama and qwen) -> HF modules. mlp.fc goes through the
# activation (HF gate_proj), mlp.gate is HF up_proj.
TRTLLM_LINEARS = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj",
                  "mlp.gate": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
TRTLLM_NORMS = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm",
                "attention.q_layernorm": "self_attn.q_norm", "attention.k_layernorm": "self_attn.k_norm"}
TRTLLM_SUFFIXES = {"weight": "weight", "bias": "bias", "weights_scaling_factor": "weight_scale",
                   "activation_scaling_factor": "input_scale", "prequant_scaling_factor": "smoothing"}
# ModelOpt writes kv_cache_scaling_factor = max(k, v, 1.0) beside the k_ and v_ ones; TensorRT-LLM
# 1.2 uses the kv_ one for both (and builds it from k_ and v_ by max only where it is missing)
KV_SCALE_NAMES = {"attention.kv_cache_scaling_factor": "kv", "attention.k_cache_scaling_factor": "k",
                  "attention.v_cache_scaling_factor": "v"}
HF_SUFFIXES = {"weight": "weight", "bias": "bias", "weight_scale": "weight_scale", "input_scale": "input_scale",
               "weight_scale_2": "weight_scale_2", "pre_quant_scale": "smoothing"}


def _load_tensors(checkpoint_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise BadInput("no safetensors files in the checkpoint", where=str(checkpoint_dir),
                       fix="rebuild it: `dvc repro`")
    return tensors


def layer_tensors(tensors: dict[str, Any], facts: dict[str, Any],
                  linear_modules: frozenset[str] | set[str] = frozenset()) -> tuple[dict, dict[str, dict], dict]:
    """Split a checkpoint's tensors into (plain HF parameters, {HF linear name: its tensors},
    {layer index: kv cache scale}). The trtllm layout's fused qkv becomes q, k and v, each
    keeping the shared scales (per-channel scales and the bias are split with their rows). In
    the hf layout, a tensor belongs to a linear when its module is one of ``linear_modules``
    (the model's nn.Linear names)."""
    plain: dict[str, Any] = {}
    linears: dict[str, dict[str, Any]] = {}
    kv_scales: dict[int, Any] = {}

    def add(module: str, suffix: str, tensor) -> None:
        linears.setdefault(module, {})[suffix] = tensor

    if facts["layout"] == "hf":
        for key, tensor in tensors.items():
            module, _, suffix = key.rpartition(".")
            if suffix in ("k_scale", "v_scale"):
                kv_scales.setdefault(int(key.split(".")[2]), {})[suffix[0]] = tensor
            elif module in linear_modules and suffix in HF_SUFFIXES:
                add(module, HF_SUFFIXES[suffix], tensor)
            else:
                plain[key] = tensor
        return plain, linears, kv_scales

    q_rows = facts["num_attention_heads"] * facts["head_dim"]
    kv_rows = facts["num_key_value_heads"] * facts["head_dim"]
    renames = {"transformer.vocab_embedding.weight": "model.embed_tokens.weight",
               "transformer.ln_f.weight": "model.norm.weight"}
    for key, tensor in tensors.items():
        if key in renames:
            plain[renames[key]] = tensor
            continue
        if key.startswith("lm_head."):
            add("lm_head", key.removeprefix("lm_head."), tensor)
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "layers"]:
            raise UnsupportedCheckpoint(f"unexpected tensor {key}", where="rank0.safetensors",
                                        fix="the emulation reads Llama- and Qwen-style TensorRT-LLM checkpoints only")
        index, rest = int(parts[2]), ".".join(parts[3:])
        prefix = f"model.layers.{index}"
        module, _, suffix = rest.rpartition(".")
        if module in TRTLLM_NORMS:
            plain[f"{prefix}.{TRTLLM_NORMS[module]}.{suffix}"] = tensor
        elif rest in KV_SCALE_NAMES:
            kv_scales.setdefault(index, {})[KV_SCALE_NAMES[rest]] = tensor
        elif module == "attention.qkv" and suffix in TRTLLM_SUFFIXES:
            name = TRTLLM_SUFFIXES[suffix]
            if name in ("weight", "weight_scale", "bias") and tensor.numel() > 1:
                q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            else:
                q = k = v = tensor
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                add(f"{prefix}.self_attn.{proj}", name, part)
        elif module in TRTLLM_LINEARS and suffix in TRTLLM_SUFFIXES:
            add(f"{prefix}.{TRTLLM_LINEARS[module]}", TRTLLM_SUFFIXES[suffix], tensor)
        else:
            raise UnsupportedCheckpoint(f"unexpected tensor {key}", where="rank0.safetensors",
                                        fix="the emulation reads Llama- and Qwen-style TensorRT-LLM checkpoints only")
    return plain, linears, kv_scales


# ---------------------------------------------------------------- the model


def nvfp4_kv_cast(k_scale, v_scale):
    """A KV_CAST for an NVFP4 cache: keys and values in blocks of 16 along the head, as ModelOpt's
    NVFP4_KV_CFG fake-quantizes them. The exported k_scale / v_scale are amax / 448 ("kv cache
    scale as amax / 448 for both FP8 and NVFP4", modelopt/torch/export/quant_utils.py), and
    NVFP4's per-tensor scale is amax / (6 x 448), so a sixth of them."""
    def cast(key, value):
        return (fake_quantize_nvfp4(key, k_scale / E2M1_MAX).to(key.dtype),
                fake_quantize_nvfp4(value, v_scale / E2M1_MAX).to(value.dtype))

    return cast


def kv_cast(algorithm: str, scales: dict[str, torch.Tensor]):
    """The KV_CAST of a checkpoint's kv_cache_quant_algo, with one layer's K and V scales."""
    return {"FP8": fp8_kv_cast, "NVFP4": nvfp4_kv_cast}[algorithm](scales["k"], scales["v"])


def kv_scale_pair(scales: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The scales keys and values are stored with: the unified checkpoint's k_scale and
    v_scale apart; in a TensorRT-LLM checkpoint one shared scale, kv_cache_scaling_factor, or
    where only k_ and v_ are stored their maximum, as TensorRT-LLM 1.2's loader does."""
    if layout == "hf":
        return {"k": scales["k"], "v": scales["v"]}
    shared = scales["kv"] if "kv" in scales else torch.maximum(scales["k"], scales["v"])
    return {"k": shared, "v": shared}


def model_config_for(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The HF config a ``trtllm`` checkpoint is loaded with: the build's source_config.json,
    kept beside the checkpoint directory (None where there is none)."""
    path = Path(checkpoint_dir).parent / SOURCE_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def load(checkpoint_dir: Path, threads: int):
    """The emulated model: the transformers model of the checkpoint's architecture, in the
    checkpoint's dtype, with every Linear rebuilt from the stored codes and scales."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.runtimes.transformers import (attention_implementation, attention_modules,
                                                 kv_cast_attention, torch_device)

    torch.set_num_threads(threads)
    facts = read_config(checkpoint_dir, model_config_for(checkpoint_dir))
    if "hf_config" not in facts:
        raise BadInput("a TensorRT-LLM checkpoint needs the model's HF config to be emulated",
                       where=f"{Path(checkpoint_dir).parent / SOURCE_CONFIG}",
                       fix="rebuild it with `qpipe build <recipe>`, which keeps the source config beside it")
    dtype = getattr(torch, facts["dtype"])
    config_dict = dict(facts["hf_config"])
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config._attn_implementation = kv_cast_attention(attention_implementation(config) or "sdpa")
    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE buffers computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linear_modules = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plain, linears, kv_scales = layer_tensors(_load_tensors(checkpoint_dir), facts, linear_modules)
    if "lm_head" not in linears and config.tie_word_embeddings:
        linears["lm_head"] = {"weight": plain["model.embed_tokens.weight"]}
    unknown = sorted(set(linears) - linear_modules)
    if unknown:
        raise UnsupportedCheckpoint(f"the checkpoint has a linear layer {unknown[0]} that {type(model).__name__} "
                                    f"lacks ({len(unknown)} in all)", where=str(checkpoint_dir),
                                    fix="re-export the checkpoint from this model")
    for module_name, tensors in linears.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent.register_module(child, linear_from_tensors(tensors, linear_quant_algo(facts, module_name, tensors),
                                                          dtype))
    result = model.load_state_dict(plain, strict=False, assign=True)
    if result.unexpected_keys:
        raise UnsupportedCheckpoint(f"the checkpoint has {len(result.unexpected_keys)} tensors "
                                    f"{type(model).__name__} has no place for, e.g. {result.unexpected_keys[0]}",
                                    where=str(checkpoint_dir), fix="re-export the checkpoint from this model")
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise UnsupportedCheckpoint(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}",
                                    where=str(checkpoint_dir), fix="re-export the checkpoint")
    if facts["kv_cache_quant_algo"] is not None:
        attentions = attention_modules(model)
        for index, attention in enumerate(attentions):
            if index not in kv_scales:
                raise UnsupportedCheckpoint(f"layer {index} has no KV-cache scale although the cache is "
                                            f"{facts['kv_cache_quant_algo']}", where=str(checkpoint_dir),
                                            fix="re-export the checkpoint")
            setattr(attention, KV_CAST, kv_cast(facts["kv_cache_quant_algo"],
                                                kv_scale_pair(kv_scales[index], facts["layout"])))
    return model.to(torch_device()).eval()


def device() -> str:
    """Where the emulation runs here: on a CUDA GPU if there is one ("gpu"), else "cpu"."""
    from pipeline.runtimes.transformers import device as transformers_device

    return transformers_device()


def open_session(checkpoint_dir: Path, *, threads: int, tokenizer_dir: Path | None = None):
    """The emulated model, scored as transformers' (its generate casts the KV cache to the
    checkpoint's KV dtype as its logits do)."""
    from pipeline.runtimes.transformers import ModelSession

    return ModelSession(load(checkpoint_dir, threads), runtime=describe(checkpoint_dir), device=device())
