"""FP8, NVFP4 and INT8 for TensorRT-LLM: NVIDIA ModelOpt post-training quantization -> checkpoints.

The build calibrates with ``modelopt.torch.quantization.quantize`` and exports the unified HF
checkpoint (FP8, NVFP4: what TensorRT-LLM's PyTorch backend and vLLM load), or for INT8 the
legacy TensorRT-LLM checkpoint that its engine backend builds from, and fails unless the
exported files, read back by ``runtimes.checkpoint_emulation``, agree with ModelOpt's fake-quant
model. The gates run a unified checkpoint through TensorRT-LLM's PyTorch backend, and an INT8
one through the engine the engine hook builds where TensorRT-LLM 1.2.x (its last release line
with engines) and a CUDA GPU are present; elsewhere accuracy through the emulation and speed
``not_run``. Which export for which family, what the build guards against and why:
docs/formats/modelopt.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.config import RecipeBase, SpeedParams, Strict
from pipeline.corpus import calibration_windows
from pipeline.errors import BadInput, QpipeError, RecipeNotApplicable
from pipeline.formats.contract import (FormatInfo, calibration_host_knobs, calibration_plan, missing_distribution,
                                       require_installed)
from pipeline.memory import GIB, Factors
from pipeline.search import SearchSpec, check_search_keys, checked_patterns

# ModelOpt configs this format builds, exports and emulates -> the quant_algo they export as
CONFIGS = {
    "FP8_DEFAULT_CFG": "FP8",
    "NVFP4_DEFAULT_CFG": "NVFP4",
    "INT8_SMOOTHQUANT_CFG": "W8A8_SQ_PER_CHANNEL",
    "INT8_WEIGHT_ONLY_CFG": "W8A16",
}
# ModelOpt 0.47 configs qpipe does not build, by name prefix, and why
NOT_BUILT = {
    "NVFP4_AWQ": "only NVFP4_DEFAULT_CFG (max calibration) is built; its AWQ variants are not yet",
    "NVFP4_SVDQUANT": "only NVFP4_DEFAULT_CFG is built; SVDQuant adds low-rank branches the emulation does not read",
    "NVFP4_FOUR_OVER_SIX": "only NVFP4_DEFAULT_CFG is built; the other scale rules are not emulated",
    "NVFP4_W4A4_WEIGHT": "only NVFP4_DEFAULT_CFG is built; its weight-scale searches are not yet",
    "NVFP4_MLP": "only NVFP4_DEFAULT_CFG (every Linear) is built; partial NVFP4 presets are not yet",
    "NVFP4_OMLP": "only NVFP4_DEFAULT_CFG (every Linear) is built; partial NVFP4 presets are not yet",
    "NVFP4_EXPERTS": "Mixture-of-experts presets do not apply to the dense models qpipe exports",
    "W4A16_NVFP4": "only NVFP4_DEFAULT_CFG (fp4 weights and activations) is built; weight-only NVFP4 is not yet",
    "W4A8_NVFP4": "only NVFP4_DEFAULT_CFG (fp4 weights and activations) is built; W4A8 NVFP4 is not yet",
    "MXFP": "MX formats need a CUDA GPU (or triton) in ModelOpt 0.47, and the emulation does not read them",
    "MXINT8": "MX formats need a CUDA GPU (or triton) in ModelOpt 0.47, and the emulation does not read them",
    "W4A8_MXFP4": "MX formats need a CUDA GPU (or triton) in ModelOpt 0.47, and the emulation does not read them",
    "MAMBA_MOE": "Mamba/MoE presets do not apply to the Llama-style models qpipe exports",
    "INT4_AWQ": "its W4A16_AWQ export has no emulation here yet (and block 128 does not export on width 576)",
    "W4A8_AWQ": "its W4A8_AWQ export has no emulation here yet (and block 128 does not export on width 576)",
    "INT4_BLOCKWISE": "its int4 blockwise export has no emulation here yet",
    "FP8_PER_CHANNEL": "only FP8_DEFAULT_CFG (per-tensor scales) is emulated; per-channel FP8 is not yet",
    "FP8_2D_BLOCKWISE": "only FP8_DEFAULT_CFG (per-tensor scales) is emulated; blockwise FP8 is not yet",
    "INT8_DEFAULT": "per-channel INT8 without SmoothQuant has no TensorRT-LLM legacy export path here",
}
# configs shipped as the unified HF checkpoint for every model, served by TensorRT-LLM's
# PyTorch backend (no engine); the others ship the legacy checkpoint for its engine backend
UNIFIED_EXPORT_CONFIGS = ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG")
# what loads each config's unified HF checkpoint (TensorRT-LLM's PyTorch backend
# `_torch/modules/linear.py` quant methods, vLLM's `modelopt.py` QUANT_ALGOS)
UNIFIED_RUNTIMES = {
    "FP8_DEFAULT_CFG": "TensorRT-LLM PyTorch backend, vLLM, SGLang",
    "NVFP4_DEFAULT_CFG": "TensorRT-LLM PyTorch backend (Blackwell GPUs), vLLM (modelopt_fp4; weight-only "
                         "through Marlin before Blackwell), SGLang",
    "INT8_WEIGHT_ONLY_CFG": "TensorRT-LLM PyTorch backend (WeightOnlyQuantLinearMethod)",
}
# a unified checkpoint whose Linears differ (`module_formats`, or a search): ModelOpt exports it as
# quant_algo MIXED_PRECISION with each quantized layer's quant_algo under quantized_layers (a
# layer left out is unquantized). TensorRT-LLM's PyTorch backend reads that table (its fused
# qkv_proj / gate_up_proj silently take q_proj's / gate_proj's entry) and vLLM's modelopt_mixed
# does (it raises where a fused layer's shards differ), so fused shards must agree.
MIXED_PRECISION = "MIXED_PRECISION"
MIXED_RUNTIMES = ("TensorRT-LLM PyTorch backend (NVFP4 layers on Blackwell GPUs), vLLM (modelopt_mixed: FP8 and "
                  "NVFP4 layers, compute capability 8.9+)")
# what a `module_formats` entry (and the per-tensor search) may give a decoder layer's Linear:
# the weight and input quantizers of one of these configs, or none
MODULE_FORMATS = {"FP8": "FP8_DEFAULT_CFG", "NVFP4": "NVFP4_DEFAULT_CFG"}
UNQUANTIZED = "UNQUANTIZED"
# what the per-tensor search measures and chooses from (docs/sensitivity.md), beside UNQUANTIZED
SEARCH_TYPES = ("NVFP4", "FP8")
SEARCH_UNQUANTIZED = UNQUANTIZED
# the dtype the search assumes a build exports (Recipe.dtype's default) and the bytes of a value in it
SEARCH_DTYPE, UNQUANTIZED_BYTES = "bfloat16", 2
UNIFIED_NOT_LOADED = {
    "INT8_SMOOTHQUANT_CFG": "neither TensorRT-LLM's PyTorch backend nor vLLM loads a unified INT8 SmoothQuant "
                            "(W8A8_SQ_PER_CHANNEL) checkpoint",
}
# a build that writes the legacy TensorRT-LLM checkpoint (the INT8 recipes) holds more of the
# model's tensors at once than the unified export does
LEGACY_EXPORT_MEMORY = Factors(1.1 * GIB, 1.95, 8.0)
# ModelOpt 0.47 decoder types with a legacy TensorRT-LLM export that the emulation reads
LEGACY_EXPORT_DECODERS = ("llama", "qwen")
KV_CACHE_CONFIGS = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}
# bytes a cached value takes, by the export's kv_cache_quant_algo: NVFP4 stores 4 bits and an e4m3
# scale a 16 values
KV_BYTES_PER_VALUE = {None: 2, "FP8": 1, "NVFP4": 0.5 + 1 / 16}
TRTLLM_DIR = "trtllm_checkpoint"
HF_DIR = "hf_checkpoint"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class EngineKnobs(Strict):
    """trtllm-build settings for the engine@R stage (TensorRT-LLM 1.2.x's legacy engine backend:
    the INT8 recipes; a unified checkpoint needs no engine)."""

    build: Literal["auto", "required", "never"] = Field("auto", description="auto: build where a CUDA GPU and "
                                                        "TensorRT-LLM < 1.3 are present, else not_run; required: "
                                                        "exit 3 where they are not; never: do not build")
    max_batch_size: int = Field(8, ge=1, description="trtllm-build --max_batch_size")
    max_input_len: int = Field(1024, ge=1, description="trtllm-build --max_input_len (TensorRT-LLM 1.2 ignores it "
                               "with padding removal and fused attention: max_seq_len bounds a prompt)")
    max_seq_len: int = Field(2048, ge=2, description="trtllm-build --max_seq_len")
    max_num_tokens: int = Field(8192, ge=1, description="trtllm-build --max_num_tokens")


class Recipe(RecipeBase):
    format: Literal["modelopt"]
    config: str = Field("FP8_DEFAULT_CFG", description="ModelOpt PTQ config (modelopt.torch.quantization.<NAME>): "
                        "FP8_DEFAULT_CFG, NVFP4_DEFAULT_CFG, INT8_SMOOTHQUANT_CFG or INT8_WEIGHT_ONLY_CFG")
    kv_cache: Literal["fp8", "nvfp4", "none"] = Field("none", description="fp8: ModelOpt's FP8_KV_CFG appended to "
                                                      "the config; nvfp4: its NVFP4_KV_CFG (TensorRT-LLM serves it on "
                                                      "Blackwell, with FP8 weights); none: a bf16/fp16 KV cache")
    dtype: Literal["bfloat16", "float16"] = Field("bfloat16", description="the exported dtype: the model "
                                                  "is calibrated in its stored dtype and cast to this one "
                                                  "before export where they differ")
    calibration_samples: int = Field(16, ge=1, description="calibration windows on a CPU host")
    gpu_calibration_samples: int = Field(64, ge=1, description="calibration windows on a CUDA host")
    calibration_seq_len: int = Field(512, ge=16, description="tokens per calibration window")
    crosscheck_windows: int = Field(4, ge=1, description="held-out calibration windows on which the exported "
                                    "files must match ModelOpt's fake-quant model")
    crosscheck_seq_len: int = Field(512, ge=16, description="tokens per cross-check window")
    max_crosscheck_ppl_gap: float = Field(0.05, gt=0, description="largest relative perplexity gap allowed "
                                          "between the exported files (emulated) and the fake-quant model")
    max_crosscheck_layer_error: float = Field(0.01, gt=0, description="largest relative L2 difference allowed "
                                              "between a quantized Linear's output in the exported files "
                                              "(emulated) and in the fake-quant model, on the same input")
    engine: EngineKnobs = Field(default_factory=EngineKnobs, description="the engine@R stage's trtllm-build "
                                "settings (TensorRT-LLM 1.2.x's legacy engine backend: the INT8 recipes)")
    module_formats: dict[str, str] = Field(default_factory=dict, description="per-Linear formats in the unified "
                                           "checkpoint: a regular expression matched from the start of each decoder "
                                           f"layer Linear's name -> {', '.join(MODULE_FORMATS)} or {UNQUANTIZED}; the "
                                           "first match wins, an unmatched Linear takes `config`'s; the Linears "
                                           "TensorRT-LLM and vLLM fuse (q/k/v, gate/up) must resolve to one format; "
                                           f"exported as quant_algo {MIXED_PRECISION}")
    search: SearchSpec | None = Field(None, description="choose `module_formats` from the sensitivity stage's "
                                      "measurement under a budget (docs/sensitivity.md)")

    @field_validator("config")
    @classmethod
    def _known_config(cls, value: str) -> str:
        if value in CONFIGS:
            return value
        why = next((reason for prefix, reason in NOT_BUILT.items() if value.startswith(prefix)), None)
        if why:
            raise ValueError(f"ModelOpt config {value} is not built by qpipe: {why}; use one of {', '.join(CONFIGS)}")
        raise ValueError(f"unknown ModelOpt config {value!r}; use one of {', '.join(CONFIGS)}")

    @model_validator(mode="after")
    def _nvfp4_cache_in_a_unified_checkpoint(self) -> "Recipe":
        if self.kv_cache == "nvfp4" and self.config not in UNIFIED_EXPORT_CONFIGS:
            raise ValueError(f"kv_cache: nvfp4 ships only in the unified checkpoint of {' or '.join(UNIFIED_EXPORT_CONFIGS)}"
                             f"; TensorRT-LLM's checkpoint of {self.config} has no NVFP4 KV cache")
        self.module_formats = checked_patterns(self.module_formats, (*MODULE_FORMATS, UNQUANTIZED), "module_formats")
        check_search_keys(self.search, self.module_formats, "module_formats", SEARCH_TYPES)
        if (self.module_formats or self.search) and self.config not in UNIFIED_EXPORT_CONFIGS:
            raise ValueError(f"module_formats and search ship only in the unified checkpoint of "
                             f"{' or '.join(UNIFIED_EXPORT_CONFIGS)}; {self.config} exports TensorRT-LLM's legacy one")
        return self

    def build_memory(self, format_factors):
        return format_factors if self.config in UNIFIED_EXPORT_CONFIGS else LEGACY_EXPORT_MEMORY


INFO = FormatInfo(
    name="modelopt",
    distribution="nvidia-modelopt",
    extra="modelopt",
    # not "transformers", whose snippet would load the FP8 codes as weights
    library_name="modelopt",
    tags=("modelopt", "tensorrt-llm"),
    calibrates=True,
    # the model in its stored dtype, the unified export's tensors, the cross-check's emulation
    # (FP8, NVFP4; the INT8 recipes' legacy export needs LEGACY_EXPORT_MEMORY)
    build_memory=Factors(1.2 * GIB, 1.4, 8.0),
    # the checkpoint emulation: the stored codes, one layer dequantized at a time
    gate_memory=Factors(0.85 * GIB, 0.6, 12.0),
    gate_maps_artifact=False,
    gpu_runtime="trtllm",
)

# calibration runs on the GPU where there is one, with gpu_calibration_samples
host_build_knobs = calibration_host_knobs


def build_unavailable_reason() -> str | None:
    return missing_distribution(INFO)


def quant_config(recipe: Recipe) -> dict[str, Any]:
    """The config passed to ``mtq.quantize``: the named config, with the KV-cache config's
    quantizers appended (ModelOpt's ``*_KV_CFG`` are partial: alone they would leave INT8
    quantizers on every Linear)."""
    import modelopt.torch.quantization as mtq

    missing = [name for name in (recipe.config, KV_CACHE_CONFIGS.get(recipe.kv_cache)) if name and not hasattr(mtq, name)]
    if missing:
        available = sorted(name for name in dir(mtq) if name.endswith("_CFG"))
        raise BadInput(f"the installed ModelOpt has no config {missing[0]}", where=recipe.where("config"),
                       fix=f"use one of: {', '.join(n for n in available if n in CONFIGS) or ', '.join(available)}")
    config = copy.deepcopy(getattr(mtq, recipe.config))
    if recipe.kv_cache != "none":
        kv = getattr(mtq, KV_CACHE_CONFIGS[recipe.kv_cache])
        config["quant_cfg"] = list(config["quant_cfg"]) + list(kv["quant_cfg"])
    return config


def decoder_type(architecture: str, where: str) -> str:
    """ModelOpt's decoder type for an architecture, or a refusal naming it."""
    from modelopt.torch.export.model_utils import MODEL_NAME_TO_TYPE

    found = next((kind for key, kind in MODEL_NAME_TO_TYPE.items() if key.lower() in architecture.lower()), None)
    if found is None:
        raise RecipeNotApplicable(f"ModelOpt cannot export architecture {architecture}",
                                  where=where, fix="use a GGUF or AWQ recipe for this model")
    return found


