"""The GPU paths on a lent GPU host: the default recipes built and gated there, and a
production-shaped model placed against the GPU's bandwidth roofline.

1. `dvc repro` builds and gates every recipe of params.yaml (`--formats` narrows it). llama.cpp
   puts params `speed.n_gpu_layers` layers on the GPU (-1 = all) where its build offloads; AWQ
   runs on vLLM and FP8 / NVFP4 on TensorRT-LLM's PyTorch backend where they are installed (and
   NVFP4 on a Blackwell GPU), INT8 on a TensorRT-LLM 1.2.x engine; elsewhere the gate scores the
   files through transformers or the checkpoint emulation, on the GPU, and says why its speed is
   not_run. Each row gives the runtime, the device, decode tok/s, the roofline fraction from the
   GPU's measured copy bandwidth, the mean KLD and where it was scored (`scoring_device`: the
   GPU path of the accuracy gate).
2. A synthetic model with Llama-3-8B's dimensions (hidden 4096, 32 layers, 32 heads / 8 KV
   heads, FFN 14336, vocabulary 128256):
   - random weights are made on this machine and written as an f16 GGUF with gguf-py;
   - llama.cpp quantizes it to Q4_K_M and Q8_0;
   - it is measured for speed only, with llama-bench, as the gates measure. Its tokens mean
     nothing, so every row of it says "synthetic".
3. One table goes to stdout and to benchmarks/results/<device>-<date>.md.

Run it from the project root, with llama-cpp-python built for CUDA (README: "GGUF gates on a
GPU"):

    python benchmarks/gpu.py [--skip-pipeline] [--formats gguf awq modelopt] [--dims llama3-8b|tiny] [--allow-cpu]

`--dims tiny --allow-cpu` checks the script itself on a CPU host; it writes no results file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from pipeline import formats, host, layout
from pipeline.config import load_params
from pipeline.formats import gguf
from pipeline.gates import speed as speed_gate
from pipeline.runtimes import llama_cpp

DIMS = {
    "llama3-8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "ffn": 14336, "vocab": 128256,
                  "context": 8192, "rope_base": 500000.0},
    "tiny": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 512, "vocab": 1024,
             "context": 1024, "rope_base": 10000.0},
}
SYNTHETIC_TYPES = ("Q4_K_M", "Q8_0")
RESULTS = Path(__file__).resolve().parent / "results"


def random_tensor(shape: tuple[int, ...], seed: int):
    """float16 N(0, 0.02) weights: made on the GPU where there is one (seconds for 8B), else numpy."""
    import numpy as np
    import torch

    if torch.cuda.is_available():
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return (torch.randn(shape, generator=generator, device="cuda", dtype=torch.float16) * 0.02).cpu().numpy()
    return (np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def write_synthetic_gguf(path: Path, dims: dict, label: str) -> None:
    """A llama-architecture f16 GGUF with these dimensions, random weights and a placeholder
    vocabulary (llama.cpp's SentencePiece model type needs no merges)."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType, TokenType

    hidden, heads, kv_heads = dims["hidden"], dims["heads"], dims["kv_heads"]
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(label)
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(dims["layers"])
    writer.add_feed_forward_length(dims["ffn"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(dims["rope_base"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(dims["vocab"])
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(dims["vocab"])])
    writer.add_token_scores([0.0] * dims["vocab"])
    writer.add_token_types([TokenType.NORMAL] * dims["vocab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    ones = np.ones(hidden, dtype=np.float32)
    seed = iter(range(1, 1 << 20))
    writer.add_tensor("token_embd.weight", random_tensor((dims["vocab"], hidden), next(seed)))
    for block in range(dims["layers"]):
        name = f"blk.{block}."
        writer.add_tensor(name + "attn_norm.weight", ones)
        writer.add_tensor(name + "attn_q.weight", random_tensor((hidden, hidden), next(seed)))
        writer.add_tensor(name + "attn_k.weight", random_tensor((kv_heads * head_dim, hidden), next(seed)))
        writer.add_tensor(name + "attn_v.weight", random_tensor((kv_heads * head_dim, hidden), next(seed)))
        writer.add_tensor(name + "attn_output.weight", random_tensor((hidden, hidden), next(seed)))
        writer.add_tensor(name + "ffn_norm.weight", ones)
        writer.add_tensor(name + "ffn_gate.weight", random_tensor((dims["ffn"], hidden), next(seed)))
        writer.add_tensor(name + "ffn_up.weight", random_tensor((dims["ffn"], hidden), next(seed)))
        writer.add_tensor(name + "ffn_down.weight", random_tensor((hidden, dims["ffn"]), next(seed)))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", random_tensor((dims["vocab"], hidden), next(seed)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def pipeline_rows(format_names: list[str], log) -> list[dict]:
    """Build and gate the recipes of params.yaml in `format_names` with `dvc repro` (--keep-going:
    a recipe whose runtime fails is a row saying so); one row per gate result."""
    recipes = [name for name in load_params().recipes if formats.load_recipe(name).format in format_names]
    log(f"dvc repro of {len(recipes)} recipes: {', '.join(recipes)}")
    subprocess.run(["dvc", "repro", "--keep-going", *(f"gate@{name}" for name in recipes)], check=False)
    rows = []
    for name in recipes:
        if not layout.gate_file(name).is_file():
            rows.append({"model": "the project's model", "artifact": name, "runtime": "-", "device": None,
                         "offloaded": "-", "decode_tok_s": None, "roofline_tok_s": None, "roofline_fraction": None,
                         "prefill_tok_s": None, "mean_kld": None, "note": "no gate result: see dvc repro's log"})
            continue
        result = json.loads(layout.gate_file(name).read_text())
        section, accuracy = result["speed"], result.get("accuracy") or {}
        note = result["verdict"] + (f"; scored on {accuracy['scoring_device']}" if accuracy.get("scoring_device") else "")
        if section.get("status") == "not_run":
            note += f"; speed not run: {section.get('reason')}"
        rows.append({"model": "the project's model", "artifact": name,
                     "runtime": section.get("runtime") or accuracy.get("runtime") or "-",
                     "device": section.get("device") or accuracy.get("device"),
                     "offloaded": f"{section.get('offloaded_layers', '-')}/{section.get('layers', '-')}",
                     "decode_tok_s": section.get("decode_tok_s"), "roofline_tok_s": section.get("roofline_tok_s"),
                     "roofline_fraction": section.get("roofline_fraction"),
                     "prefill_tok_s": section.get("prefill_tok_s"), "mean_kld": accuracy.get("mean_kld"), "note": note})
    return rows


def synthetic_rows(dims_name: str, host_info: dict, speed_params, threads: int, log) -> list[dict]:
    dims = DIMS[dims_name]
    label = f"synthetic ({dims_name} dimensions, random weights)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpipe-gpu-bench-", dir=".") as scratch:
        f16 = Path(scratch) / "f16.gguf"
        log(f"writing {label} as f16 GGUF")
        write_synthetic_gguf(f16, dims, label)
        for qtype in SYNTHETIC_TYPES:
            build_dir = Path(scratch) / qtype
            build_dir.mkdir()
            model = build_dir / "model.gguf"
            log(f"quantizing to {qtype} (llama.cpp)")
            gguf.quantize(f16, model, qtype, imatrix=None, threads=threads, log_file=build_dir / "quantize.log")
            prompt = [3 + (i * 7919) % (dims["vocab"] - 3) for i in range(speed_params.prompt_tokens)]
            layers = llama_cpp.gpu_layers(speed_params.n_gpu_layers)
            log(f"llama-bench {qtype}, -ngl {layers}")
            measured = llama_cpp.measure_speed(model, prompt, speed_params, threads=threads, n_gpu_layers=layers)
            context = speed_gate.mean_decode_context(len(prompt), speed_params.gen_tokens)
            bandwidth = speed_gate.roofline_bandwidth(host_info, measured["device"])
            section = speed_gate.section(measured, runtime=llama_cpp.name(), prompt_tokens=len(prompt),
                                         gen_tokens=speed_params.gen_tokens, threads=threads, bandwidth=bandwidth,
                                         bytes_per_token=gguf.decode_bytes_per_token(build_dir, context))
            rows.append({"model": label, "artifact": qtype, "runtime": llama_cpp.name(), "device": section["device"],
                         "offloaded": f"{section['offloaded_layers']}/{section['layers']}",
                         "decode_tok_s": section["decode_tok_s"], "roofline_tok_s": section["roofline_tok_s"],
                         "roofline_fraction": section["roofline_fraction"],
                         "prefill_tok_s": section["prefill_tok_s"], "mean_kld": None,
                         "note": "speed only (synthetic)"})
    return rows


def figure(value, template: str) -> str:
    return "-" if value is None else template.format(value)


def table(rows: list[dict]) -> str:
    lines = ["| model | artifact | runtime | device | layers on GPU | decode tok/s | roofline tok/s | of roofline "
             "| prefill tok/s | mean KLD | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(" | ".join(["", row["model"], row["artifact"], row["runtime"], row["device"] or "-",
                                 row["offloaded"],
                                 figure(row["decode_tok_s"], "{:.1f}"), figure(row["roofline_tok_s"], "{:.0f}"),
                                 figure(row["roofline_fraction"], "{:.0%}"), figure(row["prefill_tok_s"], "{:.0f}"),
                                 figure(row["mean_kld"], "{:.4f}"), row["note"], ""]).strip())
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-pipeline", action="store_true", help="only the synthetic model")
    parser.add_argument("--formats", nargs="+", default=["gguf", "awq", "modelopt"],
                        help="the formats whose recipes of params.yaml are built and gated")
    parser.add_argument("--dims", choices=sorted(DIMS), default="llama3-8b")
    parser.add_argument("--allow-cpu", action="store_true", help="run without GPU offload (checks the script)")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not llama_cpp.supports_gpu_offload() and not args.allow_cpu:
        log("error: this llama.cpp cannot offload to a GPU | fix: build llama-cpp-python with CUDA "
            "(README: GGUF gates on a GPU), or pass --allow-cpu to check the script")
        return 3
    host_info = host.probe()
    speed_params = load_params().speed
    threads = host.worker_threads(speed_params.threads, host_info["cpu"])
    rows = [] if args.skip_pipeline else pipeline_rows(args.formats, log)
    rows += synthetic_rows(args.dims, host_info, speed_params, threads, log)
    gpu = host_info["gpus"][0] if host_info["gpus"] else None
    device = gpu["name"] if gpu else host_info["cpu"]["model"]
    bandwidth = host_info["bandwidth"]
    header = [f"# The GPU paths on {device}, {date.today().isoformat()}", "",
              f"- host: {device}" + (f", {gpu['memory_gb']} GB, CC {gpu['compute_capability']}, driver "
                                     f"{gpu['driver']}, CUDA {gpu.get('cuda')}" if gpu else " (no GPU)"),
              f"- bandwidth: GPU {bandwidth.get('gpu_gb_s')} GB/s ({bandwidth.get('gpu_method')}); "
              f"CPU {bandwidth['gb_s']} GB/s ({bandwidth['method']})",
              f"- llama.cpp: {llama_cpp.name()}; speed params: {speed_params.prompt_tokens}-token prompt, "
              f"{speed_params.gen_tokens} generated, {speed_params.repeats} repeats, n_gpu_layers "
              f"{speed_params.n_gpu_layers}",
              f"- command: python benchmarks/gpu.py {' '.join(sys.argv[1:])}".rstrip(), ""]
    text = "\n".join(header) + "\n" + table(rows)
    print(text)
    if args.allow_cpu:
        return 0  # a check of the script, not a result
    RESULTS.mkdir(exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    target = RESULTS / f"{slug}-{date.today().isoformat()}.md"
    target.write_text(text)
    log(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
