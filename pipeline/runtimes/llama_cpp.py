"""llama.cpp through llama-cpp-python: logits over token windows, tokenization, speed.

Token ids are always fed as ids: the reference and every gate score the same ids, never
re-tokenized text (llama.cpp's converted tokenizer can split text differently from HF's).

Speed is measured the way llama.cpp's own tools measure it and the way a user of the Python
API sees it, both on the same file and threads:
- prefill and decode tok/s are llama-bench's (the binary llama-cpp-python installs, JSON
  output): pp<prompt> from an empty context and tg<gen> at depth <prompt>, so decode runs at
  the context the roofline assumes, each the mean of `repeats` runs after llama-bench's own
  warm-up, with their standard deviation and samples;
- TTFT and ITL come from one run of llama-cpp-python's per-token loop (``Llama.eval``) after
  `warmup` discarded runs: llama-bench's repeats already give the spread of prefill and
  decode, so repeating the loop would measure the same thing again. ITL is the median gap
  between tokens, its spread their 10th and 90th percentiles. The loop's decode rate is kept
  as ``api_decode_tok_s``: what a user of the API gets (0.96-1.07 of llama-bench's on this
  host, alternated back to back: benchmarks/crosscheck.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pipeline.errors import HostLacks, QpipeError, ToolFailed
from pipeline.runtimes import Session

if TYPE_CHECKING:
    from pipeline.config import SpeedParams


def version() -> str | None:
    from pipeline.host import package_version

    return package_version("llama-cpp-python")


def name() -> str:
    return f"llama.cpp (llama-cpp-python {version()})"


def cache_label(cache_types: dict[str, str]) -> str:
    """What a runtime name adds for a KV cache other than llama.cpp's default f16."""
    return "" if cache_types == F16_CACHE else f", KV cache K {cache_types['k']} V {cache_types['v']}"


def unavailable_reason() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # a missing package or a shared library that fails to load
        return f"llama-cpp-python does not import here ({exc})"
    return None


# llama.cpp offloads min(n_gpu_layers, n_layer + 1) layers (the output layer counts as one), so
# this puts every layer of any model on the GPU
ALL_LAYERS = 999


