"""AWQ 4-bit for vLLM: llm-compressor ``oneshot`` -> a compressed-tensors ``pack-quantized`` directory.

``algorithm: awq`` runs llm-compressor's AWQModifier then a W4A16 QuantizationModifier;
``algorithm: rtn`` the QuantizationModifier alone. The build checks group size and AWQ mapping
before loading weights, then reloads the saved directory and compares its logits with the
calibrated model's. The gates run through vLLM where it can run, else accuracy through
transformers on the directory as written. Why these tools, every check, and the upstream
workarounds: docs/formats/awq.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.config import RecipeBase, SpeedParams
from pipeline.corpus import calibration_windows
from pipeline.errors import BadInput, HostLacks, QpipeError, RecipeNotApplicable
from pipeline.formats.contract import (FormatInfo, calibration_host_knobs, calibration_plan, missing_distribution,
                                       require_installed)
from pipeline.memory import GIB, Factors
from pipeline.search import SearchSpec, check_search_keys, checked_patterns, first_match

# 4-bit weight-only integer presets of compressed-tensors that pack as `pack-quantized`.
SCHEMES = ("W4A16", "W4A16_ASYM")
# Group sizes vLLM's mixed-precision kernels take (Marlin: -1, 32, 64, 128; Machete: 64, 128).
KERNEL_GROUP_SIZES = (32, 64, 128)
# what a `schemes` entry (and the per-tensor search) may give a module: 4 bits, symmetric or with
# zero points, or 8 bits symmetric (the only int8 Marlin serves: uint8b128), at a kernel group
# size; or UNQUANTIZED, the layer left in the recipe's dtype
MODULE_SCHEMES = {f"{preset}_G{group_size}": (preset, group_size)
                  for preset in ("W4A16", "W4A16_ASYM", "W8A16") for group_size in KERNEL_GROUP_SIZES}
UNQUANTIZED = "UNQUANTIZED"
# what the per-tensor search measures and chooses from (docs/sensitivity.md), beside UNQUANTIZED
SEARCH_TYPES = ("W4A16_ASYM_G128", "W4A16_ASYM_G64", "W4A16_ASYM_G32", "W8A16_G32")
SEARCH_UNQUANTIZED = UNQUANTIZED
# the dtype the search assumes a build holds (Recipe.dtype's default) and the bytes of a value in it
SEARCH_DTYPE, UNQUANTIZED_BYTES = "bfloat16", 2
BUILD_FILE = "build.json"


class Recipe(RecipeBase):
    format: Literal["awq"]
    algorithm: Literal["awq", "rtn"] = Field("awq", description="awq: AWQModifier then QuantizationModifier; "
                                             "rtn: QuantizationModifier alone (round-to-nearest, no calibration)")
    scheme: str = Field("W4A16_ASYM", description="compressed-tensors preset: W4A16 (symmetric) or W4A16_ASYM "
                                                  "(with zero points)")
    group_size: int = Field(64, ge=1, description="weights per scale; must divide every quantized Linear's input "
                                                  "width (checked before loading weights)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"],
                              description="Linear layers left unquantized: exact names or `re:<regex>`")
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="calibrate and save in this dtype "
                                                  "(vLLM's 4-bit kernels run in fp16 or bf16)")
    # AWQ is slow on a CPU (a build's seconds: its run record, artifacts/runs/build@R.json)
    calibration_samples: int = Field(8, ge=1, description="calibration windows on a CPU host")
    gpu_calibration_samples: int = Field(64, ge=1, description="calibration windows on a CUDA host")
    calibration_seq_len: int = Field(512, ge=16, description="tokens per calibration window")
    n_grid: int = Field(20, ge=3, description="AWQ's scale search grid (llm-compressor divides by n_grid - 2)")
    duo_scaling: bool = Field(True, description="AWQ scales from activations and weights together")
    max_reload_logit_diff: float = Field(0.01, ge=0, description="largest |logit| difference allowed between the "
                                         "calibrated model and the directory reloaded from disk")
    kv_cache: Literal["auto", "fp8"] = Field("auto", description="the KV cache vLLM serves the checkpoint with "
                                             "(its kv_cache_dtype): auto = the model's dtype; fp8 = e4m3 with scale "
                                             "1.0, since the checkpoint carries no calibrated KV scales")
    schemes: dict[str, str] = Field(default_factory=dict, description="per-module schemes (compressed-tensors "
                                    "config groups): a regular expression matched from the start of each Linear's "
                                    f"name -> {', '.join(MODULE_SCHEMES)} or {UNQUANTIZED}; the first match wins, an "
                                    "unmatched Linear takes scheme/group_size; the modules vLLM fuses (q/k/v, "
                                    "gate/up) must resolve to one scheme")
    search: SearchSpec | None = Field(None, description="choose `schemes` from the sensitivity stage's measurement "
                                      "under a budget (docs/sensitivity.md)")

    @model_validator(mode="after")
    def _schemes_or_search(self) -> "Recipe":
        self.schemes = checked_patterns(self.schemes, (*MODULE_SCHEMES, UNQUANTIZED), "schemes")
        check_search_keys(self.search, self.schemes, "schemes", SEARCH_TYPES)
        return self

    @field_validator("scheme", mode="before")
    @classmethod
    def _known_scheme(cls, value: Any) -> Any:
        if not isinstance(value, str) or value.upper() not in SCHEMES:
            raise ValueError(f"unknown scheme {value!r}; this format builds the 4-bit weight-only "
                             f"schemes {', '.join(SCHEMES)} (llm-compressor's other presets, such as "
                             "FP8 or W8A8, are other formats)")
        return value.upper()


INFO = FormatInfo(
    name="awq",
    distribution="llmcompressor",
    extra="awq",
    library_name="transformers",
    tags=("compressed-tensors", "awq", "vllm"),
    calibrates=True,
    # llm-compressor: the model, its compressed state while saving, the reload check (4.4-6.3 B/param measured)
    build_memory=Factors(1.6 * GIB, 2.4, 8.0),
    # transformers decompresses compressed-tensors into the checkpoint dtype
    gate_memory=Factors(1.35 * GIB, 1.05, 12.0),
    gate_maps_artifact=False,
    gpu_runtime="vllm",
)

# calibration runs on the GPU where there is one, with gpu_calibration_samples
host_build_knobs = calibration_host_knobs


def build_unavailable_reason() -> str | None:
    return missing_distribution(INFO)


# ---------------------------------------------------------------- checks before calibrating


def is_ignored(name: str, ignore: list[str]) -> bool:
    """llm-compressor's matching: `re:<regex>` matched from the start, else the exact name."""
    return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def check_group_size(widths: dict[str, int], group_size: int, ignore: list[str], where: str) -> None:
    quantized = {name: width for name, width in widths.items() if not is_ignored(name, ignore)}
    bad = {name: width for name, width in quantized.items() if width % group_size}
    if not bad:
        return
    common = math.gcd(*quantized.values())
    valid = [g for g in KERNEL_GROUP_SIZES if common % g == 0]
    name, width = next(iter(bad.items()))
    raise RecipeNotApplicable(
        f"group_size {group_size} does not divide the input width {width} of layer {name} "
        f"({len(bad)} of {len(quantized)} quantized layers)",
        where=where,
        fix=(f"use a group size that divides every width: {', '.join(map(str, valid))}" if valid
             else f"no kernel group size ({', '.join(map(str, KERNEL_GROUP_SIZES))}) divides every "
                  f"width (their gcd is {common}); add the layers to `ignore`"),
    )


