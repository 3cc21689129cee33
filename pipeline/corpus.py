"""Calibration text and evaluation text, disjoint.

Sources (params `corpus.source`):
- ``embedded:pydoc`` (default): CPython's ``pydoc_data.topics``, topic keys sorted; the first
  half of the topics is calibration text, the second half evaluation text.
- ``files``: ``corpus.calibration_file`` and ``corpus.evaluation_file``, each .txt (the whole
  file) or .jsonl (one JSON object per line, text under ``corpus.text_field``).
- ``hf:<dataset id>``: a Hugging Face dataset (needs the `datasets` package and network),
  splits ``corpus.hf_calibration_split`` / ``corpus.hf_evaluation_split``.

Overlap rule: the texts are split into paragraphs (blank-line separated). An evaluation
paragraph is dropped when it also appears in the calibration text (32+ characters) or
shares a line of 40+ characters with it. pydoc's topics repeat whole sections across
topics, so this matters even for the embedded text; corpus.json records what was dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import CorpusParams, read_text
from pipeline.errors import BadInput, HostLacks
from pipeline.files import atomic_dir, sha256_file

MIN_SHARED_PARAGRAPH = 32
MIN_SHARED_LINE = 40


def paragraphs(documents: list[str]) -> list[str]:
    return [p.strip() for doc in documents for p in doc.split("\n\n") if p.strip()]


def long_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_SHARED_LINE}


def remove_overlap(calibration: list[str], evaluation: list[str]) -> tuple[list[str], list[str], int]:
    """Paragraphs of both texts, with evaluation paragraphs that overlap calibration removed."""
    calibration_paragraphs = paragraphs(calibration)
    calibration_set = {p for p in calibration_paragraphs if len(p) >= MIN_SHARED_PARAGRAPH}
    calibration_lines = long_lines("\n".join(calibration_paragraphs))
    kept, dropped = [], 0
    for paragraph in paragraphs(evaluation):
        if paragraph in calibration_set or long_lines(paragraph) & calibration_lines:
            dropped += 1
        else:
            kept.append(paragraph)
    return calibration_paragraphs, kept, dropped


def overlap(calibration_text: str, evaluation_text: str) -> list[str]:
    """Evaluation paragraphs or long lines also present in the calibration text."""
    calibration_paragraphs = {p for p in paragraphs([calibration_text]) if len(p) >= MIN_SHARED_PARAGRAPH}
    calibration_lines = long_lines(calibration_text)
    found = []
    for paragraph in paragraphs([evaluation_text]):
        if paragraph in calibration_paragraphs:
            found.append(paragraph)
        found += sorted(long_lines(paragraph) & calibration_lines)
    return found


def embedded_pydoc() -> tuple[list[str], list[str], dict[str, Any]]:
    import sys

    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    origin = {"source": "embedded:pydoc", "python": sys.version.split()[0], "topics": len(keys),
              "calibration_topics": half, "evaluation_topics": len(keys) - half}
    return [topics[k] for k in keys[:half]], [topics[k] for k in keys[half:]], origin


def read_documents(path_text: str | None, key: str, text_field: str) -> list[str]:
    """The documents of a .txt file (the whole file) or a .jsonl file (one object a line, its text
    a string under `text_field`), read as UTF-8 (``config.read_text``)."""
    if not path_text:
        raise BadInput(f"corpus.source is 'files' but {key} is not set", where=f"params.yaml: {key}",
                       fix=f"set {key} to a .txt or .jsonl file")
    path = Path(path_text)
    if not path.is_file():
        raise BadInput("text file not found", where=f"params.yaml: {key} = {path}", fix="point it at an existing file")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(read_text(path, f"params.yaml: {key}").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                raise BadInput(f"line is not a JSON object with a {text_field!r} field",
                               where=f"{path}:{number}", fix="fix the line or set corpus.text_field") from None
            documents.append(record_text(text, text_field, f"{path}:{number}"))
        return documents
    if path.suffix in (".txt", ".md", ""):
        return [read_text(path, f"params.yaml: {key}")]
    raise BadInput(f"unsupported text file type {path.suffix!r}", where=f"params.yaml: {key}",
                   fix="use a .txt or .jsonl file")


def record_text(value: Any, text_field: str, where: str) -> str:
    """A JSONL line's or a dataset row's text: a string whose characters all encode (JSON's \\u escapes can write a
    lone surrogate, which no file can hold); a number or null is refused, not turned into text."""
    if not isinstance(value, str):
        raise BadInput(f"the {text_field!r} field is {type(value).__name__ if value is not None else 'null'}, "
                       "not a string", where=where, fix="give each line's text as a JSON string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(f"the {text_field!r} field holds a lone surrogate \\u{ord(value[exc.start]):04x} at character "
                       f"{exc.start}, which is no character", where=where,
                       fix="write the character itself, or its surrogate pair") from None
    return value


def hf_dataset(params: CorpusParams) -> tuple[list[str], list[str], dict[str, Any]]:
    dataset_id = params.source.removeprefix("hf:")
    try:
        import datasets
    except ImportError:
        raise HostLacks("corpus.source names a Hugging Face dataset but `datasets` is not installed",
                        fix="pip install datasets, or use embedded:pydoc / files") from None
    try:
        loaded = datasets.load_dataset(dataset_id, params.hf_config)
    except Exception as exc:  # offline, unknown id, auth: datasets raises many types
        raise BadInput(f"dataset {dataset_id!r} could not be loaded ({type(exc).__name__}: {exc})",
                       where="params.yaml: corpus.source",
                       fix="check the id and network access, or use `files` with local text") from None
    texts = []
    for split in (params.hf_calibration_split, params.hf_evaluation_split):
        if split not in loaded:
            raise BadInput(f"dataset has no split {split!r} (has {', '.join(loaded)})",
                           where="params.yaml: corpus.hf_*_split", fix="name an existing split")
        texts.append([record_text(row[params.text_field], params.text_field, f"{dataset_id} split {split} row {index}")
                      for index, row in enumerate(loaded[split])])
    return texts[0], texts[1], {"source": params.source, "config": params.hf_config}


def run(params: CorpusParams, out_dir: Path, log=print) -> dict[str, Any]:
    if params.source == "embedded:pydoc":
        calibration, evaluation, origin = embedded_pydoc()
    elif params.source == "files":
        calibration = read_documents(params.calibration_file, "corpus.calibration_file", params.text_field)
        evaluation = read_documents(params.evaluation_file, "corpus.evaluation_file", params.text_field)
        origin = {"source": "files", "calibration_file": params.calibration_file,
                  "evaluation_file": params.evaluation_file}
    elif params.source.startswith("hf:"):
        calibration, evaluation, origin = hf_dataset(params)
    else:
        raise BadInput(f"unknown corpus source {params.source!r}", where="params.yaml: corpus.source",
                       fix="use embedded:pydoc, files, or hf:<dataset id>")

    calibration_paragraphs, evaluation_paragraphs, dropped = remove_overlap(calibration, evaluation)
    calibration_text = "\n\n".join(calibration_paragraphs) + "\n"
    evaluation_text = "\n\n".join(evaluation_paragraphs) + "\n"
    if not evaluation_paragraphs:
        raise BadInput("the evaluation text is empty (after removing paragraphs shared with calibration)",
                       where="params.yaml: corpus", fix="provide an evaluation text distinct from the calibration text")
    if not calibration_paragraphs:
        raise BadInput("the calibration text is empty", where="params.yaml: corpus", fix="provide calibration text")
    log(f"corpus: {len(calibration_text):,} calibration chars, {len(evaluation_text):,} evaluation chars; "
        f"{dropped} evaluation paragraphs dropped for overlapping calibration")

    with atomic_dir(out_dir) as staging:
        (staging / "calibration.txt").write_text(calibration_text)
        (staging / "evaluation.txt").write_text(evaluation_text)
        info = {
            **origin,
            "calibration": {"chars": len(calibration_text), "paragraphs": len(calibration_paragraphs),
                            "sha256": sha256_file(staging / "calibration.txt")},
            "evaluation": {"chars": len(evaluation_text), "paragraphs": len(evaluation_paragraphs),
                           "sha256": sha256_file(staging / "evaluation.txt")},
            "overlap_rule": f"evaluation paragraphs equal to a calibration paragraph ({MIN_SHARED_PARAGRAPH}+ chars) "
                            f"or sharing a {MIN_SHARED_LINE}+ char line with it are dropped",
            "evaluation_paragraphs_dropped": dropped,
        }
        (staging / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def calibration_windows(tokenizer, text_path: Path, samples: int, seq_len: int, where: str) -> list[list[int]]:
    """`samples` consecutive windows of `seq_len` token ids from the calibration text."""
    ids = tokenizer(Path(text_path).read_text(), add_special_tokens=False)["input_ids"]
    need = samples * seq_len
    if len(ids) < need:
        raise BadInput(
            f"the calibration text has {len(ids)} tokens; {samples} samples x {seq_len} tokens need {need}",
            where=where,
            fix=f"use at most {len(ids) // seq_len} samples of {seq_len} tokens, or a longer calibration text "
                "(params.yaml: corpus)",
        )
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(samples)]
