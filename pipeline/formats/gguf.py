"""GGUF for llama.cpp: HF checkpoint -> f16/bf16 GGUF -> llama.cpp quantization.

Conversion runs llama.cpp's own ``convert_hf_to_gguf.py`` from the sdist of the installed
llama-cpp-python (``qpipe setup-converter``), quantization calls ``llama_model_quantize`` of
that llama.cpp, and the importance matrix comes from its ``llama-imatrix``: no quant type is
re-implemented here. Why these tools: docs/formats/gguf.md.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.config import RecipeBase, SpeedParams
from pipeline.errors import BadInput, HostLacks, QpipeError, RecipeNotApplicable, ToolFailed
from pipeline.formats.contract import FormatInfo
from pipeline.memory import GIB, Factors
from pipeline.runtimes.llama_cpp import F16_CACHE, llama_tool
from pipeline.search import SearchSpec, check_search_keys, checked_patterns

ARTIFACT_FILE = "model.gguf"
IMATRIX_FILE = "imatrix.gguf"
QUANTIZE_LOG = "quantize.log"

# llama.cpp quantization types (LLAMA_FTYPE_MOSTLY_<TYPE>), as llama-quantize names them.
QUANT_TYPES = (
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_XS", "IQ4_NL",
    "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M",
    "IQ1_S", "TQ2_0", "TQ1_0",
)
# llama-imatrix, run after the converter, maps the whole f16 GGUF (2 bytes a parameter) and
# evaluates the calibration chunks on it
IMATRIX_MEMORY = Factors(0.85 * GIB, 1.1, 0.0)
# llama.cpp refuses these without an importance matrix.
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S")
# ggml types a tensor_types entry may name: what llama-quantize writes (ggml_type names)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS",
                "IQ4_NL", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# what the per-tensor search chooses from (none needs an importance matrix), and the type of
# the unquantized GGUF the quantizer reads, which the search takes as lossless
SEARCH_TYPES = ("IQ4_NL", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
SEARCH_UNQUANTIZED = "F16"
# a sensitivity group's kind (pipeline.sensitivity) -> the GGUF names of its tensors in a block
GROUP_TENSORS = {"attn_qkv": r"attn_(q|k|v|qkv)", "attn_out": "attn_output", "mlp_gate_up": r"ffn_(gate|up)",
                 "mlp_down": "ffn_down"}
# the KV-cache types llama.cpp's tools accept for -ctk / -ctv (common/arg.cpp kv_cache_types)
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


INFO = FormatInfo(
    name="gguf",
    distribution="llama-cpp-python",
    extra=None,
    library_name="gguf",
    tags=("gguf", "llama.cpp"),
    calibrates=False,
    # convert_hf_to_gguf converts one tensor at a time, widening it to float32, and llama-quantize
    # reads the f16 GGUF a tensor at a time: the largest tensor sets the peak (3.79 GB for
    # Llama-3.1-8B's shape at 2 layers and at all 32)
    build_memory=Factors(0.7 * GIB, 0.0, 0.0, per_largest_tensor=6.5),
    # llama.cpp maps the artifact (counted separately) and repacks some types; its logits buffer
    gate_memory=Factors(0.6 * GIB, 0.05, 12.0),
    gate_maps_artifact=True,
)


class Recipe(RecipeBase):
    format: Literal["gguf"]
    type: str = Field(description="llama.cpp quantization type, as llama-quantize names it (Q8_0, Q6_K, Q5_K_M, "
                                  "Q4_K_M, Q4_0, IQ4_XS, ...; case does not matter)")
    outtype: Literal["f16", "bf16"] = Field("f16", description="the unquantized GGUF the converter writes first")
    imatrix: bool = Field(False, description="quantize with an importance matrix that llama-imatrix computes on "
                                             "the calibration text (required by IQ2_*, IQ1_*, Q2_K_S)")
    imatrix_chunks: int = Field(64, ge=1, description="calibration chunks llama-imatrix reads")
    imatrix_ctx: int = Field(512, ge=32, description="tokens per llama-imatrix chunk")
    kv_cache: str = Field(F16_CACHE["k"], description="the KV-cache type llama.cpp serves the file with, for K and V "
                          f"(llama-cli's -ctk / -ctv): {', '.join(KV_CACHE_TYPES)}; a quantized V cache needs "
                          "flash attention, which every GGUF gate runs with")
    kv_cache_v: str | None = Field(None, description="a V-cache type apart from K's (None: kv_cache's)")
    tensor_types: dict[str, str] = Field(default_factory=dict, description="per-tensor types, llama-quantize's "
                                         "--tensor-type: a regular expression searched in each tensor's GGUF name "
                                         "-> a ggml type (q8_0, iq4_nl, q6_k, f16, ...); the first match wins, and "
                                         "the build fails if the file holds another type for a matched tensor")
    search: SearchSpec | None = Field(None, description="choose tensor_types from the sensitivity stage's "
                                      "measurement under a budget (docs/sensitivity.md); the recipe's `type` "
                                      "is then the file's nominal type only")

    def build_memory(self, format_factors):
        return (format_factors, IMATRIX_MEMORY) if self.imatrix else format_factors

    @model_validator(mode="after")
    def _known_type(self) -> "Recipe":
        if self.type.upper() not in QUANT_TYPES:
            raise ValueError(
                f"unknown GGUF type {self.type!r}; valid types: {', '.join(QUANT_TYPES)}"
            )
        self.type = self.type.upper()
        if self.type in NEEDS_IMATRIX and not self.imatrix:
            raise ValueError(f"GGUF type {self.type} needs `imatrix: true`")
        self.tensor_types = checked_patterns(self.tensor_types, TENSOR_TYPES, "tensor_types")
        check_search_keys(self.search, self.tensor_types, "tensor_types", SEARCH_TYPES)
        self.kv_cache = self.kv_cache.lower()
        self.kv_cache_v = self.kv_cache_v.lower() if self.kv_cache_v else None
        for value in (self.kv_cache, self.kv_cache_v or self.kv_cache):
            if value not in KV_CACHE_TYPES:
                raise ValueError(f"unknown KV-cache type {value!r}; llama.cpp's: {', '.join(KV_CACHE_TYPES)}")
        return self

    def cache_types(self) -> dict[str, str]:
        """{"k": K's type, "v": V's}: what build.json records and every gate serves the file with."""
        return {"k": self.kv_cache, "v": self.kv_cache_v or self.kv_cache}

    def weights_dtype(self) -> str:
        return "bfloat16" if self.outtype == "bf16" else "float16"


# ---------------------------------------------------------------- tools


def llama_cpp_version() -> str | None:
    from pipeline.runtimes import llama_cpp as runtime

    return runtime.version()


def converter_dir() -> Path:
    """Where ``qpipe setup-converter`` put llama.cpp's converter for the installed version."""
    override = os.environ.get("QPIPE_LLAMA_CPP_CONVERTER")
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "qpipe" / f"llama.cpp-converter-{llama_cpp_version()}"


