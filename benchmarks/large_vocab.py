"""qpipe's own cost per accuracy window as the vocabulary grows, at real models' shapes.

The model's forward pass belongs to the runtime and grows with the model; what qpipe adds per
window is the gate's scoring (pipeline/gates/accuracy.py): reading the window's stored
reference log-probs (float16, [T-1, V]) and the full-vocabulary KLD, NLL, Δp and top-1 over
the runtime's [T, V] logits, a chunk of positions at a time. This prints, per vocabulary of a
real family, the seconds per window, the peak memory the scoring adds (RSS, measured in a
fresh process per shape) and the reference's disk per window. The scratch figure includes
torch's own first-use allocations (its thread pools and buffers).

    python benchmarks/large_vocab.py [--window-tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# (vocabulary, a model with that vocabulary)
SHAPES = ((49152, "SmolLM2-135M"), (128256, "Llama-3.1-8B"), (151936, "Qwen2.5-7B"), (262144, "Gemma-3-4B"))


def measure(vocabulary: int, window_tokens: int, repeats: int) -> dict:
    """Run in a child process: seconds per window and the peak RSS the scoring adds."""
    import resource
    import statistics
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from pipeline import host
    from pipeline.gates import accuracy
    from pipeline.reference import LogProbsReader, LogProbsWriter, POSITIONS_PER_CHUNK

    torch.set_num_threads(host.worker_threads(0))
    generator = torch.Generator().manual_seed(vocabulary)
    tokens = np.random.default_rng(0).integers(0, vocabulary, size=window_tokens)
    with tempfile.TemporaryDirectory(prefix="qpipe-large-vocab-") as scratch:
        path = Path(scratch) / "logprobs.npy"
        # a peaked reference and an artifact near it, made a chunk at a time, so that making them
        # leaves no peak above what the gate holds
        artifact_logits = np.empty((window_tokens, vocabulary), dtype=np.float32)
        reference_log_probs = np.empty((window_tokens - 1, vocabulary), dtype=np.float16)
        nll = np.empty(window_tokens - 1, dtype=np.float32)
        top1 = np.empty(window_tokens - 1, dtype=np.int32)
        for start in range(0, window_tokens, POSITIONS_PER_CHUNK):
            logits = torch.randn((min(POSITIONS_PER_CHUNK, window_tokens - start), vocabulary), generator=generator) * 3
            artifact_logits[start:start + len(logits)] = (logits + 0.1 * torch.randn(logits.shape, generator=generator))
            log_probs = torch.log_softmax(logits, dim=-1)[:window_tokens - 1 - start]
            reference_log_probs[start:start + len(log_probs)] = log_probs.half().numpy()
            nll[start:start + len(log_probs)] = -log_probs[torch.arange(len(log_probs)),
                                                           torch.as_tensor(tokens[start + 1:start + 1 + len(log_probs)])]
            top1[start:start + len(log_probs)] = log_probs.argmax(dim=-1).numpy()
        writer = LogProbsWriter(path, 1)
        writer.write(reference_log_probs)
        writer.close()
        del reference_log_probs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = []
        with LogProbsReader(path) as stored:
            for _ in range(repeats):
                started = time.perf_counter()
                accuracy.window_scores(artifact_logits, tokens, torch.from_numpy(stored.window(0)), nll, top1)
                seconds.append(time.perf_counter() - started)
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(seconds), "added_mb": added / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.window_tokens, args.repeats)))
        return
    from pipeline.reference import log_probs_bytes

    print(f"{'shape':<14} {'vocabulary':>10} {'logits MB':>9} {'gate s/window':>13} {'scratch MB':>10} "
          f"{'reference MB/window':>19}")
    for vocabulary, name in SHAPES:
        child = subprocess.run([sys.executable, __file__, "--child", str(vocabulary),
                                "--window-tokens", str(args.window_tokens), "--repeats", str(args.repeats)],
                               check=True, capture_output=True, text=True)
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:<14} {vocabulary:>10} {args.window_tokens * vocabulary * 4 / 1e6:9.0f} "
              f"{figures['seconds']:13.3f} {figures['added_mb']:10.0f} "
              f"{log_probs_bytes(1, args.window_tokens, vocabulary) / 1e6:19.1f}", flush=True)


if __name__ == "__main__":
    main()