def check_awq_mapping(model, where: str) -> dict[str, Any]:
    """Name the AWQ mapping llm-compressor will use, or refuse an architecture it has none for
    (names and classes only: the meta-device model will do)."""
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import AWQ_DYNAMIC_MAPPING_REGISTRY
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    architecture = type(model).__name__
    if architecture in AWQ_MAPPING_REGISTRY or architecture in AWQ_DYNAMIC_MAPPING_REGISTRY:
        return {"architecture": architecture, "mapping": "llm-compressor registry"}
    # llm-compressor falls back to Llama-style default mappings; they must match this model
    smooth_layers = [m.smooth_layer for m in default_mappings]
    if not any(True for _ in match_named_modules(model, smooth_layers)):
        raise RecipeNotApplicable(
            f"llm-compressor has no AWQ mapping for architecture {architecture}, and its default "
            "(Llama-style) mapping matches none of its layers, so AWQ cannot run",
            where=where,
            fix="use `algorithm: rtn` (round-to-nearest, no calibration) for this model",
        )
    return {"architecture": architecture, "mapping": "llm-compressor default (Llama-style)"}


# ---------------------------------------------------------------- build


@contextlib.contextmanager
def cpu_pinning_disabled() -> Iterator[bool]:
    """llm-compressor 0.14's AWQ pins its cached activations before the grid search
    (`IntermediatesCache.pin_memory`; upstream's state: CHANGELOG.md), and `Tensor.pin_memory()`
    raises "Cannot access accelerator device when none is available" on a host without one.
    Pinning only speeds up host-to-device copies, so with no accelerator it is skipped; with
    one, nothing is changed. Yields whether the workaround is active."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield True
    finally:
        IntermediatesCache._pin_intermediate = original


@contextlib.contextmanager
def captured_llmcompressor_warnings() -> Iterator[list[str]]:
    """Collect llm-compressor's WARNING-level log lines (loguru) for build.json."""
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING",
                      filter=lambda record: record["name"].startswith("llmcompressor"))
    try:
        yield messages
    finally:
        logger.remove(sink)


