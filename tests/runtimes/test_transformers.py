import numpy as np

from pipeline.runtimes import transformers as runtime


def test_window_logits_score_the_directory_as_written(tiny_llama):
    windows = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=np.int32)
    with runtime.open_session(tiny_llama, threads=1) as session:
        logits = list(session.window_logits(windows))
        assert (session.runtime, session.device) == (runtime.name(), "cpu")
    assert session.model is None  # closed: the model is released
    assert [x.shape for x in logits] == [(5, 130), (5, 130)]
    assert logits[0].dtype == np.float32 and not np.allclose(logits[0], logits[1])


def test_tokenize_uses_the_directory_tokenizer(tiny_llama):
    import json

    vocab = json.loads((tiny_llama / "tokenizer.json").read_text())["model"]["vocab"]
    assert runtime.tokenize(tiny_llama, "word1 token2 . unseen") == [vocab["word1"], vocab["token2"], vocab["."], 0]


def test_name_says_what_ran():
    assert runtime.name().startswith("transformers ") and "decompressed to dense" in runtime.name()
    assert runtime.unavailable_reason() is None


def test_greedy_generation_follows_the_argmax_of_its_own_logits(tiny_llama):
    session = runtime.open_session(tiny_llama, threads=1)
    (produced,) = session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[])
    assert len(produced) == 5
    sequence = [1, 2, 3]
    for token in produced:
        (logits,) = session.window_logits([sequence])
        assert token == int(logits[-1].argmax())
        sequence.append(token)
    stop = produced[-1]  # generation ends at its first occurrence, which is kept
    assert next(session.generate([[1, 2, 3]], max_tokens=5, stop_ids=[stop])) == produced[:produced.index(stop) + 1]