def export_plan(recipe: Recipe, architecture: str, where: str) -> dict[str, Any]:
    """Which checkpoint the build writes for this model, which the gates score, decided before any
    weight is loaded. FP8 and NVFP4 ship the unified HF checkpoint, which TensorRT-LLM's PyTorch
    backend loads directly. INT8 ships the legacy TensorRT-LLM checkpoint for the engine backend
    (the PyTorch backend has no INT8 SmoothQuant and no INT8 weight-only path, TensorRT-LLM issue
    #3701), which ModelOpt 0.47 writes only for the decoders in ``LEGACY_EXPORT_DECODERS`` (it
    raises NotImplementedError for Gemma 2/3 and Phi-3); for another decoder INT8 weight-only
    falls back to its unified checkpoint. A config with neither is refused here."""
    decoder = decoder_type(architecture, where)
    unified_only = recipe.config in UNIFIED_EXPORT_CONFIGS
    legacy = decoder in LEGACY_EXPORT_DECODERS and not unified_only
    unified = unified_only or (not legacy and recipe.config in UNIFIED_RUNTIMES)
    if not legacy and not unified:
        raise RecipeNotApplicable(
            f"{recipe.config} cannot ship for {architecture}: ModelOpt writes no TensorRT-LLM checkpoint for "
            f"decoder {decoder!r}, and {UNIFIED_NOT_LOADED[recipe.config]}",
            where=where, fix="drop this recipe for this model, or use trtllm-fp8 / trtllm-int8-wo")
    return {"decoder": decoder, "trtllm": legacy, "hf": unified,
            "scored": TRTLLM_DIR if legacy else HF_DIR}