def converter_info() -> dict[str, Any]:
    directory = converter_dir()
    script = directory / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise HostLacks(
            "llama.cpp's convert_hf_to_gguf.py is not installed for this llama-cpp-python",
            where=str(directory),
            fix="run `qpipe setup-converter` (or `make setup`)",
        )
    info_file = directory / "converter.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {"path": str(script), **info}


def setup_converter(target: Path | None = None) -> Path:
    """Extract convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist of the
    installed llama-cpp-python version (fetched with pip, so pip's cache applies)."""
    version = llama_cpp_version()
    if version is None:
        raise HostLacks("llama-cpp-python is not installed", fix="pip install -e . (or `make setup`)")
    target = Path(target or converter_dir())
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    from pipeline.files import atomic_dir

    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", download, "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise HostLacks(f"could not download the llama-cpp-python {version} sdist: "
                            f"{result.stderr.strip().splitlines()[-1:]}",
                            fix="check access to the package index and retry")
        sdist = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{version}/"
        vendor = f"{prefix}vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
        with atomic_dir(target) as staging, tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if not member.isfile() or not member.name.startswith(vendor):
                    continue
                relative = member.name[len(vendor):]
                if relative.startswith(wanted):
                    destination = staging / relative
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with archive.extractfile(member) as source:
                        destination.write_bytes(source.read())
            changelog = archive.extractfile(f"{prefix}CHANGELOG.md").read().decode()
            (staging / "converter.json").write_text(json.dumps({
                "llama_cpp_python": version,
                "llama_cpp_commit": _vendored_commit(changelog, version),
                "source": f"llama-cpp-python=={version} sdist, vendor/llama.cpp",
            }, indent=2))
    return target


