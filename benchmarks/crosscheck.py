"""qpipe's GGUF gate figures against llama.cpp's own tools on the same files and threads.

Accuracy: llama-perplexity --kl-divergence, with the f16 GGUF from the same converter as its
base, over the gate's own windows (the evaluation text cut into 512-token chunks, the second
half of each scored). qpipe's scoring code (pipeline/gates/accuracy.py) is run on exactly
that comparison: the f16 GGUF's logits as the base, each quant's logits through qpipe's
llama.cpp runtime, the second half of each window. The ratios qpipe / llama-perplexity of
mean KLD, same-top-p, ppl ratio and RMS Δp check the scoring and the runtime glue. The gate
itself uses the fp32 transformers reference as its base, not the f16 GGUF; its second-half
KLD is printed beside them, so the part the base contributes is visible.

Speed: the gate's own measurement (the GGUF session's ``measure_speed`` with params.yaml's speed
settings) against llama-bench run as a user would run it on the same file and threads
(`llama-bench -m F -t T -p <prompt> -n 0`, then `-p 0 -n <gen> -d <prompt>`: its default
5 repetitions and flash attention `auto`), alternated back to back --rounds times; the ratio
of the medians, for prefill, decode and the Python API's decode rate. Speed on a shared host
moves between runs minutes apart, which is why the two are alternated rather than compared
with the figure in the gate file.

With --kv-cache TYPE both sides serve the quant with that K and V cache type (llama-perplexity
and llama-bench `-ctk TYPE -ctv TYPE`, qpipe's llama.cpp session with the same types; the f16
base keeps f16). With --context N the windows are N tokens of the evaluation text instead of the
reference's, as llama-perplexity -c N cuts them. With --depth D the speed crosscheck compares
decode at depth D (speed.depths) with `llama-bench -d D`.

Run after `dvc repro`, from the project root:

    python benchmarks/crosscheck.py [--recipes gguf-q8_0 gguf-q4_k_m] [--windows 40] [--only accuracy|speed]
    python benchmarks/crosscheck.py --recipes gguf-q8_0 --context 4096 --windows 4 --kv-cache q8_0 --depth 4096
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from pipeline import host, layout
from pipeline import reference as reference_stage
from pipeline.config import load_params
from pipeline.formats import gguf
from pipeline.gates import accuracy
from pipeline.runtimes import llama_cpp

# llama-perplexity's labels -> the figure (perplexity.cpp's LOG format strings)
PATTERNS = {
    "ppl_ratio": r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*(\S+)",
    "mean_kld": r"^Mean\s+KLD:\s*(\S+)",
    "p99_kld": r"^99\.0%\s+KLD:\s*(\S+)",
    "rms_delta_p_pct": r"^RMS Δp\s*:\s*(\S+)",
    "same_top_p_pct": r"^Same top p:\s*(\S+)",
}


def llama_perplexity(arguments: list[str]) -> str:
    binary, env = llama_cpp.llama_tool("llama-perplexity")
    result = subprocess.run([str(binary), *arguments], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout + result.stderr


def parse_statistics(output: str) -> dict[str, float]:
    """llama-perplexity's KLD statistics; it exits 0 on some failures, so none found is one."""
    figures = {}
    for key, pattern in PATTERNS.items():
        match = re.search(pattern, output, re.MULTILINE)
        figures[key] = float(match.group(1)) if match else float("nan")
    if all(value != value for value in figures.values()):
        raise SystemExit("llama-perplexity printed no KLD statistics:\n" + "\n".join(output.splitlines()[-5:]))
    return figures


def second_half_logits(path: Path, windows: np.ndarray, threads: int,
                       cache_types: dict[str, str] = llama_cpp.F16_CACHE) -> list[np.ndarray]:
    half = windows.shape[1] // 2
    with llama_cpp.open_session(path, threads=threads, cache_types=cache_types) as session:
        return [np.array(logits[half:-1]) for logits in session.window_logits(windows)]


