"""qpipe's GGUF quantization step vs the raw llama.cpp quantize call on the same f16 file.

qpipe's quantize = pipeline.formats.gguf.quantize (params, log capture, fallback count);
the raw call is llama_model_quantize with llama_model_quantize_default_params(), what
llama-quantize does. Target: ratio <= 1.05. The bookkeeping the build adds afterwards
(tensor-type mix from the header, sha256 of the artifact) is timed and shown separately,
with the ratio including it. Also checks the two outputs are byte-identical.

Run from the project root after `qpipe source` (uses artifacts/source):
    python benchmarks/gguf_build.py [--types Q4_K_M Q8_0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import host, layout
from pipeline.files import sha256_file
from pipeline.formats import gguf
from pipeline.runtimes.llama_cpp import native_output_to


def raw_quantize(source: Path, out: Path, qtype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    with native_output_to(out.with_suffix(".log"), streams=(1, 2)):  # as qpipe's call does
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0


def qpipe_quantize(source: Path, out: Path, qtype: str, threads: int) -> None:
    gguf.quantize(source, out, qtype, imatrix=None, threads=threads, log_file=out.with_suffix(".log"))


def bookkeeping(out: Path) -> float:
    started = time.perf_counter()
    gguf.tensor_type_mix(out)
    sha256_file(out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q8_0"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = host.worker_threads(0)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        f16 = scratch / "model-f16.gguf"
        gguf.convert(layout.SOURCE_DIR, f16, "f16", gguf.converter_info()["path"])
        print(f"{'type':<8} {'raw s':>7} {'qpipe s':>8} {'ratio':>6} {'+bookkeeping s':>15} {'ratio incl.':>11}  identical")
        for qtype in args.types:
            raw_times, qpipe_times, extra_times = [], [], []
            for repeat in range(args.repeats):  # alternate so drift hits both equally
                for label, function, times in (("raw", raw_quantize, raw_times), ("qpipe", qpipe_quantize, qpipe_times)):
                    out = scratch / f"{label}-{qtype}.gguf"
                    out.unlink(missing_ok=True)
                    started = time.perf_counter()
                    function(f16, out, qtype, threads)
                    times.append(time.perf_counter() - started)
                    if label == "qpipe":
                        extra_times.append(bookkeeping(out))
            identical = sha256_file(scratch / f"raw-{qtype}.gguf") == sha256_file(scratch / f"qpipe-{qtype}.gguf")
            raw, ours, extra = (statistics.median(t) for t in (raw_times, qpipe_times, extra_times))
            print(f"{qtype:<8} {raw:7.2f} {ours:8.2f} {ours / raw:6.3f} {extra:15.2f} {(ours + extra) / raw:11.3f}  {identical}")


if __name__ == "__main__":
    main()