def _vendored_commit(changelog: str, version: str) -> str | None:
    section = changelog.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    match = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return match.group(1) if match else None


def build_unavailable_reason() -> str | None:
    """llama.cpp must load, and its converter must be installed for this version."""
    from pipeline.runtimes import llama_cpp as runtime

    problem = runtime.unavailable_reason()
    if problem:
        return problem
    try:
        converter_info()
    except HostLacks as missing:
        return f"{missing.what}: {missing.fix}"
    return None


def tools() -> dict[str, str]:
    """The llama.cpp tools a GGUF build runs, for doctor: where each is, or what is missing."""
    found = {}
    try:
        converter = converter_info()
        found["converter"] = f"{converter['path']} (llama.cpp {converter.get('llama_cpp_commit')})"
    except HostLacks as missing:
        found["converter"] = f"missing: {missing.fix}"
    try:
        found["imatrix"] = str(llama_tool("llama-imatrix")[0])
    except HostLacks as missing:
        found["imatrix"] = f"missing: {missing.fix}"
    from pipeline.runtimes import llama_cpp

    found["offload"] = ("yes: the GGUF gates put params speed.n_gpu_layers layers on the GPU (-1 = all)"
                        if llama_cpp.supports_gpu_offload() else
                        "no, this llama.cpp is a CPU build (README: GGUF gates on a GPU)")
    return found


# ---------------------------------------------------------------- build


def build(recipe: Recipe, *, source_dir: Path, calibration_text: Path, out_dir: Path,
          threads: int, log) -> dict[str, Any]:
    """Write model.gguf (and imatrix.gguf when used) into out_dir; return build facts."""
    check_llama_cpp_computes(source_dir, recipe.where("format"))
    check_cache_types(recipe, source_dir)
    timings: dict[str, float] = {}
    converter = converter_info()
    with tempfile.TemporaryDirectory(prefix="qpipe-gguf-") as scratch:
        unquantized = Path(scratch) / f"model-{recipe.outtype}.gguf"
        started = time.perf_counter()
        log(f"converting {source_dir} to {recipe.outtype} GGUF with llama.cpp's converter")
        convert(source_dir, unquantized, recipe.outtype, converter["path"])
        timings["convert_s"] = time.perf_counter() - started

        imatrix = None
        if recipe.imatrix:
            started = time.perf_counter()
            log(f"computing the importance matrix on the calibration text "
                f"({recipe.imatrix_chunks} chunks of {recipe.imatrix_ctx} tokens)")
            imatrix = out_dir / IMATRIX_FILE
            compute_imatrix(unquantized, calibration_text, imatrix, chunks=recipe.imatrix_chunks,
                            ctx=recipe.imatrix_ctx, threads=threads)
            timings["imatrix_s"] = time.perf_counter() - started

        started = time.perf_counter()
        log(f"quantizing to {recipe.type}")
        fallback = quantize(unquantized, out_dir / ARTIFACT_FILE, recipe.type, imatrix=imatrix,
                            threads=threads, log_file=out_dir / QUANTIZE_LOG, tensor_types=recipe.tensor_types)
        timings["quantize_s"] = time.perf_counter() - started
        # the log names the unquantized file's temporary directory: a rebuild must write the same bytes
        quantize_log = out_dir / QUANTIZE_LOG
        quantize_log.write_text(quantize_log.read_text(errors="replace").replace(scratch, "<scratch>"))
        unquantized_bytes = unquantized.stat().st_size

    if recipe.tensor_types:
        fallback["tensor_types_matched"] = check_tensor_types(out_dir / ARTIFACT_FILE, recipe.tensor_types,
                                                              recipe.where("search" if recipe.search else
                                                                           "tensor_types"))
    mix = tensor_type_mix(out_dir / ARTIFACT_FILE)
    from importlib import metadata

    return {
        "tools": {
            "llama_cpp_python": llama_cpp_version(),
            "llama_cpp_commit": converter.get("llama_cpp_commit"),
            "converter": converter.get("source"),
            "gguf": metadata.version("gguf"),
        },
        "timings_s": timings,
        "unquantized_bytes": unquantized_bytes,
        "tensor_types": mix,
        "fallback": fallback,
        "imatrix": {"chunks": recipe.imatrix_chunks, "ctx": recipe.imatrix_ctx,
                    "file": IMATRIX_FILE} if imatrix else None,
        "kv_cache": recipe.cache_types(),
    }


