"""What a bf16 (or fp16) reference does to the figures of near-lossless quants.

Scores the workspace's evaluation windows with the unquantized model twice, in fp32 (the
default `reference.dtype`) and in the other dtype, then scores each given GGUF against both
references. Prints each artifact's mean KLD, ppl ratio and top-1 agreement against either,
and the KLD of the low-precision reference itself from the fp32 one: the floor below which a
KLD measured against it means nothing. Reads artifacts/ only; run after `dvc repro`. Both
references' log-probs go to a temp dir, deleted at the end (2 GB each for 40 windows of SmolLM2).

    python benchmarks/reference_dtype.py [--dtype bfloat16] [--windows 40] [--recipes gguf-q8_0 gguf-q6_k]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline import reference as reference_stage
from pipeline.gates import accuracy
from pipeline.runtimes import llama_cpp


def scored_reference(windows: np.ndarray, dtype: str, threads: int, directory: Path
                     ) -> tuple[reference_stage.Reference, float]:
    """A reference of `dtype` as the reference stage makes it, written into `directory`."""
    import torch

    from pipeline.runtimes.transformers import load_causal_lm

    torch.set_num_threads(threads)
    model = load_causal_lm(layout.SOURCE_DIR, dtype=getattr(torch, dtype)).eval()
    started = time.perf_counter()
    directory.mkdir()
    scored = reference_stage.write_scores(directory, model, windows, [], "cpu")
    return scored, time.perf_counter() - started


def full_logits(windows: np.ndarray, dtype: str) -> list[np.ndarray]:
    import torch

    from pipeline.runtimes.transformers import load_causal_lm

    model = load_causal_lm(layout.SOURCE_DIR, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        return [model(torch.as_tensor(w, dtype=torch.long)[None]).logits[0].float().numpy() for w in windows]


def main() -> None:
    from pipeline import host

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--recipes", nargs="+", default=["gguf-q8_0", "gguf-q6_k", "gguf-q4_k_m"])
    args = parser.parse_args()

    stored = reference_stage.load(layout.REFERENCE_DIR)
    windows = stored.tokens[: args.windows]
    threads = host.worker_threads(0)
    with tempfile.TemporaryDirectory(prefix="qpipe-reference-dtype-") as scratch:
        compare(windows, args, threads, Path(scratch))


def compare(windows: np.ndarray, args, threads: int, scratch: Path) -> None:
    references = {}
    for dtype in ("float32", args.dtype):
        references[dtype], seconds = scored_reference(windows, dtype, threads, scratch / dtype)
        print(f"reference {dtype}: ppl {np.exp(references[dtype].nll.mean()):.4f}, scored in {seconds:.1f} s", flush=True)

    low = accuracy.score(full_logits(windows, args.dtype), references["float32"])
    print(f"\n{args.dtype} reference scored against the fp32 one: mean KLD {low['mean_kld']:.6f}, "
          f"ppl ratio {low['ppl_ratio']:.5f}, top-1 {low['top1_agreement']:.4f}")
    print(f"\n{'artifact':<14} {'KLD vs fp32':>11} {'KLD vs ' + args.dtype:>16} {'ppl ratio fp32':>14} "
          f"{'ppl ratio ' + args.dtype:>19} {'top-1 fp32':>10} {'top-1 ' + args.dtype:>15}")
    for recipe in args.recipes:
        path = layout.build_dir(recipe) / "model.gguf"
        if not path.is_file():
            print(f"{recipe:<14} no artifact at {path} (run dvc repro / dvc checkout)")
            continue
        with llama_cpp.open_session(path, threads=threads) as session:
            logits = [np.array(l) for l in session.window_logits(windows)]
        against = {dtype: accuracy.score(iter(logits), ref) for dtype, ref in references.items()}
        fp32, other = against["float32"], against[args.dtype]
        print(f"{recipe:<14} {fp32['mean_kld']:11.6f} {other['mean_kld']:16.6f} {fp32['ppl_ratio']:14.5f} "
              f"{other['ppl_ratio']:19.5f} {fp32['top1_agreement']:10.4f} {other['top1_agreement']:15.4f}", flush=True)


if __name__ == "__main__":
    main()
