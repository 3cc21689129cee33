"""Evaluation windows and the unquantized model's scores on them.

The evaluation text is tokenised once with the source checkpoint's tokenizer (no special
tokens) and cut into `reference.windows` consecutive windows of `reference.window_tokens`
ids. The unquantized model scores them in transformers, in `reference.dtype` (fp32 by default,
on a CUDA GPU where there is one, else the CPU). Its peak memory and the disk its log-probs
take are checked before it loads (``memory``). Every gate feeds these same ids to its
artifact, so ppl ratio, KLD and top-1 agreement compare across formats.

The gates need the reference's full next-token distribution at every position (the KL
divergence over the whole vocabulary, as llama-perplexity computes it). The reference stores
it once, as its log-probs in float16 at every position of every window ([W, T-1, V], 2 bytes a
logit: 2.0 GB for the default 40 x 512 tokens of a 49k vocabulary, 5.3 GB at 128k), so that no
gate recomputes it: recomputing it from the output layer cost a gate about one output layer's
matmul a window, 1.5 s at Llama-3.2-1B's shape on 2 cores, as much as half the runtime's own
forward pass. llama-perplexity's --kl-divergence-base file stores the same thing, as uint16
over a 16-nat range below each position's maximum; float16 log-probs keep the tail and are
finer where the probability is (a spacing of at most 2^-11 nats above -1). The gate
renormalizes them over the ids it compares, so rounding adds no first-order error to the KLD.
The next token's exact NLL and the exact top-1 id are kept in float32 and int32 beside them.

Files: reference.npz (tokens [W,T]; nll [W,T-1] from the model's own float32 log-softmax; top1
[W,T-1] its argmax; text_tokens: the ids of the whole evaluation text), logprobs.npy (float16
[W,T-1,V], written and read one window at a time) and reference.json (figures, settings).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import ReferenceParams
from pipeline.errors import BadInput, HostLacks
from pipeline.files import atomic_dir, sha256_file

NPZ = "reference.npz"
LOG_PROBS_FILE = "logprobs.npy"
META = "reference.json"
LOG_PROB_DTYPE = np.dtype("<f2")
# positions whose log-softmax is held at once, here and in the accuracy gate: scratch memory is
# this many x vocabulary floats however large the vocabulary (0.13 GB a float32 copy at 262k)
POSITIONS_PER_CHUNK = 128


def log_probs_bytes(windows: int, window_tokens: int, vocabulary: int) -> int:
    """Bytes of logprobs.npy's data: every scored position's log-probs in float16."""
    return windows * (window_tokens - 1) * vocabulary * LOG_PROB_DTYPE.itemsize


class LogProbsWriter:
    """logprobs.npy written one window after another, so that neither the stage nor the page
    cache holds more than a window of it; its shape is set by the first window's logits."""

    def __init__(self, path: Path, windows: int):
        self.path, self.windows, self.handle = path, windows, None

    def write(self, log_probs: np.ndarray) -> None:
        if self.handle is None:
            self.handle = open(self.path, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(LOG_PROB_DTYPE), "fortran_order": False,
                      "shape": (self.windows, *log_probs.shape)}
            np.lib.format.write_array_header_1_0(self.handle, header)
        self.handle.write(np.ascontiguousarray(log_probs, dtype=LOG_PROB_DTYPE).tobytes())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class LogProbsReader:
    """One window of logprobs.npy at a time, read into the gate's own buffer (a memory map would
    keep every page it touched in the gate's resident memory)."""

    def __init__(self, path: Path):
        self.handle = open(path, "rb")
        version = np.lib.format.read_magic(self.handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, _, dtype = read_header(self.handle)
        if dtype != LOG_PROB_DTYPE:
            raise BadInput(f"{path.name} holds {dtype}, not float16 log-probs", where=str(path),
                           fix="re-run the reference stage (`dvc repro reference`)")
        self.data_offset = self.handle.tell()

    @property
    def vocabulary(self) -> int:
        return int(self.shape[2])

    def window(self, index: int) -> np.ndarray:
        positions, vocabulary = self.shape[1], self.shape[2]
        log_probs = np.empty((positions, vocabulary), dtype=LOG_PROB_DTYPE)
        self.handle.seek(self.data_offset + index * log_probs.nbytes)
        if self.handle.readinto(memoryview(log_probs).cast("B")) != log_probs.nbytes:
            raise BadInput(f"{LOG_PROBS_FILE} ends before window {index}", where=self.handle.name,
                           fix="re-run the reference stage (`dvc repro reference`)")
        return log_probs

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "LogProbsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Reference:
    tokens: np.ndarray
    nll: np.ndarray
    top1: np.ndarray
    text_tokens: np.ndarray
    meta: dict[str, Any]
    directory: Path | None = None

    def log_probs(self) -> LogProbsReader:
        return LogProbsReader(self.directory / LOG_PROBS_FILE)


def load(directory: Path) -> Reference:
    directory = Path(directory)
    if not (directory / NPZ).is_file() or not (directory / LOG_PROBS_FILE).is_file():
        raise BadInput("no reference scores", where=str(directory), fix="run `qpipe reference` (or `dvc repro`) first")
    arrays = np.load(directory / NPZ)
    if "top1" not in arrays:
        raise BadInput("the reference was written by an older qpipe (no stored log-probs)", where=str(directory),
                       fix="re-run the reference stage (`dvc repro reference`)")
    return Reference(tokens=arrays["tokens"], nll=arrays["nll"], top1=arrays["top1"],
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


def stored_form(logits, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the reference keeps of positions' logits ([n, V], torch) and next tokens ([n]): the
    log-probs in float16, the next token's NLL in float32 and the top-1 id."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(1, torch.as_tensor(targets, dtype=torch.long, device=log_probs.device)[:, None])[:, 0]
    top1 = logits.argmax(dim=-1).to(torch.int32)
    # float16's lowest instead of -inf: exp() of it is 0, and 0 x it stays 0 in the KLD
    log_probs = log_probs.clamp_(min=float(np.finfo(LOG_PROB_DTYPE).min)).half()
    return log_probs.cpu().numpy(), nll.cpu().numpy(), top1.cpu().numpy()


def score_windows(model, windows: np.ndarray, device: str, write_log_probs: Callable[[np.ndarray], None],
                  progress=None, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-position NLL of the next token and the top-1 id from the model's own logits ([W, T-1]
    float32 and int32); each window's log-probs ([T-1, V] float16) go to `write_log_probs` in
    window order. `batch` windows at once."""
    import torch

    nll, top1 = [], []
    with torch.inference_mode():
        for first in range(0, len(windows), batch):
            ids = torch.as_tensor(np.asarray(windows[first:first + batch]), dtype=torch.long, device=device)
            batch_logits = model(ids).logits[:, :-1]
            for row in range(ids.shape[0]):
                logits, targets = batch_logits[row], ids[row, 1:]
                chunks = [stored_form(logits[start:start + POSITIONS_PER_CHUNK], targets[start:start + POSITIONS_PER_CHUNK])
                          for start in range(0, logits.shape[0], POSITIONS_PER_CHUNK)]
                write_log_probs(np.concatenate([chunk[0] for chunk in chunks]))
                nll.append(np.concatenate([chunk[1] for chunk in chunks]))
                top1.append(np.concatenate([chunk[2] for chunk in chunks]))
                if progress:
                    progress(first + row + 1)
            del batch_logits
    return np.stack(nll), np.stack(top1)


def write_scores(directory: Path, model, windows: np.ndarray, text_ids: list[int], device: str,
                 progress=None) -> Reference:
    """Score `windows` with `model` into `directory` (reference.npz and logprobs.npy), and
    return them as a ``Reference`` without its meta."""
    writer = LogProbsWriter(directory / LOG_PROBS_FILE, len(windows))
    try:
        batch = windows_per_batch(device, windows.shape[1], model.config.get_text_config().vocab_size)
        nll, top1 = score_windows(model, windows, device, writer.write, progress=progress, batch=batch)
    finally:
        writer.close()
    text_tokens = np.asarray(text_ids, dtype=np.int32)
    np.savez(directory / NPZ, tokens=windows, nll=nll.astype(np.float32), top1=top1.astype(np.int32),
             text_tokens=text_tokens)
    return Reference(tokens=windows, nll=nll, top1=top1, text_tokens=text_tokens, meta={}, directory=directory)


def memory_need(params: ReferenceParams, source_dir: Path, device: str) -> "memory.Need":
    """What the reference stage needs for the checkpoint at `source_dir` (``memory.Need``)."""
    from pipeline import memory

    return memory.Need(memory.REFERENCE, memory.ModelSize.of(source_dir), window_tokens=params.window_tokens,
                       dtype=params.dtype, device=device)


def disk_need(params: ReferenceParams, source_dir: Path) -> int:
    """Bytes of disk the reference's log-probs take (``log_probs_bytes``)."""
    from pipeline import memory

    return log_probs_bytes(params.windows, params.window_tokens, memory.ModelSize.of(source_dir).vocabulary)


def free_disk_bytes(out_dir: Path) -> int:
    """Free bytes on the disk that `out_dir` is (or will be) on."""
    existing = next(parent for parent in [Path(out_dir), *Path(out_dir).absolute().parents] if parent.exists())
    return shutil.disk_usage(existing).free


def ensure_disk(need_bytes: int, out_dir: Path) -> None:
    """Refuse (exit 3) before loading when the disk under `out_dir` cannot hold the log-probs."""
    free = free_disk_bytes(out_dir)
    if need_bytes > free:
        raise HostLacks(f"the reference's log-probs need {need_bytes / 1e9:.1f} GB of disk and {out_dir} has "
                        f"{free / 1e9:.1f} GB free", where="params.yaml: reference.windows / reference.window_tokens",
                        fix="free disk space, or lower reference.windows or reference.window_tokens (the file is "
                            "windows x (window_tokens - 1) x vocabulary x 2 bytes)")


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
    memory_record = memory.ensure_fits(need, stage=f"the reference in {params.dtype}", fix=fix)
    ensure_disk(disk_need(params, source_dir), out_dir)
    model = load_causal_lm(source_dir, dtype=dtype).to(device).eval()
    log(f"reference: scoring {params.windows} x {params.window_tokens} tokens with the unquantized "
        f"model ({str(dtype).removeprefix('torch.')}, {device})")
    from tqdm import tqdm

    with atomic_dir(out_dir) as staging:
        started = time.perf_counter()
        with tqdm(total=len(windows), desc="reference windows", unit="win", leave=False) as bar:
            scores = write_scores(staging, model, windows, text_ids, device, progress=lambda n: bar.update(1))
        elapsed = time.perf_counter() - started
        del model
        with scores.log_probs() as stored:
            nll, vocabulary = scores.nll, stored.vocabulary
        meta = {
            "windows": params.windows,
            "window_tokens": params.window_tokens,
            "vocabulary": vocabulary,
            "log_probs": {"file": LOG_PROBS_FILE, "dtype": "float16",
                          "bytes": log_probs_bytes(params.windows, params.window_tokens, vocabulary)},
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