# llama.cpp's Gemma 3 (llama_load_hparams_gemma3): five sliding-window layers, then one global,
# over and over (set_swa_pattern(6)), and RoPE base 10000 on the sliding layers, whatever the
# checkpoint says; the converter writes neither.
GEMMA3_PATTERN = 6
GEMMA3_SLIDING_ROPE_THETA = 10000.0


def check_cache_types(recipe: Recipe, source_dir: Path) -> None:
    """Refuse (RecipeNotApplicable) a quantized KV cache whose blocks do not tile an attention
    head: llama.cpp stores K and V rows of head_dim values in blocks of the cache type and fails
    to create the context otherwise (Phi-3's 96 or Gemma's 256 take 32-blocks; some heads do not)."""
    from pipeline.geometry import Geometry

    head_dim = Geometry.from_hf_config(json.loads((Path(source_dir) / "config.json").read_text())).head_dim
    for part, cache_type in recipe.cache_types().items():
        block = cache_value_block(cache_type)[0]
        if head_dim % block:
            raise RecipeNotApplicable(
                f"a {cache_type} {part.upper()} cache stores blocks of {block} values, which do not tile this "
                f"model's {head_dim}-value attention heads", where=recipe.where("kv_cache"),
                fix="use f16, bf16 or f32 for this model's KV cache")


def cache_value_block(cache_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a llama.cpp KV-cache type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]


def check_llama_cpp_computes(source_dir: Path, where: str) -> None:
    """Refuse (RecipeNotApplicable) a checkpoint that llama.cpp would load but compute
    differently from its config, before converting anything."""
    config_file = Path(source_dir) / "config.json"
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or config
    if text.get("model_type", config.get("model_type")) not in ("gemma3", "gemma3_text"):
        return
    layers = text.get("num_hidden_layers")
    layer_types = text.get("layer_types")
    assumed = ["full_attention" if i % GEMMA3_PATTERN == GEMMA3_PATTERN - 1 else "sliding_attention"
               for i in range(layers or 0)]
    fix = "use an AWQ or ModelOpt recipe for this model"
    if layer_types and layer_types != assumed:
        raise RecipeNotApplicable(
            f"llama.cpp computes Gemma 3 with {GEMMA3_PATTERN - 1} sliding-window layers to 1 global, "
            f"and this checkpoint's layer_types differ (global layers {[i for i, t in enumerate(layer_types) if t == 'full_attention']}, "
            f"llama.cpp would use {[i for i, t in enumerate(assumed) if t == 'full_attention']})",
            where=f"{config_file}: layer_types", fix=fix)
    sliding = (text.get("rope_parameters") or {}).get("sliding_attention") or {}
    theta = sliding.get("rope_theta", text.get("rope_local_base_freq", GEMMA3_SLIDING_ROPE_THETA))
    if float(theta) != GEMMA3_SLIDING_ROPE_THETA or sliding.get("rope_type", "default") != "default":
        raise RecipeNotApplicable(
            f"llama.cpp computes Gemma 3's sliding layers with RoPE base {GEMMA3_SLIDING_ROPE_THETA:g} and no "
            f"scaling; this checkpoint has {sliding or {'rope_local_base_freq': theta}}",
            where=f"{config_file}: rope_parameters.sliding_attention", fix=fix)


