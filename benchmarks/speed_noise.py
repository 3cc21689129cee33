"""How much the speed gate's figures move between repeated measurements of one artifact.

Runs the gate's own speed measurement (same prompt, settings and threads as params.yaml)
--trials times on artifacts/builds/RECIPE and prints each trial's decode/prefill median and
the spread. Use it to set min_decode_speedup / min_roofline_fraction with room for noise.

    python benchmarks/speed_noise.py gguf-q8_0 [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics

from pipeline import formats, host, layout, reference
from pipeline.config import load_params
from pipeline.formats import load_recipe
from pipeline.gates.speed import speed_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    params = load_params().speed
    fmt = formats.module(load_recipe(args.recipe).format)
    prompt = speed_prompt(reference.load(layout.REFERENCE_DIR), params)
    threads = host.worker_threads(params.threads)
    decode, prefill = [], []
    for trial in range(args.trials):
        with fmt.open_session(layout.build_dir(args.recipe), threads, params) as session:
            measured = session.measure_speed(prompt, params)
        decode.append(measured["decode_tok_s"])
        prefill.append(measured["prefill_tok_s"])
        print(f"trial {trial + 1}: decode {measured['decode_tok_s']:6.1f} tok/s  prefill {measured['prefill_tok_s']:6.0f} tok/s")
    for name, values in (("decode", decode), ("prefill", prefill)):
        mean = statistics.mean(values)
        print(f"{name}: min {min(values):.1f}  max {max(values):.1f}  max/min {max(values) / min(values):.2f}  "
              f"cv {statistics.stdev(values) / mean:.1%}")


if __name__ == "__main__":
    main()
