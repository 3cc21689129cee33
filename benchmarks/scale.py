"""Every default recipe on a synthetic checkpoint of a real model's published shape: peak memory
against the stage's own estimate, and time, per stage.

    python benchmarks/scale.py llama-3.2-1b                  # full depth (16 layers)
    python benchmarks/scale.py llama-3.1-8b --layers 2       # the first 2 of 32 layers
    python benchmarks/scale.py qwen2.5-7b --layers 2 --recipes gguf-q8_0 trtllm-fp8

The checkpoint has the published config of the model named (hidden size, layers, heads, the
vocabulary of 128k-152k rows, RoPE), random bf16 weights written one tensor at a time (never a
whole model in memory), and a SentencePiece tokenizer trained on pydoc's text that llama.cpp's
converter and transformers both read; its 1000 pieces are padded to the model's vocabulary.
The weights are random, so every accuracy figure and verdict is meaningless: only memory and
time are measured. With --layers N the model keeps its width and vocabulary and has N layers;
seconds per layer are then (stage seconds) / N, which overstates the per-layer cost by the
fixed costs (embedding, output layer, process start) and so projects full depth from above.

It runs the stages one process at a time in a scratch copy of this project
(benchmarks/scratch_project.py) with reference.dtype bfloat16, small windows and small
calibration (below), and prints per stage: the estimate the stage made before loading, the
peak RSS of its process tree, their ratio, seconds and seconds per layer. The stages' memory
check is skipped (QPIPE_SKIP_MEMORY_CHECK=1) so that an estimate above what the host has
still lets the stage run and be measured; a stage that really does not fit is then killed by
the kernel, and the benchmark stops there. The rows go to benchmarks/results/memory-<model>[-<N>-layers].json,
which benchmarks/memory_table.py renders into docs/methodology.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

import memory_estimate
import scratch_project

sys.path.insert(0, str(scratch_project.REPO))

# the published config.json fields that set each model's shape (Hugging Face model cards)
PUBLISHED = {
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "rope_theta": 500000.0},
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "rope_theta": 500000.0},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                   "rope_theta": 1000000.0, "use_sliding_window": False},
}
SHARD_BYTES = 2 * 2**30
# small calibration and windows: the stages' memory and per-layer time, not their accuracy
# (the speed prompt is one window long, so a gate's seconds per window compare with llama-bench's
# prefill of the same length)
PARAMS = {"reference": {"windows": 4, "window_tokens": 256, "dtype": "bfloat16"},
          "speed": {"prompt_tokens": 256, "gen_tokens": 16, "repeats": 1, "warmup": 0},
          "tasks": []}
RECIPE_CHANGES = {"gguf": {"imatrix_chunks": 4, "imatrix_ctx": 256},
                  "awq": {"calibration_samples": 2, "calibration_seq_len": 256},
                  # random weights give near-uniform outputs, on which the TensorRT-LLM export's shared
                  # q/k/v scales alone move the ppl by about 0.2 % a layer (3.5 % over Llama-3.2-1B's 16);
                  # the cross-check judges trained models, so its limit is lifted here
                  "modelopt": {"calibration_samples": 2, "calibration_seq_len": 256, "crosscheck_windows": 1,
                               "crosscheck_seq_len": 256, "max_crosscheck_ppl_gap": 1.0}}
SETTINGS = (f"{PARAMS['reference']['windows']} x {PARAMS['reference']['window_tokens']}-token windows, "
            f"{PARAMS['reference']['dtype']} reference, calibration {RECIPE_CHANGES['awq']['calibration_samples']} x "
            f"{RECIPE_CHANGES['awq']['calibration_seq_len']} tokens, importance matrix "
            f"{RECIPE_CHANGES['gguf']['imatrix_chunks']} x {RECIPE_CHANGES['gguf']['imatrix_ctx']}")


def write_checkpoint(name: str, out_dir: Path, layers: int | None) -> dict:
    """The synthetic checkpoint of `name` in out_dir; returns its config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.families import pydoc_text, save_tokenizer, train_tokenizer

    fields = write_config(name, out_dir, layers)
    config = AutoConfig.from_pretrained(out_dir)
    with torch.device("meta"):
        shapes = {key: tuple(tensor.shape) for key, tensor in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, shards = {}, 0, {}, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            filename = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
            weight_map.update({key: filename for key in shard})
            shards.append(filename)
            shard, shard_bytes = {}, 0

    for key, shape in shapes.items():
        if len(shape) == 1:  # norms' scales and biases
            tensor = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
                torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
        shard[key] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    renamed = {}
    for index, filename in enumerate(shards, 1):  # model-0000i-of-0000n, as transformers names them
        final = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / filename).rename(out_dir / final)
        renamed[filename] = final
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(2 * _numel(s) for s in shapes.values())},
         "weight_map": {key: renamed[f] for key, f in weight_map.items()}}, indent=2))
    spm_dir = out_dir.parent / "tokenizer-training"
    save_tokenizer(train_tokenizer(spm_dir, "\n\n".join(pydoc_text())), out_dir)
    return fields