def convert(source_dir: Path, outfile: Path, outtype: str, script: str) -> None:
    result = subprocess.run(
        [sys.executable, script, str(source_dir), "--outfile", str(outfile), "--outtype", outtype],
        capture_output=True, text=True,
    )
    if result.returncode == 0 and outfile.is_file():
        return
    output = result.stdout + result.stderr
    # the converter looks its model class up before it reads a tensor: a refusal, not a crash
    unsupported = re.search(r"Model (\S+) is not supported", output)
    if unsupported:
        raise RecipeNotApplicable(
            f"llama.cpp's converter does not support architecture {unsupported.group(1)}",
            where=f"{source_dir}/config.json: architectures",
            fix="use a model llama.cpp supports, or drop the gguf recipes for it",
        )
    check_space(outfile.parent, sum(f.stat().st_size for f in Path(source_dir).glob("*.safetensors")), "conversion")
    tail = "\n".join(output.strip().splitlines()[-15:])
    raise QpipeError(f"convert_hf_to_gguf.py failed (exit {result.returncode}):\n{tail}",
                     where=str(source_dir))


# an importance matrix holds one float per input column of every tensor: a few MB even at 8B
IMATRIX_ROOM_BYTES = 64 * 2**20


def check_space(directory: Path, need_bytes: int, step: str) -> None:
    """After a llama.cpp step failed: say so plainly when the disk it wrote to is full (the
    tools report only an exit code)."""
    import shutil

    from pipeline.errors import HostLacks

    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise HostLacks(f"no space left for the {step}: {free / 1e6:.1f} MB free where it writes, "
                        f"it needs up to {need_bytes / 1e6:.1f} MB", where=str(directory),
                        fix="free disk space there and run again; nothing was left half-written")


def compute_imatrix(model: Path, text: Path, out: Path, *, chunks: int, ctx: int, threads: int) -> None:
    binary, env = llama_tool("llama-imatrix")
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "--no-ppl"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not out.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        if "tokens" in tail and "need" in tail:
            raise BadInput(f"calibration text too short for the importance matrix:\n{tail}",
                           where=str(text), fix="lower imatrix_ctx / imatrix_chunks or use a longer text")
        check_space(out.parent, IMATRIX_ROOM_BYTES, "importance matrix")
        raise QpipeError(f"llama-imatrix failed (exit {result.returncode}):\n{tail}")


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per-tensor importance = in_sum2 / counts, as llama-quantize computes it."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    importance = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name[: -len(".in_sum2")]
        counts = tensors[f"{weight}.counts"].reshape(-1)
        sums = sums.reshape(len(counts), -1)
        safe = np.where(counts > 0, counts, 1.0)[:, None]
        values = np.where(counts[:, None] > 0, sums / safe, 1.0)
        importance[weight] = np.ascontiguousarray(values.reshape(-1), dtype=np.float32)
    return importance


