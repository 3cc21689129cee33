"""The baseline stage: the unquantized model's speed in every registered format, for decode_speedup.

Each format measures its unquantized model on the runtime its artifacts' speed gate uses,
with the same prompt and settings (``not_run`` where that runtime is absent here), into
artifacts/baselines/<format>.json. How speedups are computed: docs/methodology.md.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import layout


def run_baselines(speed_params, log=print) -> dict[str, Any]:
    from pipeline import formats, reference
    from pipeline.files import atomic_dir
    from pipeline.gates import speed

    host_info, threads = speed.host_and_threads(speed_params)
    prompt = speed.speed_prompt(reference.load(layout.REFERENCE_DIR), speed_params)
    results = {}
    with atomic_dir(layout.BASELINES_DIR) as staging:
        for name in formats.FORMATS:
            fmt = formats.module(name)
            reason = fmt.speed_unavailable_reason(None)
            if reason:
                result = {"format": name, "status": "not_run", "reason": reason}
            else:
                log(f"baseline {name}: unquantized speed, {len(prompt)}-token prompt, {speed_params.gen_tokens} tokens")
                with speed.HostLock() as held:
                    measured = fmt.baseline_speed(layout.SOURCE_DIR, prompt, gen_tokens=speed_params.gen_tokens,
                                                  repeats=speed_params.repeats, warmup=speed_params.warmup,
                                                  threads=threads, concurrency=speed_params.concurrency,
                                                  gpu_layers=speed_params.n_gpu_layers)
                result = {"format": name, "status": "ok", "runtime": fmt.runtime_name(None), "threads": threads,
                          "prompt_tokens": len(prompt), "gen_tokens": speed_params.gen_tokens, **measured}
                result = speed.contended(result, held.record(), cpu_runtime=not host_info.get("gpus"))
                log(f"baseline {name}: decode {measured['decode_tok_s']:.1f} tok/s, "
                    f"prefill {measured['prefill_tok_s']:.0f} tok/s")
            (staging / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            results[name] = result
    return results
