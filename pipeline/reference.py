"""Evaluation windows and the unquantized model's scores on them.

The evaluation text is tokenised once with the source checkpoint's tokenizer (no special
tokens) and cut into `reference.windows` consecutive windows of `reference.window_tokens`
ids. The unquantized model scores them in transformers, in `reference.dtype` (fp32 by default,
on a CUDA GPU where there is one, else the CPU): per-position NLL of the next token and the
top-k log-probabilities. Its peak memory is estimated before it loads (``memory``). Every gate feeds these
same ids to its artifact, so ppl ratio, KLD and top-1 agreement compare across formats.

Files: reference.npz (tokens [W,T], nll [W,T-1], topk_ids / topk_logprobs [W,T-1,k],
text_tokens: the ids of the whole evaluation text) and reference.json (figures, settings).
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
POSITIONS_PER_CHUNK = 64
META = "reference.json"


@dataclass
class Reference:
    tokens: np.ndarray
    nll: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    text_tokens: np.ndarray
    meta: dict[str, Any]


def load(directory: Path) -> Reference:
    directory = Path(directory)
    if not (directory / NPZ).is_file():
        raise BadInput("no reference scores", where=str(directory), fix="run `qpipe reference` (or `dvc repro`) first")
    arrays = np.load(directory / NPZ)
    return Reference(tokens=arrays["tokens"], nll=arrays["nll"], topk_ids=arrays["topk_ids"],
                     topk_logprobs=arrays["topk_logprobs"], text_tokens=arrays["text_tokens"],
                     meta=json.loads((directory / META).read_text()))


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


def score_windows(model, windows: np.ndarray, top_k: int, device: str, progress=None):
    import torch

    nll, topk_ids, topk_logprobs = [], [], []
    with torch.inference_mode():
        for index, window in enumerate(windows):
            ids = torch.as_tensor(window, dtype=torch.long, device=device)[None]
            logits = model(ids).logits[0, :-1]
            targets = ids[0, 1:]
            window_nll, window_ids, window_logprobs = [], [], []
            # positions a chunk at a time: one window's log-softmax is not held whole (262k vocabularies)
            for start in range(0, logits.shape[0], POSITIONS_PER_CHUNK):
                logprobs = torch.log_softmax(logits[start:start + POSITIONS_PER_CHUNK].float(), dim=-1)
                window_nll.append(-logprobs.gather(1, targets[start:start + POSITIONS_PER_CHUNK, None])[:, 0])
                values, indices = logprobs.topk(top_k, dim=-1)
                window_ids.append(indices.to(torch.int32))
                window_logprobs.append(values)
            nll.append(torch.cat(window_nll).cpu().numpy())
            topk_ids.append(torch.cat(window_ids).cpu().numpy())
            topk_logprobs.append(torch.cat(window_logprobs).cpu().numpy())
            del logits
            if progress:
                progress(index + 1)
    return np.stack(nll), np.stack(topk_ids), np.stack(topk_logprobs)


def run(params: ReferenceParams, source_dir: Path, evaluation_text: Path, out_dir: Path, log=print) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoTokenizer

    from pipeline import memory
    from pipeline.runtimes.transformers import load_causal_lm

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
    need = memory.estimate("reference", memory.ModelSize.of(source_dir), window_tokens=params.window_tokens,
                           dtype=params.dtype, device=device)
    fix = ("set reference.dtype: bfloat16 in params.yaml (half the weights' memory), or run on a host "
           "with more memory or a GPU") if params.dtype == "float32" else "run on a host with more memory or a GPU"
    memory_record = memory.ensure_fits(need, stage=f"the reference in {params.dtype}", fix=fix, device=device)
    model = load_causal_lm(source_dir, dtype=dtype).to(device).eval()
    log(f"reference: scoring {params.windows} x {params.window_tokens} tokens with the unquantized "
        f"model ({str(dtype).removeprefix('torch.')}, {device})")
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=len(windows), desc="reference windows", unit="win", leave=False) as bar:
        nll, topk_ids, topk_logprobs = score_windows(
            model, windows, params.top_k, device, progress=lambda n: bar.update(1))
    elapsed = time.perf_counter() - started

    with atomic_dir(out_dir) as staging:
        np.savez(staging / NPZ, tokens=windows, nll=nll.astype(np.float32), topk_ids=topk_ids,
                 topk_logprobs=topk_logprobs.astype(np.float32),
                 text_tokens=np.asarray(text_ids, dtype=np.int32))
        meta = {
            "windows": params.windows,
            "window_tokens": params.window_tokens,
            "top_k": params.top_k,
            "eval_tokens": int(nll.size),
            "ppl": float(np.exp(nll.astype(np.float64).mean())),
            "mean_nll": float(nll.astype(np.float64).mean()),
            "text_tokens": len(text_ids),
            "evaluation_text_sha256": sha256_file(Path(evaluation_text)),
            "runtime": f"transformers {transformers.__version__} (torch {torch.__version__})",
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
            "score_s": round(elapsed, 2),
            "memory": memory_record,
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"reference: ppl {meta['ppl']:.4f} over {meta['eval_tokens']} tokens in {elapsed:.1f} s")
    return meta