# ---------------------------------------------------------------- build


def build(recipe: Recipe, *, source_dir: Path, calibration_text: Path, out_dir: Path,
          threads: int, log) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.runtimes.transformers import linear_widths

    tools = tool_versions()
    require_installed(INFO, recipe.where("format"))
    device, samples = calibration_plan(recipe, threads)
    architecture = AutoConfig.from_pretrained(source_dir).architectures[0]
    plan = export_plan(recipe, architecture, f"{source_dir}/config.json: architectures")
    config = quant_config(recipe)
    formats = linear_formats(recipe, linear_widths(source_dir)) if recipe.module_formats else {}
    config["quant_cfg"] = list(config["quant_cfg"]) + module_quant_cfg(formats, CONFIGS[recipe.config])
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    calibration, held_out = split_calibration_text(tokenizer, calibration_text, recipe, samples)
    dtype = getattr(torch, recipe.dtype)
    model = load_calibration_model(source_dir, device)

    timings: dict[str, float] = {}
    log(f"ModelOpt {recipe.config}{' + ' + KV_CACHE_CONFIGS[recipe.kv_cache] if recipe.kv_cache != 'none' else ''} "
        f"on {device}: {samples} calibration samples x {recipe.calibration_seq_len} tokens")
    started = time.perf_counter()
    model = _calibrate(model, config, calibration)
    timings["calibrate_s"] = time.perf_counter() - started
    peak_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
    calibrated_in = str(model.dtype).removeprefix("torch.")
    if model.dtype != dtype:
        model = model.to(dtype)
    model.config.dtype = dtype  # the exporters read the dtype from the config
    fp4_on_cpu = (recipe.config in FP4_CONFIGS or recipe.kv_cache == "nvfp4" or "NVFP4" in formats.values()) \
        and device == "cpu"
    with nvfp4_fake_quant_on_cpu(model) if fp4_on_cpu else contextlib.nullcontext():
        started = time.perf_counter()
        if plan["scored"] == HF_DIR:
            # what export_hf_checkpoint does first: one weight amax (NVFP4: one global amax) for
            # the Linears that share an input; the export's own call then changes nothing
            from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

            requantize_resmooth_fused_llm_layers(model)
        with as_the_runtime_computes(model):
            fake_quant_ppl = windows_ppl(_model_logits(model, held_out), held_out)
        probes = linear_io(model, held_out[0][:LAYER_PROBE_TOKENS])
        timings["fake_quant_eval_s"] = time.perf_counter() - started

        started = time.perf_counter()
        exports = {}
        if plan["trtllm"]:
            from pipeline.runtimes.checkpoint_emulation import SOURCE_CONFIG

            shutil.copy2(Path(source_dir) / "config.json", out_dir / SOURCE_CONFIG)  # the emulation's HF model
            exports["trtllm"] = export_trtllm(model, plan["decoder"], dtype, out_dir / TRTLLM_DIR, source_dir)
        if plan["hf"]:
            exports["hf"] = export_hf(model, dtype, out_dir / HF_DIR, source_dir)
            exports["hf"]["runs_on"] = (MIXED_RUNTIMES if exports["hf"]["quant_algo"] == MIXED_PRECISION
                                        else UNIFIED_RUNTIMES[recipe.config])
            if formats:
                exports["hf"]["linear_formats"] = check_exported_formats(out_dir / HF_DIR, formats,
                                                                         recipe.where("module_formats"))
        timings["export_s"] = time.perf_counter() - started
    del model
    log(f"exported {', '.join(exports)} checkpoint(s); fake-quant ppl {fake_quant_ppl:.4f} on "
        f"{len(held_out)} held-out windows")

    started = time.perf_counter()
    crosscheck = {"windows": len(held_out), "window_tokens": recipe.crosscheck_seq_len,
                  "fake_quant_ppl": fake_quant_ppl, "limit": recipe.max_crosscheck_ppl_gap,
                  "layer_probe_tokens": len(held_out[0][:LAYER_PROBE_TOKENS]),
                  "layer_error_limit": recipe.max_crosscheck_layer_error, "exports": {},
                  "fake_quant": FP4_CPU_FAKE_QUANT if fp4_on_cpu else "ModelOpt's quantizers"}
    for layout, facts in exports.items():
        emulated, errors = emulated_figures(out_dir / facts["dir"], held_out, probes, threads)
        gap = abs(emulated / fake_quant_ppl - 1)
        worst = max(errors, key=errors.get)
        crosscheck["exports"][layout] = {"emulated_ppl": emulated, "gap": gap, "layers": len(errors),
                                         "largest_layer_error": errors[worst], "largest_layer": worst}
        log(f"cross-check {facts['dir']}: emulated ppl {emulated:.4f} vs fake-quant {fake_quant_ppl:.4f} "
            f"({100 * gap:.2f} %, limit {100 * recipe.max_crosscheck_ppl_gap:.2f} %); {len(errors)} quantized "
            f"layers' outputs within {errors[worst]:.2e} (limit {recipe.max_crosscheck_layer_error:g}, {worst})")
        if not errors[worst] <= recipe.max_crosscheck_layer_error:
            raise QpipeError(
                f"the exported {facts['dir']} does not compute what ModelOpt calibrated: layer {worst}'s output "
                f"differs by {errors[worst]:.2e} (relative) from the fake-quant model's on the same input "
                f"(limit {recipe.max_crosscheck_layer_error:g}; {sum(e > recipe.max_crosscheck_layer_error for e in errors.values())} "
                f"of {len(errors)} layers over it)",
                where=recipe.where("max_crosscheck_layer_error"),
                fix="nothing was written to artifacts/; report it with build.json's tool versions")
        if not gap <= recipe.max_crosscheck_ppl_gap:
            raise QpipeError(
                f"the exported {facts['dir']} does not compute what ModelOpt calibrated: emulated ppl "
                f"{emulated:.4f} vs fake-quant {fake_quant_ppl:.4f} on {len(held_out)} held-out windows "
                f"({100 * gap:.2f} % apart, limit {100 * recipe.max_crosscheck_ppl_gap:.2f} %)",
                where=recipe.where("max_crosscheck_ppl_gap"),
                fix="nothing was written to artifacts/; report it with build.json's tool versions")
    timings["crosscheck_s"] = time.perf_counter() - started
    return {
        "tools": tools,
        "timings_s": timings,
        "device": device,
        "peak_gpu_mb": peak_gpu_mb,
        "dtype": recipe.dtype,
        "calibration_dtype": calibrated_in,
        "modelopt": {"config": recipe.config, "kv_cache_config": KV_CACHE_CONFIGS.get(recipe.kv_cache),
                     "decoder_type": plan["decoder"], "architecture": architecture, "scored": plan["scored"]},
        "calibration": {"samples": samples, "seq_len": recipe.calibration_seq_len,
                        "tokens": samples * recipe.calibration_seq_len, "device": device,
                        "text": str(calibration_text)},
        "exports": exports,
        "crosscheck": crosscheck,
    }


