"""The needle probe's documents: long-context retrieval that needs no Hub.

A seven-digit "special magic number" (RULER's needle, in RULER's wording) is inserted at several
depths of a context cut from the evaluation text, and the document asks for it back. The task
(tasks/qpipe_needle.yaml, lm-eval's own YAML format) scores the number as a log-likelihood
continuation: `acc` is whether every digit is the model's greedy choice, so a KV cache that
loses what it stored far back shows as retrievals lost against the unquantized model's.

lm-eval builds the documents by calling ``documents`` (the YAML's ``custom_dataset``) with its
``dataset_kwargs``: the context length in tokens of the source checkpoint's tokenizer, the
depths (fractions of the haystack before the needle) and the documents per depth. Each
document takes its haystack from another stretch of the evaluation text, so the documents
differ in more than their number.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text? " \
           "The special magic number for {key} mentioned in the provided text is"
KEYS = ("amber-falcon", "silent-river", "copper-lantern", "hollow-oak", "velvet-comet", "granite-harbor",
        "paper-tiger", "crimson-meadow", "lunar-anchor", "quiet-forge")
SEED = 0


def documents(*, context_tokens: int = 4096, depths: list[float] = (0.1, 0.3, 0.5, 0.7, 0.9), per_depth: int = 4,
              evaluation_text: str = "artifacts/corpus/evaluation.txt", tokenizer: str = "artifacts/source",
              **_metadata):
    """{"test": Dataset} of per_depth rounds of one document at each depth (so that a task
    `limit` keeps every depth): `context`
    (at most `context_tokens` tokens, with the answer), `answer` (the number, lm-eval's target
    after a space), `depth`, `key`."""
    import datasets
    from transformers import AutoTokenizer

    from pipeline.errors import BadInput

    tokenizer_of = AutoTokenizer.from_pretrained(tokenizer)

    def count(text: str) -> int:
        return len(tokenizer_of(text, add_special_tokens=False)["input_ids"])

    text_ids = tokenizer_of(Path(evaluation_text).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    picks = random.Random(SEED)
    rows: list[dict[str, Any]] = []
    for _ in range(per_depth):
        for depth in depths:
            key, value = KEYS[len(rows) % len(KEYS)], str(picks.randrange(1_000_000, 10_000_000))
            needle, question = NEEDLE.format(key=key, value=value), QUESTION.format(key=key)
            # the pieces' own tokens, the answer's and one more each side of the needle where a seam
            # merges differently
            haystack = context_tokens - count(PREFIX) - count(needle) - count(question) - count(" " + value) - 4
            if haystack < 16:
                raise BadInput(f"a {context_tokens}-token needle context leaves no room for a haystack",
                               where="tasks/qpipe_needle.yaml: dataset_kwargs.context_tokens", fix="raise it")
            if len(text_ids) < haystack:
                raise BadInput(f"the evaluation text has {len(text_ids)} tokens, fewer than a {haystack}-token "
                               "haystack", where=evaluation_text, fix="lower context_tokens or use a longer text")
            start = (len(rows) * haystack) % (len(text_ids) - haystack + 1)
            stretch = text_ids[start:start + haystack]
            cut = round(depth * haystack)
            before = tokenizer_of.decode(stretch[:cut], clean_up_tokenization_spaces=False)
            after = tokenizer_of.decode(stretch[cut:], clean_up_tokenization_spaces=False)
            context = f"{PREFIX}{before}\n{needle}\n{after}{question}"
            rows.append({"context": context, "answer": value, "depth": depth, "key": key})
    return {"test": datasets.Dataset.from_list(rows)}
