"""qpipe's own cost per accuracy window as the vocabulary grows, at real models' shapes.

The model's forward pass belongs to the runtime and grows with the model; what qpipe adds per
window is the gate's scoring (pipeline/gates/accuracy.py): the reference's logits recomputed
from its output layer (one [T-1, d] x [d, V] matmul) and the full-vocabulary KLD, NLL, Δp and
top-1 over the runtime's [T, V] logits, a chunk of positions at a time. This prints, per
(vocabulary, hidden size) of a real family, the seconds per window, the peak memory the
scoring adds (RSS, measured in a fresh process per shape), and the reference's disk per
window against storing full log-probs as llama-perplexity's base file does (2 bytes/logit).
The scratch figure includes torch's own first-use allocations (its thread pools and buffers).

    python benchmarks/large_vocab.py [--window-tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# (vocabulary, hidden size, a model with that shape)
SHAPES = ((49152, 576, "SmolLM2-135M"), (128256, 4096, "Llama-3.1-8B"), (151936, 3584, "Qwen2.5-7B"),
          (262144, 2560, "Gemma-3-4B"))


def measure(vocabulary: int, hidden_size: int, window_tokens: int, repeats: int) -> dict:
    """Run in a child process: seconds per window and the peak RSS the scoring adds."""
    import resource
    import statistics
    import time

    import numpy as np
    import torch

    from pipeline import host
    from pipeline.gates import accuracy
    from pipeline.reference import OutputLayer

    torch.set_num_threads(host.worker_threads(0))
    generator = torch.Generator().manual_seed(vocabulary)
    layer = OutputLayer(weight=torch.randn(vocabulary, hidden_size, generator=generator).div_(hidden_size ** 0.5),
                        bias=None)
    hidden = torch.randn(window_tokens, hidden_size, generator=generator) * 3
    # filled a chunk at a time, so that making it leaves no peak above what it holds
    artifact_logits = np.empty((window_tokens, vocabulary), dtype=np.float32)
    for start in range(0, window_tokens, 64):
        chunk = layer.logits(hidden[start:start + 64])
        artifact_logits[start:start + 64] = (chunk + 0.1 * torch.randn(chunk.shape, generator=generator)).numpy()
    hidden = hidden[:-1]
    tokens = np.random.default_rng(0).integers(0, vocabulary, size=window_tokens)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        accuracy.window_scores(artifact_logits, tokens, lambda a, b: layer.logits(hidden[a:b]))
        seconds.append(time.perf_counter() - started)
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(seconds), "added_mb": added / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.window_tokens, args.repeats)))
        return
    positions = args.window_tokens - 1
    print(f"{'shape':<14} {'vocabulary':>10} {'hidden':>6} {'logits MB':>9} {'gate s/window':>13} "
          f"{'scratch MB':>10} {'reference MB/window':>19} {'full log-probs MB/window':>24}")
    for vocabulary, hidden_size, name in SHAPES:
        child = subprocess.run([sys.executable, __file__, "--child", str(vocabulary), str(hidden_size),
                                "--window-tokens", str(args.window_tokens), "--repeats", str(args.repeats)],
                               check=True, capture_output=True, text=True)
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:<14} {vocabulary:>10} {hidden_size:>6} {args.window_tokens * vocabulary * 4 / 1e6:9.0f} "
              f"{figures['seconds']:13.3f} {figures['added_mb']:10.0f} {positions * hidden_size * 4 / 1e6:19.1f} "
              f"{positions * (vocabulary + 4) * 2 / 1e6:24.1f}", flush=True)


if __name__ == "__main__":
    main()