def linear_formats(recipe: Recipe, widths: dict[str, int]) -> dict[str, str]:
    """Each decoder layer Linear's format, its `module_formats` entry or else `config`'s, for a
    recipe with module_formats (empty otherwise), checked before any weight is loaded: NVFP4
    only where its blocks of 16 divide the input width (RecipeNotApplicable), and the Linears
    TensorRT-LLM and vLLM fuse resolve to one format (BadInput). ModelOpt keeps the embedding
    and lm_head unquantized whatever a pattern says."""
    from pipeline.runtimes.checkpoint_emulation import NVFP4_BLOCK
    from pipeline.search import first_match
    from pipeline.sensitivity import LAYER_INDEX, fused_disagreement

    if not recipe.module_formats:
        return {}
    layer_linears = [name for name in widths if LAYER_INDEX.search(name)]
    chosen = first_match(recipe.module_formats, layer_linears)
    formats = {name: chosen.get(name, CONFIGS[recipe.config]) for name in layer_linears}
    for name, module_format in formats.items():
        if module_format == "NVFP4" and widths[name] % NVFP4_BLOCK:
            raise RecipeNotApplicable(f"NVFP4's blocks of {NVFP4_BLOCK} do not divide the input width {widths[name]} "
                                      f"of layer {name}", where=recipe.where("module_formats"),
                                      fix="give that layer FP8, or leave it unquantized")
    disagreement = fused_disagreement(formats)
    if disagreement:
        names, shard_formats = disagreement
        raise BadInput(f"the layers TensorRT-LLM and vLLM fuse into one ({', '.join(names)}) resolve to different "
                       f"formats: {', '.join(shard_formats)}", where=recipe.where("module_formats"),
                       fix="give them one format: vLLM refuses such a checkpoint and TensorRT-LLM serves the fused "
                           "layer with the first shard's")
    return formats


def module_quant_cfg(formats: dict[str, str], base_format: str) -> list[dict[str, Any]]:
    """ModelOpt quant_cfg entries that give each Linear whose format is not `base_format` the
    weight and input quantizers of its format's config, or disable them, by exact quantizer
    name. Appended after the config's own entries, they win (ModelOpt applies the list in order)."""
    import modelopt.torch.quantization as mtq

    entries = []
    for name, module_format in formats.items():
        if module_format == base_format:
            continue
        for quantizer in ("weight_quantizer", "input_quantizer"):
            if module_format == UNQUANTIZED:
                entries.append({"quantizer_name": f"{name}.{quantizer}", "enable": False})
                continue
            preset = next(entry for entry in getattr(mtq, MODULE_FORMATS[module_format])["quant_cfg"]
                          if entry["quantizer_name"] == f"*{quantizer}")
            entries.append({"quantizer_name": f"{name}.{quantizer}", "cfg": copy.deepcopy(preset["cfg"])})
    return entries


# a stored weight's safetensors dtype -> the format it is written in (anything else: unquantized)
STORED_FORMATS = {"F8_E4M3": "FP8", "U8": "NVFP4"}


def exported_formats(checkpoint_dir: Path, names) -> dict[str, dict[str, str]]:
    """For each Linear of `names`, the format its weight is stored in and the one the table
    runtimes read declares (hf_quant_config.json: quantized_layers, or the one quant_algo less
    exclude_modules): {name: {"stored": ..., "declared": ...}}."""
    import fnmatch

    from safetensors import safe_open

    stored = {}
    for path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as tensors:
            for key in tensors.keys():
                module, _, suffix = key.rpartition(".")
                if suffix == "weight" and module in names:
                    stored[module] = STORED_FORMATS.get(tensors.get_slice(key).get_dtype(), UNQUANTIZED)
    quant = json.loads((Path(checkpoint_dir) / "hf_quant_config.json").read_text())["quantization"]
    layers = quant.get("quantized_layers") or {}
    excluded = quant.get("exclude_modules") or []

    def declared(name: str) -> str:
        if quant.get("quant_algo") == MIXED_PRECISION:
            return layers.get(name, {}).get("quant_algo", UNQUANTIZED)
        if quant.get("quant_algo") is None or any(fnmatch.fnmatch(name, pattern) for pattern in excluded):
            return UNQUANTIZED
        return quant["quant_algo"]

    return {name: {"stored": stored.get(name, "missing"), "declared": declared(name)} for name in names}


def check_exported_formats(checkpoint_dir: Path, formats: dict[str, str], where: str) -> dict[str, int]:
    """Every Linear is stored, and declared to the runtimes, in the format the recipe gave it;
    ToolFailed (exit 4) naming those that are not. Returns how many Linears took each format."""
    from collections import Counter

    from pipeline.errors import ToolFailed

    written = exported_formats(checkpoint_dir, set(formats))
    differing = [f"{name}: {formats[name]} asked, {facts['stored']} stored, {facts['declared']} declared"
                 for name, facts in written.items() if {facts["stored"], facts["declared"]} != {formats[name]}]
    if differing:
        raise ToolFailed(f"ModelOpt did not export the formats module_formats asks for: {'; '.join(differing[:5])}"
                         + (f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""), where=where,
                         fix="report it with build.json's tool versions")
    return dict(Counter(formats.values()).most_common())


def load_calibration_model(source_dir: Path, device: str):
    """The source model in its stored dtype, as ModelOpt's own hf_ptq loads it: on a CUDA host
    placed by accelerate (``device_map="auto"``: across every GPU, the rest in CPU memory), else
    on the CPU. One copy of the weights, never widened to fp32."""
    from pipeline.runtimes.transformers import load_causal_lm

    if device == "cuda":
        return load_causal_lm(source_dir, dtype="auto", device_map="auto").eval()
    return load_causal_lm(source_dir, dtype="auto").eval()