def quantize(source: Path, out: Path, qtype: str, *, imatrix: Path | None, threads: int,
             log_file: Path, tensor_types: dict[str, str] | None = None) -> dict[str, Any]:
    """Quantize with llama.cpp's llama_model_quantize (what llama-quantize calls); with an
    imatrix file, pass its per-tensor importance exactly as llama-quantize does, and
    `tensor_types` as its --tensor-type patterns (tt_overrides)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    keep_alive = []
    if tensor_types:
        from pipeline.runtimes.llama_cpp import ggml_type

        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for slot, (pattern, tensor_type) in zip(overrides, tensor_types.items()):
            pattern_bytes = pattern.encode()
            keep_alive.append(pattern_bytes)
            slot.pattern = pattern_bytes
            slot.type = ggml_type(tensor_type)
        overrides[len(tensor_types)].pattern = None  # NULL-terminated
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep_alive.append(overrides)
    if imatrix is not None:
        entries = load_imatrix(imatrix)
        array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for slot, (name, values) in zip(array, entries.items()):
            name_bytes = name.encode()
            keep_alive.append((name_bytes, values))
            slot.name = name_bytes
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        array[len(entries)].name = None  # NULL-terminated
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(array)
    from pipeline.runtimes.llama_cpp import native_output_to

    with native_output_to(log_file, streams=(1, 2)):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    log = log_file.read_text(errors="replace")
    if code != 0 or not out.is_file():
        check_space(out.parent, source.stat().st_size, f"quantization to {qtype}")
        tail = "\n".join(log.strip().splitlines()[-10:])
        raise QpipeError(f"llama_model_quantize to {qtype} failed with code {code}:\n{tail}", where=str(source))
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", log)
    return {"fallback_tensors": int(fallback.group(1)) if fallback else 0,
            "tensors": int(fallback.group(2)) if fallback else None}


def check_tensor_types(path: Path, tensor_types: dict[str, str], where: str) -> int:
    """Read the types llama.cpp wrote back from the file: every matrix a tensor_types pattern
    matches (the first, as llama-quantize matches) must hold that type. llama.cpp falls back to
    another type where a row does not tile, and has ignored overrides before (#22544); it never
    quantizes a 1-D tensor (norms stay float32), whatever a pattern says. Returns how many
    matrices the patterns matched."""
    from pipeline.runtimes.llama_cpp import read_header

    compiled = [(re.compile(pattern), tensor_type) for pattern, tensor_type in tensor_types.items()]
    matched, differing = 0, []
    for tensor in read_header(path).tensors:
        wanted = next((tensor_type for pattern, tensor_type in compiled if pattern.search(tensor.name)), None)
        if wanted is None or len(tensor.shape) < 2:
            continue
        matched += 1
        if tensor.type.upper() != wanted:
            differing.append(f"{tensor.name} is {tensor.type}, not {wanted}")
    if differing:
        raise ToolFailed(f"llama.cpp did not write the types tensor_types asks for: {'; '.join(differing[:5])}"
                         + (f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""), where=where,
                         fix="choose types whose block size divides these tensors' rows (the search does), or "
                             "check this llama.cpp's quantize log")
    return matched


# ---------------------------------------------------------------- per-tensor search


def search_candidates(group, types: list[str] | None = None) -> list[str]:
    """The search types (or those of `types` the sensitivity stage measures) that a group's
    rows take: llama.cpp quantizes a row in blocks of 32 or 256 values, so a 576-wide row
    takes no K-quant."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from pipeline.sensitivity import types_that_tile

    return types_that_tile(group, types, SEARCH_TYPES, lambda type_name: GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0])


def search_round_trip(weight: np.ndarray, type_name: str, *, threads: int) -> np.ndarray:
    """llama-quantize's arithmetic on a weight: from the f16 the converter writes, through ggml."""
    from pipeline.runtimes.llama_cpp import round_trip

    return round_trip(weight.astype(np.float16).astype(np.float32), type_name, threads=threads)


def search_bytes(group, type_name: str) -> int:
    from pipeline.runtimes.llama_cpp import row_bytes

    return sum(rows * row_bytes(type_name, width) for rows, width in group.shapes)


def group_pattern(group: dict[str, Any]) -> str:
    """The tensor_types pattern of a sensitivity group (its record in sensitivity.json)."""
    if group["kind"] == "embedding":
        return r"^token_embd\.weight$"
    if group["kind"] == "output":
        return r"^output\.weight$"
    return rf"^blk\.{group['layer']}\.{GROUP_TENSORS[group['kind']]}\.weight$"


