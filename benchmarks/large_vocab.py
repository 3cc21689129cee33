"""qpipe's own cost per accuracy window as the vocabulary grows (49k, 152k, 256k, 262k).

The model's forward pass belongs to the runtime and grows with the model; what qpipe adds per
window is the reference's log-softmax and top-k (pipeline/reference.py) and the gate's NLL, KLD
and top-1 over the runtime's [window_tokens, vocabulary] logits (pipeline/gates/accuracy.py).
Both work a chunk of positions at a time. This prints, per vocabulary size, the seconds per
window of each and the scratch memory the gate allocates beyond the logits it is handed
(numpy allocations traced by tracemalloc), on random logits of the real shape.

    python benchmarks/large_vocab.py [--window-tokens 512] [--top-k 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from pipeline.gates import accuracy

VOCABULARIES = (49152, 151936, 256000, 262144)


def main() -> None:
    import torch

    from pipeline import host
    from pipeline import reference as reference_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(host.worker_threads(0))
    tokens_per_window = args.window_tokens

    class Logits(torch.nn.Module):
        """Stands in for a model: returns fixed logits, so only qpipe's scoring is timed."""

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, ids):
            return type("Output", (), {"logits": self.logits[None]})

    print(f"{'vocabulary':>10} {'logits MB':>9} {'reference s/window':>18} {'gate s/window':>13} "
          f"{'gate scratch MB':>15}")
    for vocabulary in VOCABULARIES:
        generator = torch.Generator().manual_seed(vocabulary)
        logits = torch.randn(tokens_per_window, vocabulary, generator=generator) * 3
        tokens = torch.randint(0, vocabulary, (1, tokens_per_window), generator=generator).numpy().astype(np.int32)
        reference_seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            nll, topk_ids, topk_logprobs = reference_stage.score_windows(Logits(logits), tokens, args.top_k, "cpu")
            reference_seconds.append(time.perf_counter() - started)
        artifact_logits = (logits + 0.1 * torch.randn(logits.shape, generator=generator)).numpy()
        gate_seconds = []
        for _ in range(args.repeats):
            tracemalloc.start()
            started = time.perf_counter()
            accuracy.window_scores(artifact_logits, tokens[0], topk_ids[0], topk_logprobs[0])
            gate_seconds.append(time.perf_counter() - started)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        print(f"{vocabulary:>10} {artifact_logits.nbytes / 1e6:9.0f} {statistics.median(reference_seconds):18.3f} "
              f"{statistics.median(gate_seconds):13.3f} {peak / 1e6:15.0f}", flush=True)


if __name__ == "__main__":
    main()