def split_calibration_text(tokenizer, calibration_text: Path, recipe: Recipe, samples: int):
    """`samples` calibration windows, then `crosscheck_windows` held-out windows after them."""
    where = recipe.where("calibration_samples / calibration_seq_len / crosscheck_windows / crosscheck_seq_len")
    calibration = calibration_windows(tokenizer, calibration_text, samples, recipe.calibration_seq_len, where)
    used = samples * recipe.calibration_seq_len
    rest = calibration_windows(tokenizer, calibration_text, used // recipe.crosscheck_seq_len + 1
                               + recipe.crosscheck_windows, recipe.crosscheck_seq_len, where)
    return calibration, rest[-recipe.crosscheck_windows:]


def _calibrate(model, config: dict[str, Any], windows: list[list[int]]):
    import modelopt.torch.quantization as mtq
    import torch

    def forward_loop(module) -> None:
        with torch.no_grad():
            for window in windows:  # to the device of the first layer (accelerate moves the rest)
                module(torch.tensor([window], device=module.device))

    return mtq.quantize(model, config, forward_loop)


# ModelOpt 0.47 fake-quantizes NVFP4 only on a CUDA GPU (its triton kernel or CUDA extension);
# on a CPU host its quantizers run ModelOpt's own NVFP4 tensor arithmetic, which the export writes
FP4_CONFIGS = ("NVFP4_DEFAULT_CFG",)
CPU_FP4_BACKEND = "qpipe_nvfp4_cpu"
FP4_CPU_FAKE_QUANT = ("ModelOpt's quantizers with its NVFP4QTensor quantize/dequantize on the CPU (its "
                      "NVFP4 fake-quant kernel needs a CUDA GPU)")


def nvfp4_fake_quantize(inputs, quantizer):
    """ModelOpt's NVFP4 quantize-dequantize of `inputs` through its ``NVFP4QTensor`` (fp4 e2m1
    in blocks of 16, fp8 block scales, the quantizer's amax / (6 x 448) as the global scale),
    as a quantizer backend (``register_quant_backend``)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from pipeline.runtimes.checkpoint_emulation import NVFP4_BLOCK

    global_scale = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
    packed, block_scale, global_scale = NVFP4QTensor.quantize(inputs, NVFP4_BLOCK,
                                                              weights_scaling_factor_2=global_scale)
    return packed.dequantize(dtype=inputs.dtype, scale=block_scale, double_scale=global_scale,
                             block_sizes={-1: NVFP4_BLOCK})


@contextlib.contextmanager
def nvfp4_fake_quant_on_cpu(model) -> Iterator[None]:
    """Every enabled fp4 quantizer of the model runs ``nvfp4_fake_quantize`` inside the block."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (register_quant_backend,
                                                                         unregister_quant_backend)

    quantizers = [module for name, module in model.named_modules()
                  if name.endswith("_quantizer") and getattr(module, "num_bits", None) == (2, 1)
                  and getattr(module, "is_enabled", False)]
    register_quant_backend(CPU_FP4_BACKEND, nvfp4_fake_quantize)
    for quantizer in quantizers:
        quantizer.backend = CPU_FP4_BACKEND
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.backend = None
        unregister_quant_backend(CPU_FP4_BACKEND)


@contextlib.contextmanager
def as_the_runtime_computes(model) -> Iterator[None]:
    """Inside the block, the fake-quant model computes as TensorRT-LLM's kernels (and the
    checkpoint emulation) compute on the files the export writes from it, so that the
    cross-check compares like with like and a difference is the files' alone:

    - each quantized Linear: its input fake-quantized from fp32 values, its weight as
      ``export_weight`` stores it, an fp32 product rounded to the model's dtype. ModelOpt's own
      forward rounds the dequantized input and weight to bf16 and multiplies in bf16, whose
      error depends on the CPU's kernels (on the embedded model it moved the fake-quant ppl by
      0.9 % between an AMX and an AVX-512 oneDNN path);
    - each per-tensor FP8 quantizer (a Linear's input, the KV cache's keys and values): e4m3 of
      x / (amax / 448), the scale the export stores, as ``fake_quantize_fp8`` rounds it.
      ModelOpt multiplies by 448 / amax instead, which rounds the other way where x / scale is
      a tie between two e4m3 values: with bf16 inputs and a bf16 amax that is common (3 % of one
      o_proj's inputs on the embedded model).

    One layer's weight is widened at a time; a Linear left unquantized (lm_head) keeps its own
    forward, as the emulation keeps it in bf16."""
    import torch

    from pipeline.runtimes.transformers import FP8_E4M3_MAX, fake_quantize_fp8

    patched = []
    for module in model.modules():
        if is_fp8_per_tensor(module):
            scale = module.amax.float() / FP8_E4M3_MAX
            module.forward = lambda inputs, scale=scale: fake_quantize_fp8(inputs, scale).to(inputs.dtype)
            patched.append(module)
        elif isinstance(module, torch.nn.Linear) and hasattr(module, "weight_quantizer") \
                and (module.weight_quantizer.is_enabled or module.input_quantizer.is_enabled):
            def forward(inputs, *args, module=module, **kwargs):
                bias = module._parameters.get("bias")
                product = torch.nn.functional.linear(module.input_quantizer(inputs.float()), export_weight(module),
                                                     None if bias is None else bias.float())
                return module.output_quantizer(product).to(inputs.dtype)

            module.forward = forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def is_fp8_per_tensor(quantizer) -> bool:
    """An enabled ModelOpt TensorQuantizer of e4m3 with one amax (FP8_DEFAULT_CFG's, FP8_KV_CFG's)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return (isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled
            and quantizer.num_bits == (4, 3) and quantizer.block_sizes is None
            and quantizer.amax is not None and quantizer.amax.numel() == 1)


def export_weight(module):
    """A quantized Linear's weight as the unified export stores it, dequantized to fp32. For
    per-tensor FP8 that is not ModelOpt's fake quantization: ModelOpt 0.47's export
    (``to_quantized_weight``) divides the weight by its 0-dim fp32 scale in the weight's own dtype
    (bf16, since a 0-dim tensor does not promote) before the cast to e4m3, so the codes are
    rounded twice; on the embedded model about 4 % of gate/up codes land one e4m3 step from
    ModelOpt's single rounding. TensorRT-LLM runs the stored codes."""
    weight, quantizer = module._parameters["weight"], module.weight_quantizer
    if is_fp8_per_tensor(quantizer):
        return fp8_export_round_trip(weight, float(quantizer.amax))
    return quantizer(weight.float())