def supports_gpu_offload() -> bool:
    """llama.cpp's own answer: whether this build of it can put layers on a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_layers(requested: int) -> int:
    """The n_gpu_layers (llama-bench's -ngl) to run with: `requested` (params speed.n_gpu_layers;
    -1 = all) where this build offloads, else 0."""
    if requested == 0 or not supports_gpu_offload():
        return 0
    return ALL_LAYERS if requested < 0 else requested


def offload(path: Path, n_gpu_layers: int) -> dict[str, Any]:
    """Where a model runs with this n_gpu_layers: its offloaded layer count out of all, and the
    device ("cpu", "gpu", or "gpu+cpu" for a partial offload)."""
    metadata = read_header(path).metadata
    layers = int(metadata[f"{metadata['general.architecture']}.block_count"]) + 1  # the blocks and the output layer
    offloaded = min(n_gpu_layers, layers)
    device = "cpu" if offloaded == 0 else "gpu" if offloaded == layers else "gpu+cpu"
    return {"n_gpu_layers": n_gpu_layers, "offloaded_layers": offloaded, "layers": layers, "device": device}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: str
    n_elements: int
    n_bytes: int


@dataclass
class Header:
    metadata: dict[str, Any]  # scalar and string values; arrays are skipped
    tensors: list[TensorInfo]


# GGUF value types -> struct format of one scalar (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_header(path: Path) -> Header:
    """The GGUF key/values and tensor table, without touching tensor data.

    gguf.GGUFReader builds a numpy view of every vocabulary string (about 2 s for a 49k
    vocabulary); this steps over arrays, strings by their lengths without decoding them, and
    reads only what the build and gates need.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF":
            raise QpipeError("not a GGUF file", where=str(path))
        offset = 24

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, at)
            return data[at + 8: at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

        def skip_or_read(kind: int, at: int) -> tuple[Any, int]:
            if kind in _SCALARS:
                fmt = _SCALARS[kind]
                return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)
            if kind == 8:
                return string(at)
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item in _SCALARS:
                return None, at + count * struct.calcsize(_SCALARS[item])
            if item == 8:  # the vocabulary: 49k-262k strings, stepped over by their lengths only
                unpack_length = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    at += 8 + unpack_length(data, at)[0]
                return None, at
            for _ in range(count):
                _, at = skip_or_read(item, at)
            return None, at

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            value, offset = skip_or_read(kind, offset + 4)
            if value is not None:
                metadata[key] = value
        tensors = []
        for _ in range(n_tensors):
            name, offset = string(offset)
            (n_dims,) = struct.unpack_from("<I", data, offset)
            shape = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
            type_id, _data_offset = struct.unpack_from("<IQ", data, offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            quant = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[quant]
            elements = 1
            for dim in shape:
                elements *= dim
            tensors.append(TensorInfo(name, tuple(shape), quant.name, elements, elements // block * block_bytes))
    return Header(metadata, tensors)


def llama_tool(name: str) -> tuple[Path, dict[str, str]]:
    """A llama.cpp tool binary installed by llama-cpp-python, and the environment it needs
    (the binaries carry no RPATH: the package's lib folder goes on the loader path)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise HostLacks("llama-cpp-python is not installed", fix="pip install -e .")
    package = Path(spec.origin).parent
    candidates = [Path(sys.prefix) / "bin" / name, package.parent / "bin" / name, package / "bin" / name]
    for candidate in candidates:
        if candidate.is_file():
            env = dict(os.environ)
            libraries = [candidate.parent.parent / "lib", package / "lib"]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [str(p) for p in libraries if p.is_dir()] + [env.get("LD_LIBRARY_PATH", "")])
            return candidate, env
    raise HostLacks(
        f"llama.cpp tool {name} is not installed",
        fix='reinstall llama-cpp-python with CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON '
            '-DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF" (see `make setup`)',
    )


@contextlib.contextmanager
def native_output_to(path: Path | None = None, streams: tuple[int, ...] = (2,)) -> Iterator[None]:
    """Send what llama.cpp prints from C (model loading, a line per quantized tensor) to a
    file, or discard it, so stage output stays readable."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in streams]
    target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for fd in streams:
            os.dup2(target, fd)
        yield
    finally:
        for fd, copy in zip(streams, saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


# K and V cache types when none are named: llama.cpp's default
F16_CACHE = {"k": "f16", "v": "f16"}


def ggml_type(name: str) -> int:
    """The ggml type id of a KV-cache type name (f16, q8_0, ...): gguf-py's enum carries ggml's ids."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()].value


def round_trip(weight: np.ndarray, type_name: str, *, threads: int = 1,
               importance: np.ndarray | None = None) -> np.ndarray:
    """`weight` ([rows, row width] float32, the layout llama.cpp quantizes a row at a time)
    quantized to a ggml type by ggml's own ggml_quantize_chunk, which llama-quantize calls for
    each tensor (with `importance` as its imatrix row), and dequantized back by gguf-py. Rows
    go to `threads` threads; ctypes releases the GIL while ggml works."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from llama_cpp import llama_cpp as bindings

    ggml = bindings._lib
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    qtype = GGMLQuantizationType[type_name.upper()]
    source = np.ascontiguousarray(weight, dtype=np.float32)
    rows, width = source.shape
    row_bytes = ggml.ggml_row_size(qtype.value, width)
    packed = np.empty((rows, row_bytes), dtype=np.uint8)
    weights_row = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)

    def quantize_rows(first: int, count: int) -> None:
        ggml.ggml_quantize_chunk(qtype.value, source[first:].ctypes.data, packed[first:].ctypes.data, 0, count,
                                 width, None if weights_row is None else weights_row.ctypes.data)

    step = max(1, -(-rows // max(1, threads)))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(lambda first: quantize_rows(first, min(step, rows - first)), range(0, rows, step)))
    return dequantize(packed, qtype).reshape(rows, width)


def row_bytes(type_name: str, width: int) -> int:
    """Bytes of one row of `width` values in a ggml type (ggml_row_size)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    return width // block * block_bytes


def open_model(path: Path, *, n_ctx: int, logits_all: bool, threads: int, n_gpu_layers: int = 0,
               cache_types: dict[str, str] = F16_CACHE):
    """A llama.cpp context as llama.cpp's own tools make one: flash attention on, which is what
    their default `-fa auto` resolves to on the CPU and what a quantized V cache needs. K and V
    are cached in `cache_types` (-ctk / -ctv). llama-cpp-python's own default is off; on this host
    the 512-token prefill is then about 20 % slower, and the KLD of Q8_0 / Q4_K_M moves by 2 % /
    1 % over 8 windows, within their noise."""
    from llama_cpp import Llama

    with native_output_to():
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, 512),
            logits_all=logits_all,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=n_gpu_layers,
            flash_attn=True,
            type_k=ggml_type(cache_types["k"]),
            type_v=ggml_type(cache_types["v"]),
            verbose=False,
        )


def open_session(path: Path, *, threads: int, tokenizer_dir: Path | None = None, n_gpu_layers: int = 0,
                 cache_types: dict[str, str] = F16_CACHE) -> "LlamaCppSession":
    """The GGUF at `path` for a gate: one llama.cpp model with `n_gpu_layers` offloaded and K and
    V cached in `cache_types` (a GGUF carries its tokenizer)."""
    return LlamaCppSession(Path(path), threads=threads, n_gpu_layers=n_gpu_layers, cache_types=cache_types)


class LlamaCppSession(Session):
    """One llama.cpp model and context, opened on the first request, sized to the longest
    request so far: a longer one reopens it once with room for it (a context holds
    n_ctx x vocabulary float32 logits, so it is not made larger than the requests need)."""

    def __init__(self, path: Path, *, threads: int, n_gpu_layers: int, cache_types: dict[str, str] = F16_CACHE):
        self.path, self.threads, self.n_gpu_layers, self.cache_types = path, threads, n_gpu_layers, cache_types
        self.runtime = name() + cache_label(cache_types)
        self.device = offload(path, n_gpu_layers)["device"]
        self._model = None
        self._n_ctx = 0

    def _context(self, tokens: int):
        if self._model is None or tokens > self._n_ctx:
            self.close()
            self._model = open_model(self.path, n_ctx=tokens, logits_all=True, threads=self.threads,
                                     n_gpu_layers=self.n_gpu_layers, cache_types=self.cache_types)
            self._n_ctx = tokens
        return self._model

    def window_logits(self, windows) -> Iterator[np.ndarray]:
        """Each window evaluated from an empty context. A yielded array is overwritten by the
        next window's."""
        model = self._context(max(len(window) for window in windows))
        for window in windows:
            model.reset()
            model.eval([int(t) for t in window])
            yield model.scores[:len(window)]

    def generate(self, prompts, *, max_tokens: int, stop_ids: list[int]) -> Iterator[list[int]]:
        """Temperature 0 (llama.cpp's greedy sampler, no repeat penalty), each prompt from an
        empty context."""
        model = self._context(max(len(prompt) for prompt in prompts) + max_tokens)
        for prompt in prompts:
            model.reset()
            produced: list[int] = []
            for token in model.generate([int(t) for t in prompt], temp=0.0, repeat_penalty=1.0, reset=True):
                produced.append(int(token))
                if token in stop_ids or len(produced) >= max_tokens:
                    break
            yield produced

    def measure_speed(self, prompt: list[int], speed: SpeedParams) -> dict[str, Any]:
        """The scoring context is closed first: llama-bench is llama.cpp's own process and maps
        the file itself, and the latency run needs a context without every position's logits."""
        self.close()
        return measure_speed(self.path, prompt, speed, threads=self.threads, n_gpu_layers=self.n_gpu_layers,
                             cache_types=self.cache_types)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model, self._n_ctx = None, 0


def tokenize(path: Path, text: str) -> list[int]:
    """Token ids of the text under the GGUF's own tokenizer (vocabulary only, no context:
    `Llama(vocab_only=True)` aborts in this llama.cpp, the bare model does not)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with native_output_to():
        model = LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        model.close()


def measure_speed(path: Path, prompt: list[int], speed: SpeedParams, *, threads: int,
                  n_gpu_layers: int = 0, cache_types: dict[str, str] = F16_CACHE) -> dict[str, Any]:
    """Prefill and decode from llama-bench (`speed.repeats` runs), TTFT and ITL from one run of
    the Python API after `speed.warmup` (module docstring), with `n_gpu_layers` offloaded (what
    ``gpu_layers`` makes of `speed.n_gpu_layers`) and K and V cached in `cache_types`; decode
    also at each of `speed.depths`. Batch 1 only: llama-cpp-python serves one sequence at a
    time, so `speed.concurrency` is unused."""
    gen_tokens, repeats = speed.gen_tokens, speed.repeats
    bench = llama_bench(path, prompt_tokens=len(prompt), gen_tokens=gen_tokens, repeats=repeats,
                        threads=threads, n_gpu_layers=n_gpu_layers, cache_types=cache_types, depths=speed.depths)
    api = api_latency(path, prompt, gen_tokens=gen_tokens, warmup=speed.warmup, threads=threads,
                      n_gpu_layers=n_gpu_layers, cache_types=cache_types)
    return {
        **offload(path, n_gpu_layers),
        # llama-bench's own record of where it ran
        "backends": bench["decode"].get("backends"),
        "gpu_info": bench["decode"].get("gpu_info") or None,
        "prefill_tok_s": bench["prefill"]["avg_ts"],
        "decode_tok_s": bench["decode"]["avg_ts"],
        "ttft_ms": api["ttft_ms"],
        "itl_ms": api["itl_ms"],
        "api_decode_tok_s": api["decode_tok_s"],
        "spread": {
            "prefill_tok_s": {"stdev": bench["prefill"]["stddev_ts"], "samples": bench["prefill"]["samples_ts"]},
            "decode_tok_s": {"stdev": bench["decode"]["stddev_ts"], "samples": bench["decode"]["samples_ts"]},
            "itl_ms": {"p10": api["itl_p10_ms"], "p90": api["itl_p90_ms"]},
        },
        "timing_source": (f"llama-bench {bench['build']}: pp{len(prompt)} and tg{gen_tokens} at depth {len(prompt)}, "
                          f"-r {repeats} -t {threads} -ngl {n_gpu_layers} -fa on -ctk {cache_types['k']} "
                          f"-ctv {cache_types['v']}; TTFT and ITL: llama-cpp-python's per-token loop"),
        # llama-bench's repeats, sample by sample
        "runs": [{"prefill_tok_s": p, "decode_tok_s": d}
                 for p, d in zip(bench["prefill"]["samples_ts"], bench["decode"]["samples_ts"])],
        "decode_at_depth": {str(depth): {"decode_tok_s": record["avg_ts"], "stdev": record["stddev_ts"],
                                    "samples": record["samples_ts"]}
                            for depth, record in bench["depths"].items()},
    }


def llama_bench(path: Path, *, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int,
                n_gpu_layers: int = 0, cache_types: dict[str, str] = F16_CACHE,
                depths: list[int] = ()) -> dict[str, Any]:
    """llama-bench's JSON records of pp<prompt_tokens> (depth 0) and tg<gen_tokens> at depth
    <prompt_tokens>, and at each of `depths` (one llama-bench run: -d takes a list):
    {"prefill": record, "decode": record, "depths": {depth: record}, "build": commit}."""
    binary, env = llama_tool("llama-bench")
    common = ["-m", str(path), "-t", str(threads), "-r", str(repeats), "-ngl", str(n_gpu_layers), "-fa", "on",
              "-ctk", cache_types["k"], "-ctv", cache_types["v"], "-o", "json"]
    decode_depths = ",".join(str(depth) for depth in dict.fromkeys([prompt_tokens, *depths]))
    records: dict[str, Any] = {}
    for test, arguments in (("prefill", ["-p", str(prompt_tokens), "-n", "0"]),
                            ("decode", ["-p", "0", "-n", str(gen_tokens), "-d", decode_depths])):
        command = [str(binary), *common, *arguments]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ToolFailed(f"llama-bench exited with {result.returncode} on {path.name}: {tail}",
                             where=" ".join(command), fix="run the command by hand to see its whole output")
        records[test] = {record["n_depth"]: record for record in json.loads(result.stdout)}
    records["prefill"] = records["prefill"][0]
    records["depths"] = {depth: records["decode"][depth] for depth in depths}
    records["decode"] = records["decode"][prompt_tokens]
    records["build"] = records["decode"].get("build_commit")
    return records


def api_latency(path: Path, prompt: list[int], *, gen_tokens: int, warmup: int, threads: int,
                n_gpu_layers: int = 0, cache_types: dict[str, str] = F16_CACHE) -> dict[str, Any]:
    """One batch-1 greedy generation through llama-cpp-python after `warmup` discarded ones:
    prefill the prompt, then decode gen_tokens one at a time. TTFT = prefill + choosing the
    first token; ITL = the median time between later tokens (and its 10th / 90th percentiles)."""
    import llama_cpp

    model = open_model(path, n_ctx=len(prompt) + gen_tokens + 8, logits_all=False,
                       threads=threads, n_gpu_layers=n_gpu_layers, cache_types=cache_types)
    n_vocab = model.n_vocab()
    try:
        for _ in range(warmup + 1):
            model.reset()
            started = time.perf_counter()
            model.eval(prompt)
            token = _greedy(llama_cpp, model, n_vocab)
            stamps = [time.perf_counter()]
            for _ in range(gen_tokens - 1):
                model.eval([token])
                token = _greedy(llama_cpp, model, n_vocab)
                stamps.append(time.perf_counter())
    finally:
        model.close()
    gaps_ms = 1000 * np.diff(stamps)
    return {
        "decode_tok_s": (gen_tokens - 1) / (stamps[-1] - stamps[0]),
        "ttft_ms": 1000 * (stamps[0] - started),
        "itl_ms": float(np.median(gaps_ms)),
        "itl_p10_ms": float(np.percentile(gaps_ms, 10)),
        "itl_p90_ms": float(np.percentile(gaps_ms, 90)),
    }


def _greedy(llama_cpp, model, n_vocab: int) -> int:
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, -1)
    return int(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).argmax())