def weight_args(recipe: Recipe, module_scheme: str | None = None):
    """compressed-tensors' QuantizationArgs of the recipe's scheme, or of one of MODULE_SCHEMES."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if module_scheme is None:
        return preset_name_to_scheme(recipe.scheme, ["Linear"]).weights.model_copy(
            update={"group_size": recipe.group_size})
    return module_weight_args(module_scheme)


def module_weight_args(module_scheme: str):
    """compressed-tensors' QuantizationArgs of one of MODULE_SCHEMES."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    preset, group_size = MODULE_SCHEMES[module_scheme]
    return preset_name_to_scheme(preset, ["Linear"]).weights.model_copy(update={"group_size": group_size})


def config_groups(recipe: Recipe, names) -> tuple[dict, list[str]]:
    """(config groups, ignore): the recipe's scheme on every Linear, and each module `schemes`
    gives another one in a group of its exact names (compressed-tensors matches an exact name
    before a class name); modules kept unquantized join `ignore`, which wins over any target."""
    from compressed_tensors.quantization import QuantizationScheme

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weight_args(recipe))}
    ignore = list(recipe.ignore)
    by_scheme: dict[str, list[str]] = {}
    for name, module_scheme in first_match(recipe.schemes, names).items():
        by_scheme.setdefault(module_scheme, []).append(name)
    for index, (module_scheme, targets) in enumerate(sorted(by_scheme.items()), start=1):
        if module_scheme == UNQUANTIZED:
            ignore += targets
        else:
            groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=weight_args(recipe, module_scheme))
    return groups, ignore


def check_module_schemes(recipe: Recipe, widths: dict[str, int]) -> None:
    """Every quantized Linear's group size divides its input width (RecipeNotApplicable), and the
    Linears vLLM fuses into one (q/k/v, gate/up) resolve to one scheme: vLLM takes the first
    shard's and does not say so (BadInput)."""
    from pipeline.sensitivity import fused_disagreement

    chosen = first_match(recipe.schemes, widths)
    effective = {name: chosen.get(name, f"{recipe.scheme} group {recipe.group_size}") for name in widths
                 if not is_ignored(name, recipe.ignore)}
    for name, scheme in effective.items():
        group_size = MODULE_SCHEMES[scheme][1] if scheme in MODULE_SCHEMES else recipe.group_size
        if scheme != UNQUANTIZED and widths[name] % group_size:
            raise RecipeNotApplicable(f"{scheme} (group {group_size}) does not divide the input width "
                                      f"{widths[name]} of layer {name}", where=recipe.where("schemes"),
                                      fix="give that layer a group size that divides it, or leave it unquantized")
    disagreement = fused_disagreement({name: effective.get(name, UNQUANTIZED) for name in widths})
    if disagreement:
        names, shards = disagreement
        raise BadInput(f"the layers vLLM fuses into one ({', '.join(names)}) resolve to different schemes: "
                       f"{', '.join(shards)}", where=recipe.where("schemes"),
                       fix="give them one scheme: vLLM serves the fused layer with the first shard's")