def fp8_export_round_trip(weight, amax: float):
    """`weight` (in its stored dtype) to the e4m3 codes ModelOpt's export writes for a per-tensor
    amax, and back to fp32: scale = amax / 448 as the export computes it (a Python float made
    an fp32 0-dim tensor), codes = e4m3(weight / scale) with the division in the weight's dtype."""
    import torch

    from pipeline.runtimes.transformers import FP8_E4M3_MAX

    scale = torch.tensor(amax / FP8_E4M3_MAX)
    return (weight / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def _model_logits(model, windows: list[list[int]]) -> Iterator[np.ndarray]:
    import torch

    with torch.inference_mode():
        for window in windows:
            yield model(torch.tensor([window], device=model.device)).logits[0].float().cpu().numpy()


def windows_ppl(logits: Iterator[np.ndarray], windows: list[list[int]]) -> float:
    """Perplexity of next-token prediction over the windows, from their [T, V] logits."""
    from pipeline.measure import window_nll

    nll = [window_nll(window_logits, np.asarray(window)) for window_logits, window in zip(logits, windows)]
    return float(math.exp(np.concatenate(nll).mean()))


def emulated_ppl(checkpoint_dir: Path, windows: list[list[int]], threads: int) -> float:
    """Perplexity of the checkpoint as written, through the emulation: the same files, and for a
    TensorRT-LLM checkpoint the same source_config.json beside it, that the gate will read."""
    return emulated_figures(checkpoint_dir, windows, {}, threads)[0]


def emulated_figures(checkpoint_dir: Path, windows: list[list[int]], probes: dict[str, tuple], threads: int):
    """(``emulated_ppl``, {Linear: relative L2 error of its emulated output on its probed input
    against the fake-quant model's output, ``linear_io``}), the emulation loaded once."""
    import torch

    from pipeline.runtimes import checkpoint_emulation

    with checkpoint_emulation.open_session(checkpoint_dir, threads=threads) as session:
        ppl = windows_ppl(session.window_logits(np.asarray(windows)), windows)
        errors = {}
        with torch.inference_mode():
            for name, (inputs, expected) in probes.items():
                emulated = session.model.get_submodule(name)(inputs.to(session.model.device)).float().cpu()
                expected = expected.float()
                errors[name] = float((emulated - expected).norm() / expected.norm().clamp_min(1e-30))
    return ppl, errors


# tokens of the first held-out window on which each quantized Linear's output is compared
LAYER_PROBE_TOKENS = 64


def linear_io(model, window: list[int]) -> dict[str, tuple]:
    """{name: (input, output)} of each quantized Linear, the fake-quant model run on `window`
    inside ``as_the_runtime_computes``: the cross-check runs each emulated Linear on the same
    input. Layer by layer, the two agree to the rounding of the output; over the whole model
    fp8 and fp4 activations amplify any such difference (one code flip is a 6 % step), so the
    perplexity gap alone cannot be held that close. Both stay in the model's dtype (the output
    is already rounded to it): at Llama-3.1-8B's shapes in bf16 the 224 Linears' pairs for 64
    tokens are about 0.34 GB."""
    import torch

    captured: dict[str, tuple] = {}
    hooks = [module.register_forward_hook(
                 lambda module, args, output, name=name: captured.__setitem__(
                     name, (args[0].detach().cpu().clone(), output.detach().cpu().clone())))
             for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_quantizer")
             and (module.weight_quantizer.is_enabled or module.input_quantizer.is_enabled)]
    try:
        with torch.inference_mode(), as_the_runtime_computes(model):
            model(torch.tensor([window], device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def export_trtllm(model, decoder: str, dtype, export_dir: Path, source_dir: Path) -> dict[str, Any]:
    """The legacy TensorRT-LLM checkpoint. ModelOpt writes it itself (TensorRT-LLM need not be
    installed: it only warns that the module is missing)."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta")
    if rope_theta is not None and getattr(model.config, "rope_theta", None) is None:
        model.config.rope_theta = rope_theta
    if rope.get("rope_type", "default") != "default" and not model.config.__dict__.get("rope_scaling"):
        # ModelOpt reads transformers 4's rope_scaling from config.__dict__ (transformers 5 keeps
        # it in rope_parameters); TensorRT-LLM reads the scaling's "type"
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        model.config.__dict__["rope_scaling"] = {**scaling, "type": rope["rope_type"]}
    export_tensorrt_llm_checkpoint(model, decoder, dtype=dtype, export_dir=str(export_dir), inference_tensor_parallel=1)
    written = json.loads((export_dir / "config.json").read_text())
    if rope_theta is not None and written.get("rotary_base") != rope_theta:
        raise QpipeError(f"the TensorRT-LLM checkpoint's rotary_base is {written.get('rotary_base')}, the model's "
                         f"RoPE base is {rope_theta}", where=str(export_dir / "config.json"),
                         fix="report it with build.json's tool versions")
    copy_tokenizer(source_dir, export_dir)
    quant = written["quantization"]
    return {"dir": TRTLLM_DIR, "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
            "exclude_modules": quant.get("exclude_modules"), "rotary_base": written.get("rotary_base"),
            **_dir_facts(export_dir)}


def export_hf(model, dtype, export_dir: Path, source_dir: Path) -> dict[str, Any]:
    """The unified HF checkpoint (hf_quant_config.json) for TensorRT-LLM's PyTorch backend and vLLM."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, dtype=dtype, export_dir=str(export_dir))
    copy_tokenizer(source_dir, export_dir)
    quant = json.loads((export_dir / "hf_quant_config.json").read_text())["quantization"]
    return {"dir": HF_DIR, "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
            "exclude_modules": quant.get("exclude_modules"), **_dir_facts(export_dir)}


def copy_tokenizer(source_dir: Path, export_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file() and not (export_dir / name).exists():
            shutil.copy2(Path(source_dir) / name, export_dir / name)
            copied.append(name)
    return copied


def _dir_facts(directory: Path) -> dict[str, Any]:
    from pipeline.files import artifact_bytes, sha256_artifact

    return {"bytes": artifact_bytes(directory), "sha256": sha256_artifact(directory)}


def tool_versions() -> dict[str, str | None]:
    from pipeline.host import package_version

    return {package: package_version(package) for package in ("nvidia-modelopt", "transformers", "torch")}


# ---------------------------------------------------------------- per-tensor search


def search_candidates(group, types: list[str] | None = None) -> list[str]:
    """The search formats (or those of `types`) a group of decoder-layer Linears takes: NVFP4
    where its blocks of 16 divide every row, FP8 always. ModelOpt keeps the embedding and the
    output layer unquantized, so those groups have none."""
    from pipeline.runtimes.checkpoint_emulation import NVFP4_BLOCK
    from pipeline.sensitivity import types_that_tile

    if group.kind in ("embedding", "output"):
        return []
    return types_that_tile(group, types, SEARCH_TYPES, lambda type_name: NVFP4_BLOCK if type_name == "NVFP4" else 1)


def fake_quantize(values, type_name: str):
    """A max-calibrated quantize-dequantize of a tensor, in fp32, as the runtime computes it on
    what the export stores: FP8 with the per-tensor scale amax / 448 (``fake_quantize_fp8``);
    NVFP4 with the per-tensor scale amax / (6 x 448) and an e4m3 scale per block of 16 along
    the last dimension (ModelOpt's NVFP4QTensor arithmetic)."""
    from pipeline.runtimes.checkpoint_emulation import E2M1_MAX, fake_quantize_nvfp4
    from pipeline.runtimes.transformers import FP8_E4M3_MAX, fake_quantize_fp8

    amax = values.abs().amax().float()
    if type_name == "FP8":
        return fake_quantize_fp8(values, amax / FP8_E4M3_MAX)
    return fake_quantize_nvfp4(values, amax / (E2M1_MAX * FP8_E4M3_MAX))


def search_round_trip(weight: np.ndarray, type_name: str, *, threads: int) -> np.ndarray:
    """A weight, held in SEARCH_DTYPE as the build calibrates it, as the unified export stores it
    (FP8: ``fp8_export_round_trip``'s double rounding; NVFP4: its NVFP4QTensor arithmetic)."""
    import torch

    held = torch.from_numpy(weight).to(getattr(torch, SEARCH_DTYPE))
    if type_name == "FP8":
        return fp8_export_round_trip(held, float(held.abs().amax())).numpy()
    return fake_quantize(held, type_name).float().numpy()


def search_input_round_trip(inputs, type_name: str):
    """A Linear's inputs through its format's input quantizer, calibrated by max on these inputs
    (FP8 and NVFP4 quantize activations too: a weight-only measure would understate them)."""
    return fake_quantize(inputs, type_name).to(inputs.dtype)


def search_bytes(group, type_name: str) -> int:
    """A group's bytes in the unified checkpoint, as ModelOpt exports each Linear: FP8 a byte a
    weight and two fp32 scalars (weight_scale, input_scale); NVFP4 half a byte a weight, an e4m3
    weight_scale a block of 16 and two fp32 scalars (weight_scale_2, input_scale); unquantized
    two bytes a weight."""
    from pipeline.runtimes.checkpoint_emulation import NVFP4_BLOCK

    if type_name == UNQUANTIZED:
        return UNQUANTIZED_BYTES * group.weights()
    if type_name == "FP8":
        return sum(rows * width + 2 * 4 for rows, width in group.shapes)
    return sum(rows * width // 2 + rows * width // NVFP4_BLOCK + 2 * 4 for rows, width in group.shapes)


def resolve_search(recipe: Recipe, sensitivity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe's search solved on the measurement: ({"module_formats": one exact-name entry
    per Linear of each group}, what build.json records of the search). The embedding, lm_head
    and norms stay in the model's dtype."""
    from pipeline import search

    chosen, facts = search.resolve(recipe.search, sensitivity, INFO.name, other_weight_bytes=UNQUANTIZED_BYTES,
                                   where=recipe.where("search"))
    module_formats = search.linear_entries(chosen)
    return {"module_formats": module_formats}, facts


# ---------------------------------------------------------------- artifact facts


def artifact_path(build_dir: Path) -> Path:
    """The checkpoint the gates score and the report sizes: the legacy TensorRT-LLM checkpoint
    (what trtllm-build reads) where ModelOpt wrote one, else the unified HF checkpoint. For FP8
    on Llama- and Qwen-style models the unified checkpoint sits beside the legacy one."""
    legacy = Path(build_dir) / TRTLLM_DIR
    return legacy if legacy.is_dir() or not (Path(build_dir) / HF_DIR).is_dir() else Path(build_dir) / HF_DIR


# scale tensors of both layouts (TensorRT-LLM's *_scaling_factor; the unified checkpoint's)
_SCALE_SUFFIXES = ("scaling_factor", "weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale",
                   "pre_quant_scale")
_EMBEDDINGS = ("transformer.vocab_embedding.weight", "model.embed_tokens.weight")


def bits_per_weight(build_dir: Path) -> float:
    """Stored bits (codes, scales, unquantized tensors) per weight of the scored checkpoint."""
    from pipeline.files import safetensors_table

    table = safetensors_table(artifact_path(build_dir))
    # an NVFP4 weight (the one with a weight_scale_2) packs two fp4 codes a byte
    packed = {name.removesuffix("_scale_2") for name, _, _ in table if name.endswith(".weight_scale_2")}
    weights = sum(math.prod(shape) * (2 if name in packed else 1) for name, shape, _ in table
                  if not name.endswith(_SCALE_SUFFIXES))
    return 8 * sum(size for _, _, size in table) / weights


def decode_bytes_per_token(build_dir: Path, context_tokens: float) -> dict[str, float]:
    """Every stored tensor once except the input embedding (one row), plus the KV cache in its
    stored format (1 byte per value for FP8, else 2)."""
    from pipeline.files import safetensors_table
    from pipeline.geometry import Geometry
    from pipeline.runtimes.checkpoint_emulation import model_config_for

    checkpoint = artifact_path(build_dir)
    table = safetensors_table(checkpoint)
    weights = sum(size for name, shape, size in table if name not in _EMBEDDINGS)
    weights += sum(size // shape[0] for name, shape, size in table if name in _EMBEDDINGS)
    config = json.loads((checkpoint / "config.json").read_text())
    if "quantization" in config:  # TensorRT-LLM's config; the HF config the build kept beside it
        kv_algo, hf_config = config["quantization"].get("kv_cache_quant_algo"), model_config_for(checkpoint)
    else:
        kv_algo = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"].get("kv_cache_quant_algo")
        hf_config = config
    kv_cache = Geometry.from_hf_config(hf_config).kv_cache_bytes(context_tokens,
                                                                 bytes_per_value=KV_BYTES_PER_VALUE[kv_algo])
    return {"weights": float(weights), "kv_cache": float(kv_cache), "total": float(weights + kv_cache)}


# ---------------------------------------------------------------- engine (the engine@R stage)


def build_engine(recipe: Recipe, build_dir: Path, out_dir: Path, log) -> dict[str, Any]:
    """A TensorRT engine of the build's legacy TensorRT-LLM checkpoint (the INT8 recipes), in
    ``out_dir/<sm>-trt<version>/`` with the tokenizer beside it; or ``not_run`` and why (exit 3
    instead with ``engine.build: required``). A unified checkpoint needs no engine: TensorRT-LLM's
    PyTorch backend loads it."""
    from pipeline.errors import HostLacks
    from pipeline.files import artifact_bytes, read_json, verify_artifact
    from pipeline.runtimes import tensorrt_llm

    if recipe.engine.build == "never":
        return {"status": "not_run", "reason": "the recipe says engine.build: never"}
    if recipe.config in UNIFIED_EXPORT_CONFIGS:
        reason = (f"no engine: {recipe.config} ships the unified checkpoint ({HF_DIR}/), which "
                  f"{UNIFIED_RUNTIMES[recipe.config]} load directly")
        if recipe.engine.build == "required":
            raise BadInput(f"an engine was required, but {reason}", where=recipe.where("engine.build"),
                           fix="set engine.build: auto (or never) for this recipe")
        return {"status": "not_run", "reason": reason}
    reason = tensorrt_llm.engine_unavailable_reason()
    if reason:
        if recipe.engine.build == "required":
            raise HostLacks(f"an engine was required, but {reason}", where=recipe.where("engine.build"),
                            fix="set engine.build: auto (the gate then scores the checkpoint through the emulation) "
                                "or run on a CUDA host with `qpipe[trtllm]`")
        return {"status": "not_run", "reason": reason}
    if not (build_dir / "build.json").is_file():
        raise BadInput(f"no build for recipe {build_dir.name}", where=str(build_dir),
                       fix=f"run `qpipe build {build_dir.name}` first")
    build = read_json(build_dir / "build.json")
    if build.get("status") == "refused":
        return {"status": "not_run", "reason": f"the build was refused: {build['reason']}"}
    if "trtllm" not in build["exports"]:
        reason = (f"ModelOpt wrote no TensorRT-LLM checkpoint for {build['modelopt']['architecture']}, so there is "
                  f"nothing for trtllm-build; its unified checkpoint ({HF_DIR}/) runs on "
                  f"{build['exports']['hf']['runs_on']}")
        if recipe.engine.build == "required":
            raise BadInput(f"an engine was required, but {reason}", where=recipe.where("engine.build"),
                           fix="set engine.build: auto for this model")
        return {"status": "not_run", "reason": reason}

    verify_artifact(build_dir, build)
    target = tensorrt_llm.engine_target()
    engine_dir = out_dir / tensorrt_llm.engine_dir_name(target)
    built = _trtllm_build(artifact_path(build_dir), engine_dir, recipe.engine, log)
    copy_tokenizer(artifact_path(build_dir), engine_dir)
    return {"status": "ok", "path": engine_dir.name, **target, **built,
            "knobs": recipe.engine.model_dump(), "bytes": artifact_bytes(engine_dir)}


def _trtllm_build(checkpoint_dir: Path, engine_dir: Path, knobs: EngineKnobs, log) -> dict[str, Any]:
    """trtllm-build on a checkpoint as TensorRT-LLM reads it (a W8A16 one handed over in its
    kernel layout, ``weight_only_int8_checkpoint``)."""
    from pipeline.runtimes import tensorrt_llm

    config = json.loads((checkpoint_dir / "config.json").read_text())
    handover = engine_dir.parent / (engine_dir.name + ".w8a16-input")
    facts: dict[str, Any] = {}
    source = checkpoint_dir
    if (config.get("quantization") or {}).get("quant_algo") == "W8A16":
        import torch

        model_dtype = getattr(torch, config["dtype"])
        layout = tensorrt_llm.weight_only_kernel_layout(model_dtype)
        source, facts = weight_only_int8_checkpoint(checkpoint_dir, handover, layout, model_dtype)
    try:
        built = tensorrt_llm.build_engine(source, engine_dir, max_batch_size=knobs.max_batch_size,
                                          max_input_len=knobs.max_input_len, max_seq_len=knobs.max_seq_len,
                                          max_num_tokens=knobs.max_num_tokens, log=log)
        return {**built, **({"w8a16_handover": facts} if facts else {})}
    finally:
        shutil.rmtree(handover, ignore_errors=True)


def weight_only_int8_checkpoint(checkpoint_dir: Path, out_dir: Path, kernel_layout, model_dtype) -> tuple[Path, dict]:
    """The W8A16 checkpoint as TensorRT-LLM 1.2 loads int8 weights: each ModelOpt [out, in]
    code matrix transposed to [in, out] and put in the kernel layout by TensorRT-LLM's own
    preprocessing (``kernel_layout``), with its scale as ``per_channel_scale`` in the model
    dtype, the dtype the weight-only GEMM takes its scales in (WeightOnlyQuantLinear).

    Float weights would not do: TensorRT-LLM re-quantizes a float W8A16 weight with scale =
    amax / 128 (cutlass_preprocessors.cpp, ``symmetric_quantize``: ``quant_range_scale = 1.f /
    float(1 << (bits_in_type - 1))``, rounding with ``round``, clipping to [-128, 127]), while
    ModelOpt's codes use amax / 127. From code x scale the engine's codes would come back as
    round(c x 128 / 127), about half of them moved by one; and no float input reproduces a
    channel whose amax is a negative weight. An int8 weight it loads as it is
    (convert_utils.py, ``weight_only_quantize_dict`` skips torch.int8). Returns the folder and
    what the handover changed: the scales' rounding to the model dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    largest_rounding, layers = 0.0, 0
    for path in sorted(Path(checkpoint_dir).glob("rank*.safetensors")):
        tensors = load_file(path)
        converted = {}
        for key, tensor in tensors.items():
            if key.endswith(".weights_scaling_factor"):
                continue
            if tensor.dtype != torch.int8:
                converted[key] = tensor
                continue
            prefix = key.removesuffix(".weight")
            scale = tensors[prefix + ".weights_scaling_factor"].reshape(-1).float()
            held = scale.to(model_dtype)
            largest_rounding = max(largest_rounding, float(((held.float() - scale).abs() / scale).max()))
            converted[key] = kernel_layout(tensor.t().contiguous())
            converted[prefix + ".per_channel_scale"] = held
            layers += 1
        save_file(converted, out_dir / path.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=4))
    return out_dir, {"layers": layers, "codes": "the checkpoint's, in TensorRT-LLM's kernel layout",
                     "scale_dtype": str(model_dtype).removeprefix("torch."),
                     "largest_scale_rounding": largest_rounding}


# ---------------------------------------------------------------- gates


def _engine(build_dir: Path | None) -> dict[str, Any] | None:
    """The engine@R stage's record for this build, if it built an engine."""
    from pipeline.engines import read_record

    record = read_record(Path(build_dir).name) if build_dir is not None else None
    return record if record and record.get("status") == "ok" else None


def _unified(build_dir: Path) -> bool:
    return artifact_path(build_dir).name == HF_DIR


def _quant_algos(checkpoint_dir: Path) -> set[str | None]:
    """The unified checkpoint's quant_algo, or each layer's where it is MIXED_PRECISION."""
    quant = json.loads((checkpoint_dir / "hf_quant_config.json").read_text())["quantization"]
    if quant.get("quant_algo") == MIXED_PRECISION:
        return {layer.get("quant_algo") for layer in (quant.get("quantized_layers") or {}).values()}
    return {quant.get("quant_algo")}


def backend_unavailable_reason(build_dir: Path | None) -> str | None:
    """Why TensorRT-LLM cannot serve this build here: its PyTorch backend for a unified checkpoint
    (and a Blackwell GPU for NVFP4), its engine backend and a built engine for a legacy one."""
    from pipeline.engines import read_record
    from pipeline.runtimes import tensorrt_llm

    if build_dir is None or _unified(build_dir):
        reason = tensorrt_llm.unavailable_reason()
        if reason is None and build_dir is not None and "NVFP4" in _quant_algos(artifact_path(build_dir)):
            reason = tensorrt_llm.nvfp4_unavailable_reason()
        return reason
    reason = tensorrt_llm.engine_unavailable_reason()
    if reason:
        return reason
    record = read_record(Path(build_dir).name)
    if record is None:
        return "no engine record: run `qpipe engine <recipe>` (the engine@R stage) first"
    return None if record.get("status") == "ok" else record.get("reason")


def runtime_name(build_dir: Path | None = None) -> str:
    from pipeline.runtimes import checkpoint_emulation, tensorrt_llm

    if backend_unavailable_reason(build_dir) is None:
        return tensorrt_llm.name() if build_dir is None or _unified(build_dir) else tensorrt_llm.engine_name()
    if build_dir is None:
        return checkpoint_emulation.name()
    return checkpoint_emulation.describe(artifact_path(build_dir))


def open_session(build_dir: Path, threads: int, speed: SpeedParams):
    """TensorRT-LLM where it serves this build here (the PyTorch backend on the unified
    checkpoint, else the engine, with the source checkpoint's tokenizer and config), else the
    checkpoint emulation of the files; each places the whole model, so `speed` sets nothing here."""
    from pipeline import layout
    from pipeline.runtimes import checkpoint_emulation, tensorrt_llm

    checkpoint = artifact_path(build_dir)
    if backend_unavailable_reason(build_dir) is not None:
        return checkpoint_emulation.open_session(checkpoint, threads=threads)
    if _unified(build_dir):
        return tensorrt_llm.open_session(checkpoint, threads=threads)
    engine_dir = layout.engine_dir(Path(build_dir).name) / _engine(build_dir)["path"]
    return tensorrt_llm.open_engine_session(engine_dir, threads=threads, tokenizer_dir=layout.SOURCE_DIR)


def tokenize(build_dir: Path, text: str) -> list[int]:
    from pipeline.runtimes import transformers as hf

    return hf.tokenize(artifact_path(build_dir), text)


def baseline_speed(source_dir: Path, prompt: list[int], speed: SpeedParams, *, threads: int) -> dict[str, Any]:
    """The unquantized checkpoint served by TensorRT-LLM's PyTorch backend, which loads it as it
    is, with the same prompt and settings as the quantized ones."""
    from pipeline.runtimes import tensorrt_llm

    with tensorrt_llm.open_session(Path(source_dir), threads=threads) as session:
        measured = session.measure_speed(prompt, speed)
    return {"artifact": "unquantized checkpoint (TensorRT-LLM PyTorch backend)", **measured}


def speed_unavailable_reason(build_dir: Path | None = None) -> str | None:
    return backend_unavailable_reason(build_dir)


def accuracy_unavailable_reason(build_dir: Path | None = None) -> str | None:
    return None  # the emulation runs wherever torch does