def qpipe_statistics(logits: list[np.ndarray], base: list[np.ndarray], windows: np.ndarray) -> dict[str, float]:
    """The gate's figures of the quant's logits against the base's, stored as the reference
    stage stores its own (float16 log-probs, exact NLL and top-1)."""
    import torch

    half = windows.shape[1] // 2
    # position p of window[half:] predicts token p+1: the second-half logits row for row
    parts = [accuracy.window_scores(q, window[half:], *reference_stage.stored_form(torch.from_numpy(p),
                                                                                window[half + 1:]))
             for q, p, window in zip(logits, base, windows)]
    return comparable(accuracy.summarize({key: np.concatenate([part[key] for part in parts])
                                          for key in accuracy.FIGURES}))


def comparable(summary: dict) -> dict[str, float]:
    """An accuracy summary's figures in llama-perplexity's units, under PATTERNS' keys."""
    return {"ppl_ratio": summary["ppl_ratio"], "mean_kld": summary["mean_kld"], "p99_kld": summary["p99_kld"],
            "rms_delta_p_pct": 100 * summary["rms_delta_p"], "same_top_p_pct": 100 * summary["top1_agreement"]}


def user_llama_bench(path: Path, *, prompt_tokens: int, gen_tokens: int, threads: int, cache_flags: list[str],
                     depth: int | None) -> dict[str, float]:
    """llama-bench with its own defaults but the file, threads, KV-cache types and shape of the gate."""
    binary, env = llama_cpp.llama_tool("llama-bench")
    rates = {}
    shapes = [("prefill_tok_s", ["-p", str(prompt_tokens), "-n", "0"]),
              ("decode_tok_s", ["-p", "0", "-n", str(gen_tokens), "-d", str(prompt_tokens)])]
    if depth:
        shapes.append(("decode_at_depth", ["-p", "0", "-n", str(gen_tokens), "-d", str(depth)]))
    for figure, shape in shapes:
        result = subprocess.run([str(binary), "-m", str(path), "-t", str(threads), *cache_flags, *shape, "-o", "json"],
                                env=env, capture_output=True, text=True, check=True)
        rates[figure] = json.loads(result.stdout)[0]["avg_ts"]
    return rates