def modifiers(recipe: Recipe, names) -> list:
    """llm-compressor's modifiers for the recipe, `names` being the model's Linear modules."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups, ignore = config_groups(recipe, names)
    quantize = QuantizationModifier(config_groups=groups, ignore=ignore)
    if recipe.algorithm == "rtn":
        return [quantize]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(n_grid=recipe.n_grid, duo_scaling=recipe.duo_scaling), quantize]


def samples_that_fit(samples: int, used_bytes: float, model_bytes: float, budget_bytes: float) -> int:
    """Estimate how many calibration samples fit, assuming memory beyond the model grows
    linearly with the sample count (AWQ caches every sample's layer inputs)."""
    per_sample = max(used_bytes - model_bytes, 1.0) / samples
    return max(int((budget_bytes - model_bytes) // per_sample), 0)


def build(recipe: Recipe, *, source_dir: Path, calibration_text: Path, out_dir: Path,
          threads: int, log) -> dict[str, Any]:
    """Calibrate, quantize and save into out_dir; reload and compare; return build facts."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.runtimes.transformers import linear_widths, load_causal_lm, meta_model

    tools = tool_versions()
    require_installed(INFO, recipe.where("format"))
    device, samples = calibration_plan(recipe, threads)
    widths = linear_widths(source_dir)
    unmatched = {name: width for name, width in widths.items() if name not in first_match(recipe.schemes, widths)}
    check_group_size(unmatched, recipe.group_size, recipe.ignore, recipe.where("group_size"))
    check_module_schemes(recipe, widths)
    mapping = (check_awq_mapping(meta_model(source_dir), recipe.where("algorithm"))
               if recipe.algorithm == "awq" else None)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = calibration_windows(tokenizer, calibration_text, samples, recipe.calibration_seq_len,
                                  recipe.where("calibration_samples / calibration_seq_len"))
    dtype = getattr(torch, recipe.dtype)
    model = load_causal_lm(source_dir, dtype=dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    timings: dict[str, float] = {}
    started = time.perf_counter()
    log(f"{recipe.algorithm.upper()} {recipe.scheme} group {recipe.group_size} in {recipe.dtype} on {device}"
        + (f": {samples} calibration samples x {recipe.calibration_seq_len} tokens" if mapping else ""))
    with cpu_pinning_disabled() as pinning_skipped, captured_llmcompressor_warnings() as warnings:
        _oneshot(model, recipe, windows if mapping else None, device=device, model_bytes=model_bytes,
                 names=list(widths))
    timings["quantize_s"] = time.perf_counter() - started
    peak_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None

    check_window = torch.tensor([windows[0]])
    with torch.inference_mode():
        calibrated_logits = model(check_window.to(model.device)).logits.float().cpu()
    started = time.perf_counter()
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    timings["save_s"] = time.perf_counter() - started
    del model
    reload_diff = reload_logit_diff(out_dir, check_window, calibrated_logits, dtype)
    if not reload_diff <= recipe.max_reload_logit_diff:
        raise QpipeError(
            f"the saved artifact is not the calibrated model: reloaded logits differ by up to "
            f"{reload_diff:.4g} on a calibration window (limit {recipe.max_reload_logit_diff})",
            where=recipe.where("dtype"), fix="calibrate in the dtype you save; nothing was written to artifacts/",
        )
    log(f"reloaded from disk: logits within {reload_diff:.3g} of the calibrated model")

    quantization = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    skipped = [m for m in warnings if "skipped" in m]
    return {
        "tools": tools,
        "timings_s": timings,
        "device": device,
        "peak_gpu_mb": peak_gpu_mb,
        "dtype": recipe.dtype,
        "calibration": ({"samples": samples, "seq_len": recipe.calibration_seq_len,
                         "tokens": samples * recipe.calibration_seq_len,
                         "text": str(calibration_text)} if mapping else None),
        "awq": ({**mapping, "n_grid": recipe.n_grid, "duo_scaling": recipe.duo_scaling,
                 "skipped_mappings": skipped} if mapping else None),
        "quantization_config": {"quant_method": quantization["quant_method"], "format": quantization["format"],
                                "ignore": quantization.get("ignore")},
        "reload_check": {"max_abs_logit_diff": reload_diff, "limit": recipe.max_reload_logit_diff,
                         "window_tokens": int(check_window.shape[1])},
        "cpu_pin_memory_skipped": pinning_skipped,
        "llmcompressor_warnings": list(dict.fromkeys(warnings)),
        "kv_cache": recipe.kv_cache,
    }


def _oneshot(model, recipe: Recipe, windows: list[list[int]] | None, *, device: str, model_bytes: int,
             names: list[str]) -> None:
    import torch
    from llmcompressor import oneshot

    dataset = None
    if windows is not None:
        from datasets import Dataset

        dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        oneshot(model=model, dataset=dataset, recipe=modifiers(recipe, names),
                num_calibration_samples=len(windows or []) or 1,
                max_seq_length=recipe.calibration_seq_len, shuffle_calibration_samples=False)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        samples = len(windows or [])
        if device == "cuda":
            used = torch.cuda.max_memory_allocated()
            budget = torch.cuda.get_device_properties(0).total_memory
        else:
            import resource

            from pipeline.host import memory_gb

            used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            budget = (memory_gb() or 0) * 1024**3
        fit = samples_that_fit(max(samples, 1), used, model_bytes, budget)
        key = "gpu_calibration_samples" if device == "cuda" else "calibration_samples"
        raise HostLacks(
            f"out of memory calibrating {samples} samples x {recipe.calibration_seq_len} tokens on {device} "
            f"({used / 1e9:.1f} GB used of {budget / 1e9:.1f} GB): {type(exc).__name__}",
            where=recipe.where(key),
            fix=f"about {fit} samples fit (an estimate from the memory used); set {key} to that or fewer",
        ) from None


def reload_logit_diff(out_dir: Path, window, calibrated_logits, dtype) -> float:
    """Largest |logit| difference between the calibrated model and the directory as saved."""
    import torch

    from pipeline.runtimes.transformers import load_causal_lm

    reloaded = load_causal_lm(out_dir, dtype=dtype)
    with torch.inference_mode():
        logits = reloaded(window).logits.float()
    return float((logits - calibrated_logits).abs().max())


def tool_versions() -> dict[str, str | None]:
    from pipeline.host import package_version

    return {package: package_version(package)
            for package in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


# ---------------------------------------------------------------- artifact facts


def artifact_path(build_dir: Path) -> Path:
    """The directory itself: vLLM and transformers load it as it is."""
    return Path(build_dir)


def _tensor_table(build_dir: Path) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bytes) per tensor; a packed weight's `weight_shape` tensor gives its unpacked shape."""
    from pipeline.files import safetensors_table

    return safetensors_table(build_dir, read_in_full=lambda name: name.endswith(".weight_shape"))


_PACKING_TENSORS = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


# ---------------------------------------------------------------- per-tensor search


def search_candidates(group, types: list[str] | None = None) -> list[str]:
    """The search schemes (or those of `types`) whose group size divides every row of a group of
    Linears; llm-compressor quantizes Linears only, so the embedding and output groups have none."""
    from pipeline.sensitivity import types_that_tile

    if group.kind in ("embedding", "output"):
        return []
    return types_that_tile(group, types, SEARCH_TYPES, lambda type_name: MODULE_SCHEMES[type_name][1])


def search_round_trip(weight: np.ndarray, type_name: str, *, threads: int) -> np.ndarray:
    """compressed-tensors' arithmetic on a weight held in SEARCH_DTYPE: per-group min/max (the
    memoryless min-max observer llm-compressor gives weights), its qparams and fake quantization;
    what an `rtn` build stores, and AWQ before its scaling."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module_weight_args(type_name)
    held = torch.from_numpy(weight).to(getattr(torch, SEARCH_DTYPE))
    rows, width = held.shape
    grouped = held.reshape(rows, width // args.group_size, args.group_size)
    scale, zero_point = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
    return fake_quantize(held, scale, zero_point, args).float().numpy()


def search_bytes(group, type_name: str) -> int:
    """A group's bytes as compressed-tensors packs it (pack-quantized): the codes, a scale per
    group in the model's dtype, packed zero points where asymmetric, the logical shape."""
    if type_name == UNQUANTIZED:
        return UNQUANTIZED_BYTES * group.weights()
    args = module_weight_args(type_name)
    total = 0
    for rows, width in group.shapes:
        groups = rows * (width // args.group_size)
        total += rows * width * args.num_bits // 8 + UNQUANTIZED_BYTES * groups + 16
        if not args.symmetric:
            total += math.ceil(rows * args.num_bits / 32) * 4 * (width // args.group_size)
    return total


def resolve_search(recipe: Recipe, sensitivity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe's search solved on the measurement: ({"schemes": one exact-name entry per
    Linear of each group}, what build.json records of the search). Norms stay in the model's dtype."""
    from pipeline import search

    chosen, facts = search.resolve(recipe.search, sensitivity, "awq", other_weight_bytes=UNQUANTIZED_BYTES,
                                   where=recipe.where("search"))
    return {"schemes": search.linear_entries(chosen)}, facts


def bits_per_weight(build_dir: Path) -> float:
    """Stored bits (packed weights, scales, zero points, unquantized tensors) per logical weight."""
    table = _tensor_table(build_dir)
    unpacked = {name.removesuffix(".weight_shape"): shape for name, shape, _ in table
                if name.endswith(".weight_shape")}
    logical = 0
    for name, shape, _ in table:
        if name.endswith(".weight_packed"):
            logical += math.prod(unpacked[name.removesuffix(".weight_packed")])
        elif not name.endswith(_PACKING_TENSORS):
            logical += math.prod(shape)
    return 8 * sum(size for _, _, size in table) / logical


def kv_cache_dtype(build_dir: Path) -> str:
    """The KV cache the build says to serve it with (vLLM's kv_cache_dtype: auto or fp8)."""
    record = Path(build_dir) / "build.json"
    return json.loads(record.read_text()).get("kv_cache", "auto") if record.is_file() else "auto"


def decode_bytes_per_token(build_dir: Path, context_tokens: float) -> dict[str, float]:
    """Every stored tensor once (a separate input embedding reads one row), plus the KV cache at
    the given context length: bf16/fp16, or 1 byte a value in fp8."""
    from pipeline.geometry import Geometry

    table = _tensor_table(build_dir)
    weights = sum(size for _, _, size in table)
    config = json.loads((Path(build_dir) / "config.json").read_text())
    if not config.get("tie_word_embeddings"):
        for name, shape, size in table:
            if name.endswith("embed_tokens.weight"):
                weights -= size - size // shape[0]
    kv_cache = Geometry.from_hf_config(config).kv_cache_bytes(
        context_tokens, bytes_per_value=1 if kv_cache_dtype(build_dir) == "fp8" else 2)
    return {"weights": float(weights), "kv_cache": float(kv_cache), "total": float(weights + kv_cache)}


# ---------------------------------------------------------------- gates


# vLLM fuses these projections into one layer, whose kernel must take the summed output width
# (QKVParallelLinear, MergedColumnParallelLinear)
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@functools.lru_cache(maxsize=4)
def vllm_layers(build_dir: Path) -> dict[str, tuple[int, int]]:
    """Every quantized linear layer as vLLM builds it, name -> [in, out], from the checkpoint's
    config on the meta device (no weights read). Kept per build directory for the process: a
    gate asks for its runtime several times, and a build's output does not change under it."""
    import torch

    from pipeline.runtimes.transformers import meta_model

    ignore = _quantization_config(build_dir).get("ignore") or []
    layers: dict[str, tuple[int, int]] = {}
    for name, module in meta_model(build_dir).named_modules():
        if isinstance(module, torch.nn.Linear) and not is_ignored(name, ignore):
            parent, _, leaf = name.rpartition(".")
            fused = f"{parent}.{VLLM_FUSED.get(leaf, leaf)}" if parent else leaf
            width, outputs = layers.get(fused, (module.in_features, 0))
            layers[fused] = (width, outputs + module.out_features)
    return layers


def _quantization_config(build_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_path(build_dir) / "config.json").read_text()).get("quantization_config") or {}


def vllm_unavailable_reason(build_dir: Path | None) -> str | None:
    """Why vLLM cannot serve this build here: vLLM or a GPU missing, or no kernel of the
    installed vLLM for one of its layer shapes with its scheme and dtype."""
    from pipeline.runtimes import vllm

    reason = vllm.unavailable_reason()
    if reason or build_dir is None:
        return reason
    (group,) = _quantization_config(build_dir)["config_groups"].values()
    weights = group["weights"]
    config = json.loads((artifact_path(build_dir) / "config.json").read_text())
    dtype = vllm.serving_dtype(config.get("dtype") or config.get("torch_dtype"))
    problems = vllm.kernel_problems(vllm_layers(build_dir), bits=weights["num_bits"], group_size=weights["group_size"],
                                    symmetric=weights["symmetric"], dtype=dtype)
    if problems:
        return (f"vLLM {vllm.version()} has no mixed-precision kernel for {len(problems)} layer shape(s) of this "
                f"{'symmetric' if weights['symmetric'] else 'asymmetric'} {weights['num_bits']}-bit group-"
                f"{weights['group_size']} {dtype} checkpoint: {problems[0]}")
    return None


def _runtime(build_dir: Path | None = None):
    """vLLM where it can serve this build, else transformers (accuracy only)."""
    from pipeline.runtimes import transformers as hf
    from pipeline.runtimes import vllm

    return vllm if vllm_unavailable_reason(build_dir) is None else hf


def runtime_name(build_dir: Path | None = None) -> str:
    return _runtime(build_dir).name()


def open_session(build_dir: Path, threads: int, speed: SpeedParams):
    """vLLM's engine where it can serve this build (its accuracy, tasks and speed), else
    transformers (accuracy and tasks), with the build's KV cache (transformers casts keys and
    values as vLLM's fp8 cache stores them); both place the whole model, so `speed` sets nothing here."""
    return _runtime(build_dir).open_session(artifact_path(build_dir), threads=threads,
                                            kv_cache_dtype=kv_cache_dtype(build_dir))


def tokenize(build_dir: Path, text: str) -> list[int]:
    from pipeline.runtimes import transformers as hf

    return hf.tokenize(artifact_path(build_dir), text)


def baseline_speed(source_dir: Path, prompt: list[int], speed: SpeedParams, *, threads: int) -> dict[str, Any]:
    """The unquantized checkpoint served by vLLM with the same prompt and settings."""
    from pipeline.runtimes import vllm

    with vllm.open_session(Path(source_dir), threads=threads) as session:
        measured = session.measure_speed(prompt, speed)
    return {"artifact": "unquantized checkpoint (vLLM)", **measured}


def speed_unavailable_reason(build_dir: Path | None = None) -> str | None:
    return vllm_unavailable_reason(build_dir)


def accuracy_unavailable_reason(build_dir: Path | None = None) -> str | None:
    return _runtime(build_dir).unavailable_reason()