def resolve_search(recipe: Recipe, sensitivity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe's search solved on the measurement: ({"tensor_types": ...}, what build.json
    records of the search). llama.cpp keeps norms and every weight no group takes in float32."""
    from pipeline import search

    chosen, facts = search.resolve(recipe.search, sensitivity, "gguf", other_weight_bytes=4,
                                   where=recipe.where("search"))
    return {"tensor_types": {group_pattern(group): option.type for group, option in chosen}}, facts



def tensor_type_mix(path: Path) -> dict[str, Any]:
    """How many tensors (and bytes, and weights) of each ggml type the file holds."""
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    from pipeline.runtimes.llama_cpp import read_header

    for tensor in read_header(path).tensors:
        counts[tensor.type] += 1
        nbytes[tensor.type] += tensor.n_bytes
        weights[tensor.type] += tensor.n_elements
    total_bytes = sum(nbytes.values())
    total_weights = sum(weights.values())
    return {
        "tensors": dict(counts.most_common()),
        "bytes": dict(nbytes.most_common()),
        "byte_share": {k: round(v / total_bytes, 4) for k, v in nbytes.most_common()},
        "tensor_bytes": total_bytes,
        "weights": total_weights,
        "bits_per_weight": 8 * total_bytes / total_weights,
    }


# ---------------------------------------------------------------- artifact facts


def artifact_path(build_dir: Path) -> Path:
    return Path(build_dir) / ARTIFACT_FILE


def bits_per_weight(build_dir: Path) -> float:
    return tensor_type_mix(artifact_path(build_dir))["bits_per_weight"]


def decode_bytes_per_token(build_dir: Path, context_tokens: float) -> dict[str, float]:
    """Bytes a decode step must read: every weight tensor once, plus the KV cache at the given
    context length in the cache types it is served with (``geometry.Geometry`` of the header,
    as llama.cpp reads it). With a separate output matrix the token embedding reads a single
    row; with tied embeddings the whole matrix is read for the logits."""
    from pipeline.geometry import Geometry
    from pipeline.runtimes.llama_cpp import read_header

    k_bytes, v_bytes = (block_bytes / block for block, block_bytes in
                        (cache_value_block(cache_type) for cache_type in cache_types(build_dir).values()))

    header = read_header(artifact_path(build_dir))
    tensors = {t.name: t for t in header.tensors}
    weights = sum(t.n_bytes for t in header.tensors)
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embedding = tensors["token_embd.weight"]
        weights -= embedding.n_bytes - embedding.n_bytes // embedding.shape[-1]
    kv_cache = Geometry.from_gguf(header.metadata).kv_cache_bytes(context_tokens, k_bytes, v_bytes)
    return {"weights": float(weights), "kv_cache": float(kv_cache), "total": float(weights + kv_cache)}


# ---------------------------------------------------------------- gates


def runtime_name(build_dir: Path | None = None) -> str:
    from pipeline.runtimes import llama_cpp as runtime

    return runtime.name()


def cache_types(build_dir: Path) -> dict[str, str]:
    """The KV-cache types the build says to serve its file with ({"k": .., "v": ..}); a
    directory with no build record holds a bare GGUF, served with llama.cpp's default."""
    record = Path(build_dir) / "build.json"
    return json.loads(record.read_text()).get("kv_cache") or F16_CACHE if record.is_file() else F16_CACHE


def open_session(build_dir: Path, threads: int, speed: SpeedParams):
    """llama.cpp on the GGUF with the build's KV-cache types, `speed.n_gpu_layers` layers on the
    GPU (-1, the default: all) where this llama.cpp offloads. Its speed is llama-bench's, batch 1
    only: llama-cpp-python serves one sequence at a time, so `speed.concurrency` is unused."""
    from pipeline.runtimes import llama_cpp as runtime

    return runtime.open_session(artifact_path(build_dir), threads=threads, cache_types=cache_types(build_dir),
                                n_gpu_layers=runtime.gpu_layers(speed.n_gpu_layers))


def tokenize(build_dir: Path, text: str) -> list[int]:
    from pipeline.runtimes import llama_cpp as runtime

    return runtime.tokenize(artifact_path(build_dir), text)


def baseline_speed(source_dir: Path, prompt: list[int], speed: SpeedParams, *, threads: int) -> dict[str, Any]:
    """Speed of the unquantized model in this format: the f16 GGUF from the same converter,
    measured on the same runtime with the same prompt, settings and offload as the gates."""
    from pipeline.runtimes import llama_cpp as runtime

    with tempfile.TemporaryDirectory(prefix="qpipe-baseline-") as scratch:
        f16 = Path(scratch) / "model-f16.gguf"
        convert(source_dir, f16, "f16", converter_info()["path"])
        measured = runtime.measure_speed(f16, prompt, speed, threads=threads,
                                         n_gpu_layers=runtime.gpu_layers(speed.n_gpu_layers))
        return {"artifact": "f16 GGUF (llama.cpp converter)", "bytes": f16.stat().st_size, **measured}


def speed_unavailable_reason(build_dir: Path | None = None) -> str | None:
    from pipeline.runtimes import llama_cpp as runtime

    return runtime.unavailable_reason()


# both gates of a GGUF need llama.cpp itself: there is no emulation of GGUF quant types
accuracy_unavailable_reason = speed_unavailable_reason