def speed_crosscheck(recipes: list[str], speed_params, threads: int, prompt: list[int], rounds: int,
                     cache_types: dict[str, str], depth: int | None) -> None:
    cache_flags = ["-ctk", cache_types["k"], "-ctv", cache_types["v"]]
    print(f"\nspeed: the gate's measurement vs llama-bench's defaults ({' '.join(cache_flags)}), alternated {rounds} "
          f"times, medians; {threads} threads")
    print(f"{'recipe':<13} {'figure':<16} {'qpipe':>10} {'llama-bench':>11} {'ratio':>7}")
    speed_params = speed_params.model_copy(update={"depths": [depth] if depth else []})
    figures = [("prefill_tok_s", "prefill_tok_s"), ("decode_tok_s", "decode_tok_s"), ("api decode", "decode_tok_s")]
    if depth:
        figures.append((f"decode at {depth}", "decode_at_depth"))
    for recipe in recipes:
        path = layout.build_dir(recipe) / "model.gguf"
        ours, theirs = [], []
        for _ in range(rounds):
            with llama_cpp.open_session(path, threads=threads, cache_types=cache_types) as session:
                measured = session.measure_speed(prompt, speed_params)
            ours.append({"prefill_tok_s": measured["prefill_tok_s"], "decode_tok_s": measured["decode_tok_s"],
                         "api decode": measured["api_decode_tok_s"],
                         **({f"decode at {depth}": measured["decode_at_depth"][str(depth)]["decode_tok_s"]}
                            if depth else {})})
            theirs.append(user_llama_bench(path, prompt_tokens=len(prompt), gen_tokens=speed_params.gen_tokens,
                                           threads=threads, cache_flags=cache_flags, depth=depth))
        for figure, upstream_key in figures:
            mine = statistics.median(m[figure] for m in ours)
            upstream = statistics.median(t[upstream_key] for t in theirs)
            print(f"{recipe:<13} {figure:<16} {mine:10.1f} {upstream:11.1f} {mine / upstream:7.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=[r for r in load_params().recipes if r.startswith("gguf-")])
    parser.add_argument("--windows", type=int, default=None, help="default: every reference window")
    parser.add_argument("--rounds", type=int, default=3, help="speed: alternations of qpipe and llama-bench")
    parser.add_argument("--only", choices=["accuracy", "speed"])
    parser.add_argument("--kv-cache", default="f16", choices=gguf.KV_CACHE_TYPES,
                        help="the quant's K and V cache type on both sides (the f16 base keeps f16)")
    parser.add_argument("--context", type=int, help="windows of this many tokens of the evaluation text "
                        "(llama-perplexity -c), instead of the reference's")
    parser.add_argument("--depth", type=int, help="speed: also decode at this depth, against llama-bench -d")
    args = parser.parse_args()
    params = load_params()
    ref = reference_stage.load(layout.REFERENCE_DIR)
    if args.context:
        count = args.windows or len(ref.text_tokens) // args.context
        windows = np.asarray(ref.text_tokens[: count * args.context]).reshape(count, args.context)
    else:
        windows = ref.tokens[: args.windows or len(ref.tokens)]
    threads = host.worker_threads(params.speed.threads)
    window_tokens = int(windows.shape[1])
    cache_types = {"k": args.kv_cache, "v": args.kv_cache}
    if args.only != "accuracy":
        from pipeline.gates.speed import speed_prompt

        speed_crosscheck(args.recipes, params.speed, threads, speed_prompt(ref, params.speed), args.rounds,
                         cache_types, args.depth)
    if args.only == "speed":
        return

    with tempfile.TemporaryDirectory(prefix="qpipe-crosscheck-") as scratch:
        scratch = Path(scratch)
        f16 = scratch / "model-f16.gguf"
        gguf.convert(layout.SOURCE_DIR, f16, "f16", gguf.converter_info()["path"])
        # llama-perplexity tokenizes the text itself: the comparison holds only if its chunks are
        # the gate's windows, which the base file's token ids show
        text = layout.EVALUATION_TEXT
        base_file = scratch / "base.kld"
        llama_perplexity(["-m", str(f16), "-f", str(text), "-c", str(window_tokens), "--chunks", str(len(windows)),
                          "-t", str(threads), "-fa", "on", "--kl-divergence-base", str(base_file)])
        with open(base_file, "rb") as handle:
            handle.seek(8 + 12)
            upstream_tokens = np.fromfile(handle, dtype=np.int32, count=windows.size).reshape(windows.shape)
        same_ids = bool(np.array_equal(upstream_tokens, windows))
        print(f"llama-perplexity's chunks are the gate's windows token for token: {same_ids}")
        if not same_ids:
            raise SystemExit("the tokenizations differ (BOS added, or another split): the figures would not compare")
        base = second_half_logits(f16, windows, threads)

        print(f"\n{len(windows)} windows x {window_tokens} tokens, second half of each; base: f16 GGUF, f16 KV "
              f"cache; the quant's KV cache: {args.kv_cache}; {threads} threads")
        same_windows = not args.context and args.kv_cache == "f16"  # the gate's own figures compare only then
        print(f"{'recipe':<13} {'figure':<16} {'qpipe':>10} {'llama.cpp':>10} {'ratio':>7}"
              + ("   gate (fp32 base)" if same_windows else ""))
        for recipe in args.recipes:
            path = layout.build_dir(recipe) / "model.gguf"
            upstream = parse_statistics(llama_perplexity(["-m", str(path), "-c", str(window_tokens), "-t", str(threads),
                                                          "-fa", "on", "-ctk", args.kv_cache, "-ctv", args.kv_cache,
                                                          "--kl-divergence-base", str(base_file), "--kl-divergence"]))
            ours = qpipe_statistics(second_half_logits(path, windows, threads, cache_types), base, windows)
            gate_figures = comparable(json.loads(layout.gate_file(recipe).read_text())["accuracy"]["second_half"]) \
                if same_windows else {}
            for figure in PATTERNS:
                print(f"{recipe:<13} {figure:<16} {ours[figure]:10.5f} {upstream[figure]:10.5f} "
                      f"{ours[figure] / upstream[figure]:7.4f}"
                      + (f"   {gate_figures[figure]:.5f}" if same_windows else ""), flush=True)


if __name__ == "__main__":
    main()