def write_config(name: str, out_dir: Path, layers: int | None) -> dict:
    """out_dir/config.json: `name`'s published shape with `layers` layers (default: all)."""
    from transformers import AutoConfig

    fields = dict(PUBLISHED[name])
    fields["num_hidden_layers"] = layers or fields["num_hidden_layers"]
    # the trained tokenizer's ids (the published ones index the model's own tokenizer)
    fields.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")
    out_dir.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(**fields).save_pretrained(out_dir)
    return fields


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def smaller_recipes(root: Path, recipes: list[str]) -> None:
    """The scratch project's recipes with RECIPE_CHANGES applied (calibration sizes only)."""
    for recipe in recipes:
        path = root / "recipes" / f"{recipe}.yaml"
        spec = yaml.safe_load(path.read_text())
        changes = RECIPE_CHANGES.get(spec["format"], {})
        if spec["format"] == "gguf" and not spec.get("imatrix"):
            changes = {}
        spec.update(changes)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(PUBLISHED))
    parser.add_argument("--layers", type=int, help="keep the first N layers (default: all)")
    parser.add_argument("--recipes", nargs="+", help="default: the recipes in params.yaml")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint and project go and stay (default: a temp "
                        "dir, deleted at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (10-40 GB at an 8B model's shape)")
    parser.add_argument("--config-only", type=Path, metavar="DIR",
                        help="only write the model's config.json to DIR (for `qpipe doctor --checkpoint DIR`)")
    args = parser.parse_args()
    if args.config_only:
        write_config(args.model, args.config_only, args.layers)
        print(f"{args.config_only / 'config.json'}: {args.model}'s published shape; try `qpipe doctor --checkpoint "
              f"{args.config_only}`")
        return

    recipes = args.recipes or yaml.safe_load((scratch_project.REPO / "params.yaml").read_text())["recipes"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qpipe-scale-"))
    try:
        measure(args.model, args.layers, recipes, workdir)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"(deleted the scratch checkpoint and project, {workdir}; --keep keeps them)")


def measure(model: str, keep_layers: int | None, recipes: list[str], workdir: Path) -> None:
    """The synthetic checkpoint and a scratch project in `workdir`, every stage run and printed."""
    root = scratch_project.create({"recipes": recipes, **PARAMS}, workdir / "project")
    checkpoint = workdir / "checkpoint"
    started = time.perf_counter()
    fields = write_checkpoint(model, checkpoint, keep_layers)
    layers = fields["num_hidden_layers"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["source"] = str(checkpoint)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    smaller_recipes(root, recipes)
    # the stages still make and record their estimate; an over-estimate must not stop the
    # measurement of the peak it over-estimates
    env = {**scratch_project.env(), "QPIPE_SKIP_MEMORY_CHECK": "1"}
    for stage in (["host"], ["source"], ["corpus"]):
        memory_estimate.measured(["qpipe", *stage], root, env)
    source = json.loads((root / "artifacts/source/source.json").read_text())
    depth = f"{layers} of {PUBLISHED[model]['num_hidden_layers']} layers"
    print(f"{model}, synthetic (random bf16 weights: accuracy figures mean nothing), {depth}, "
          f"{source['parameters'] / 1e9:.2f}B parameters; checkpoint written in {time.perf_counter() - started:.0f} s")
    print(f"windows {PARAMS['reference']['windows']} x {PARAMS['reference']['window_tokens']}, reference in "
          f"{PARAMS['reference']['dtype']}; calibration {RECIPE_CHANGES}")
    memory_estimate.print_header(layers)
    full_depth = layers == PUBLISHED[model]["num_hidden_layers"]
    description = {"model": f"{model} shape" + ("" if full_depth else f", {layers} layers"),
                   "parameters": source["parameters"], "layers": layers,
                   "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
                   "settings": SETTINGS}
    rows = []
    for row in memory_estimate.stage_rows(root, recipes, env):
        memory_estimate.print_row(row, layers)
        rows.append(row)
        # after every stage: a later stage the kernel kills must not lose the peaks measured before it
        memory_estimate.write_results(model if full_depth else f"{model}-{layers}-layers", description, rows)
    print_window_costs(root, recipes)
    print(f"(scratch project: {root})")


def print_window_costs(root: Path, recipes: list[str]) -> None:
    """Each gate's accuracy seconds per window (its section's seconds over the windows: they
    include opening the model and aligning the tokenizers once), the part of them spent in the
    runtime (its forward pass with every position's logits, as llama-perplexity runs it; the
    section's runtime_seconds), their ratio, and where the gate measured one, the runtime's
    prefill of a prompt one window long (llama-bench: only the last position's logits)."""
    windows, tokens = PARAMS["reference"]["windows"], PARAMS["reference"]["window_tokens"]
    print(f"\n{'gate':<24} {'s/window':>9} {'runtime s':>9} {'ratio':>6} {'prefill s':>9}  runtime")
    for recipe in recipes:
        path = root / f"artifacts/gates/{recipe}.json"
        if not path.is_file():
            continue
        gate = json.loads(path.read_text())
        accuracy, speed = gate["accuracy"], gate["speed"]
        if accuracy["status"] != "ok":
            continue
        per_window, in_runtime = accuracy["seconds"] / windows, accuracy["runtime_seconds"] / windows
        prefill = (f"{tokens / speed['prefill_tok_s']:9.2f}" if speed["status"] == "ok"
                   and speed["prompt_tokens"] == tokens else f"{'-':>9}")
        print(f"{recipe:<24} {per_window:9.2f} {in_runtime:9.2f} {per_window / in_runtime:6.2f} {prefill}  "
              f"{accuracy['runtime'][:50]}")

if __name__ == "__main__":
    main()
