"""An lm-evaluation-harness model over a qpipe runtime: ``RuntimeLM`` implements lm-eval's
``LM`` interface (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) on two
calls of the runtime that scores the artifact: the logits of token windows, and greedy
generation.

Requests are tokenized as lm-eval's own HFLM tokenizes them (lm_eval/models/huggingface.py
and api/model.py ``TemplateLM``: context and continuation encoded whole and split, trailing
context spaces moved to the continuation, the tokenizer's default special tokens, an empty
context replaced by the BOS or EOS token), always with the source checkpoint's tokenizer, so
the unquantized model and every artifact are fed the same ids. Generation is greedy and cut
at lm-eval's stop sequences (``until`` plus the EOS text) and at the checkpoint's stop ids.

Imported only by the task gate, which runs where lm-eval is installed (the ``tasks`` extra).
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from pipeline.errors import BadInput

# lm-eval's own default when a task names no max_gen_toks (HFLM.max_gen_toks)
DEFAULT_MAX_GEN_TOKS = 256


class RuntimeLM(TemplateLM):
    """lm-eval's model interface over an open runtime session (``runtimes.Session``: its
    ``window_logits`` and ``generate``); `max_length` bounds every request's tokens."""

    def __init__(self, runtime, tokenizer, *, max_length: int, stop_ids: list[int]) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise BadInput("the source tokenizer has no EOS token, which lm-eval's requests need",
                           where="artifacts/source/tokenizer_config.json", fix="set eos_token in the checkpoint")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.stop_ids = sorted(set(stop_ids) | {tokenizer.eos_token_id})

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's default, unless the text already starts with BOS
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each continuation's summed log-prob after its context, and whether every one of its
        tokens is the argmax (lm-eval's is_greedy). Contexts are cut from the left to fit."""
        windows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in requests]
        scored = self.runtime.window_logits(windows)
        results = []
        for (key, _, continuation), window, logits in tqdm(zip(requests, windows, scored), total=len(requests),
                                                           desc="loglikelihood", leave=False, disable=disable_tqdm):
            target = np.asarray(continuation, dtype=np.int64)
            rows = np.asarray(logits[len(window) - len(target):len(window)], dtype=np.float64)
            log_probs = rows - rows.max(axis=-1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
            result = (float(log_probs[np.arange(len(target)), target].sum()),
                      bool((rows.argmax(axis=-1) == target).all()))
            results.append(result)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of `max_length` (lm-eval's rolling windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pieces, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                context, continuation = make_disjoint_window(window)
                pieces.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(pieces, disable_tqdm=disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop id and then at lm-eval's stop sequences;
        requests are run in groups of equal max_gen_toks."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos_text = self.tokenizer.decode([self.eot_token_id])
        prompts, stops, groups = [], [], {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            max_tokens = int(settings["max_gen_toks"])
            if max_tokens >= self.max_length:
                raise BadInput(f"task {request.task_name} asks for {max_tokens} generated tokens, as many as the "
                               f"{self.max_length}-token context the gate runs", where=f"{request.task_name}: "
                               "generation_kwargs.max_gen_toks", fix="lower max_gen_toks")
            prompts.append(self.tok_encode(context)[-(self.max_length - max_tokens):])
            stops.append(handle_stop_sequences(settings.get("until"), eos=eos_text))
            groups.setdefault(max_tokens, []).append(index)
        answers = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", leave=False, disable=disable_tqdm) as bar:
            for max_tokens, members in groups.items():
                produced = self.runtime.generate([prompts[i] for i in members], max_tokens=max_tokens,
                                                 stop_ids=self.stop_ids)
                for index, ids in zip(members, produced):
                    ids = list(ids)
                    cut = next((at for at, token in enumerate(ids) if token in self.stop_ids), len(ids))
                    text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
                    answers[index] = postprocess_generated_text(text, stops[index], None)
                    self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
                    bar.update(1)
        return answers
