"""Evaluation windows and the unquantized model's scores on them.

The evaluation text is tokenised once with the source checkpoint's tokenizer (no special
tokens) and cut into `reference.windows` consecutive windows of `reference.window_tokens`
ids. The unquantized model scores them in transformers, in `reference.dtype` (fp32 by default,
on a CUDA GPU where there is one, else the CPU). Its peak memory is estimated before it loads
(``memory``). Every gate feeds these same ids to its artifact, so ppl ratio, KLD and top-1
agreement compare across formats.

The gates need the reference's full next-token distribution at every position (the KL
divergence over the whole vocabulary, as llama-perplexity computes it). Stored as log-probs
that would be positions x vocabulary: 2 GB for the default 20k positions of a 49k vocabulary,
10 GB at 262k. So the reference keeps what the distribution is computed from: the input of
the model's output layer at every position (positions x hidden size: 47 MB here, 335 MB for
an 8B model) and the output layer itself (``OutputLayer``: weight, bias, final logit
soft-capping or scale). A gate recomputes each chunk of reference logits with one matmul.
The reference stage checks on its first window that this reproduces the model's own logits,
and refuses an architecture whose output it cannot reproduce.

Files: reference.npz (tokens [W,T]; nll [W,T-1] from the model's own logits; hidden
[W,T-1,d] float32; text_tokens: the ids of the whole evaluation text), output_layer.safetensors
and reference.json (figures, settings).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ReferenceParams
from pipeline.errors import BadInput
from pipeline.files import atomic_dir, sha256_file

NPZ = "reference.npz"
OUTPUT_LAYER_FILE = "output_layer.safetensors"
META = "reference.json"
# positions whose log-softmax is held at once, here and in the accuracy gate: scratch memory is
# this many x vocabulary floats however large the vocabulary (0.13 GB a float32 copy at 262k);
# 128 is the fastest of 64-512 for the gate's reference matmul on 2 cores
POSITIONS_PER_CHUNK = 128
# largest |log-prob| difference between the model's own logits and the recomputed ones that is
# rounding (the model's head in its dtype vs. float32 here), not a missing transform
REPRODUCTION_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.25}


@dataclass
class OutputLayer:
    """logits = softcap(scale * (hidden @ weight.T + bias)), as the model's forward computes them:
    ``softcap`` is Gemma 2/3's final_logit_softcapping (cap * tanh(x / cap)); ``scale`` is
    Cohere's logit_scale or 1 / Granite's logits_scaling."""

    weight: Any  # torch.Tensor [V, d], float32
    bias: Any | None
    softcap: float | None = None
    scale: float = 1.0

    @classmethod
    def of(cls, model) -> "OutputLayer":
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head = model.get_output_embeddings()
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        return cls(weight=head.weight.detach().float().cpu(),
                   bias=None if getattr(head, "bias", None) is None else head.bias.detach().float().cpu(),
                   softcap=getattr(config, "final_logit_softcapping", None) or None, scale=scale)

    def logits(self, hidden):
        import torch

        logits = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def to(self, device: str) -> "OutputLayer":
        """The same layer on `device` (the GPU, where the gate scores there)."""
        return OutputLayer(weight=self.weight.to(device), bias=None if self.bias is None else self.bias.to(device),
                           softcap=self.softcap, scale=self.scale)

    @property
    def vocabulary(self) -> int:
        return int(self.weight.shape[0])

    def save(self, path: Path) -> None:
        """The weight in bfloat16 when that holds it exactly (a bf16 checkpoint: half the disk)."""
        import torch
        from safetensors.torch import save_file

        weight = self.weight
        if torch.equal(weight.to(torch.bfloat16).float(), weight):
            weight = weight.to(torch.bfloat16)
        tensors = {"weight": weight.contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous()
        # one metadata key: safetensors writes several in a different order from run to run, and
        # a re-run must write the same bytes
        transform = json.dumps({"scale": self.scale, "softcap": self.softcap}, sort_keys=True)
        save_file(tensors, str(path), metadata={"transform": transform})

    @classmethod
    def load(cls, path: Path) -> "OutputLayer":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            bias = handle.get_tensor("bias").float() if "bias" in handle.keys() else None
            transform = json.loads(metadata["transform"])
            return cls(weight=handle.get_tensor("weight").float(), bias=bias,
                       softcap=transform["softcap"], scale=transform["scale"])


@dataclass
class Reference:
    tokens: np.ndarray
    nll: np.ndarray
    hidden: np.ndarray
    text_tokens: np.ndarray
    meta: dict[str, Any]
    directory: Path | None = None

    def output_layer(self) -> OutputLayer:
        return OutputLayer.load(self.directory / OUTPUT_LAYER_FILE)


def load(directory: Path) -> Reference:
    directory = Path(directory)
    if not (directory / NPZ).is_file() or not (directory / OUTPUT_LAYER_FILE).is_file():
        raise BadInput("no reference scores", where=str(directory), fix="run `qpipe reference` (or `dvc repro`) first")
    arrays = np.load(directory / NPZ)
    return Reference(tokens=arrays["tokens"], nll=arrays["nll"], hidden=arrays["hidden"],
                     text_tokens=arrays["text_tokens"], meta=json.loads((directory / META).read_text()),
                     directory=directory)


def make_windows(ids: list[int], windows: int, window_tokens: int, text_path: Path) -> np.ndarray:
    need = windows * window_tokens
    if not ids:
        raise BadInput("the evaluation text is empty", where=str(text_path),
                       fix="provide an evaluation text (params.yaml: corpus)")
    if len(ids) < need:
        raise BadInput(
            f"the evaluation text has {len(ids)} tokens; {windows} windows x {window_tokens} tokens need {need}",
            where="params.yaml: reference.windows / reference.window_tokens",
            fix=f"lower them (at most {len(ids) // window_tokens} windows of {window_tokens}) or use a longer text",
        )
    return np.asarray(ids[:need], dtype=np.int32).reshape(windows, window_tokens)


def windows_per_batch(device: str, window_tokens: int, vocabulary: int, free_bytes: int | None = None) -> int:
    """Windows scored at once: one on the CPU (the logits of one window are what its memory
    check counts), and on a GPU as many as a quarter of its free memory holds, at float32 logits
    plus their log-softmax chunk."""
    if device != "cuda":
        return 1
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info()
    per_window = window_tokens * vocabulary * 4 * 2
    return max(1, int(free_bytes // 4 // per_window))


def score_windows(model, windows: np.ndarray, device: str, progress=None, batch: int = 1):
    """Per-position NLL of the next token from the model's own logits, and the input of its
    output layer at every position ([W, T-1] and [W, T-1, d] float32); `batch` windows at once."""
    import torch

    captured = {}
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("hidden", inputs[0]))
    nll, hidden, logits_of_first = [], [], None
    try:
        with torch.inference_mode():
            for first in range(0, len(windows), batch):
                ids = torch.as_tensor(np.asarray(windows[first:first + batch]), dtype=torch.long, device=device)
                batch_logits = model(ids).logits[:, :-1]
                batch_hidden = captured.pop("hidden")
                for row in range(ids.shape[0]):
                    logits, targets = batch_logits[row], ids[row, 1:]
                    window_nll = []
                    for start in range(0, logits.shape[0], POSITIONS_PER_CHUNK):
                        logprobs = torch.log_softmax(logits[start:start + POSITIONS_PER_CHUNK].float(), dim=-1)
                        window_nll.append(-logprobs.gather(1, targets[start:start + POSITIONS_PER_CHUNK, None])[:, 0])
                    nll.append(torch.cat(window_nll).cpu().numpy())
                    hidden.append(batch_hidden[row, :-1].float().cpu().numpy())
                    if first + row == 0:
                        logits_of_first = logits[:POSITIONS_PER_CHUNK].float().cpu()
                    if progress:
                        progress(first + row + 1)
                del batch_logits, batch_hidden
    finally:
        hook.remove()
    return np.stack(nll), np.stack(hidden), logits_of_first


def check_reproduced(output_layer: OutputLayer, hidden: np.ndarray, model_logits, dtype: str, architecture: str) -> float:
    """The largest log-prob difference between the model's logits and the output layer's
    recomputation on the same positions; refuses (exit 2) a difference that is not rounding."""
    import torch

    recomputed = torch.log_softmax(output_layer.logits(torch.from_numpy(hidden[:len(model_logits)])), dim=-1)
    error = float((recomputed - torch.log_softmax(model_logits, dim=-1)).abs().max())
    if not error <= REPRODUCTION_TOLERANCE[dtype]:
        raise BadInput(f"the reference cannot recompute {architecture}'s logits from its output layer "
                       f"(log-probs differ by up to {error:.3g}): the model transforms its logits in a way "
                       "qpipe does not know", where="source checkpoint: config.json architectures",
                       fix="qpipe knows final_logit_softcapping, logit_scale and logits_scaling; report "
                           "the architecture, or gate another checkpoint")
    return error


def memory_need(params: ReferenceParams, source_dir: Path, device: str) -> int:
    """Bytes the reference stage needs for the checkpoint at `source_dir` (``memory.estimate``):
    the model, and the float32 copy of its output layer it keeps."""
    from pipeline import memory

    size = memory.ModelSize.of(source_dir)
    return memory.estimate(memory.REFERENCE, size, window_tokens=params.window_tokens, dtype=params.dtype,
                           device=device, mapped_bytes=size.output_layer_bytes)


def run(params: ReferenceParams, source_dir: Path, evaluation_text: Path, out_dir: Path, log=print) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from pipeline import memory, runs
    from pipeline.runtimes.transformers import load_causal_lm

    run_started = time.perf_counter()
    if not (Path(source_dir) / "source.json").is_file():
        raise BadInput("no source checkpoint", where=str(source_dir), fix="run `qpipe source` first")
    if not Path(evaluation_text).is_file():
        raise BadInput("no evaluation text", where=str(evaluation_text), fix="run `qpipe corpus` first")
    text = Path(evaluation_text).read_text()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(text_ids, params.windows, params.window_tokens, evaluation_text)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, params.dtype)
    need = memory_need(params, source_dir, device)
    fix = ("set reference.dtype: bfloat16 in params.yaml (half the weights' memory), or run on a host "
           "with more memory or a GPU") if params.dtype == "float32" else "run on a host with more memory or a GPU"
    memory_record = memory.ensure_fits(need, stage=f"the reference in {params.dtype}", fix=fix, device=device)
    model = load_causal_lm(source_dir, dtype=dtype).to(device).eval()
    log(f"reference: scoring {params.windows} x {params.window_tokens} tokens with the unquantized "
        f"model ({str(dtype).removeprefix('torch.')}, {device})")
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=len(windows), desc="reference windows", unit="win", leave=False) as bar:
        batch = windows_per_batch(device, params.window_tokens, model.config.get_text_config().vocab_size)
        nll, hidden, logits_of_first = score_windows(model, windows, device, progress=lambda n: bar.update(1),
                                                     batch=batch)
    elapsed = time.perf_counter() - started
    output_layer = OutputLayer.of(model)
    architecture = (model.config.architectures or [type(model).__name__])[0]
    del model
    reproduction_error = check_reproduced(output_layer, hidden[0], logits_of_first, params.dtype, architecture)

    with atomic_dir(out_dir) as staging:
        np.savez(staging / NPZ, tokens=windows, nll=nll.astype(np.float32), hidden=hidden.astype(np.float32),
                 text_tokens=np.asarray(text_ids, dtype=np.int32))
        output_layer.save(staging / OUTPUT_LAYER_FILE)
        meta = {
            "windows": params.windows,
            "window_tokens": params.window_tokens,
            "hidden_size": int(hidden.shape[-1]),
            "vocabulary": output_layer.vocabulary,
            "output_layer": {"softcap": output_layer.softcap, "scale": output_layer.scale,
                             "bias": output_layer.bias is not None,
                             "max_logprob_error": reproduction_error},
            "eval_tokens": int(nll.size),
            "ppl": float(np.exp(nll.astype(np.float64).mean())),
            "mean_nll": float(nll.astype(np.float64).mean()),
            "text_tokens": len(text_ids),
            "evaluation_text_sha256": sha256_file(Path(evaluation_text)),
            "runtime": f"transformers {transformers.__version__} (torch {torch.__version__})",
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
    runs.write("reference", run_started, score_s=round(elapsed, 2), memory=memory_record)
    log(f"reference: ppl {meta['ppl']:.4f} over {meta['eval_tokens']} tokens in {elapsed:.1f} s")
    return meta
