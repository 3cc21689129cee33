import json

import pytest

from pipeline import corpus
from pipeline.config import CorpusParams
from pipeline.errors import BadInput
from tests.conftest import write


def test_embedded_pydoc_texts_never_overlap(tmp_path):
    info = corpus.run(CorpusParams(), tmp_path / "corpus", log=lambda _: None)
    calibration = (tmp_path / "corpus" / "calibration.txt").read_text()
    evaluation = (tmp_path / "corpus" / "evaluation.txt").read_text()
    assert corpus.overlap(calibration, evaluation) == []
    assert info["evaluation_paragraphs_dropped"] > 0  # pydoc repeats sections across topics
    assert len(evaluation) > 100_000 and len(calibration) > 100_000
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text())["source"] == "embedded:pydoc"


def test_embedded_split_is_by_sorted_topic_key():
    from pydoc_data.topics import topics

    calibration, evaluation, origin = corpus.embedded_pydoc()
    keys = sorted(topics)
    assert calibration[0] == topics[keys[0]] and evaluation[-1] == topics[keys[-1]]
    assert len(calibration) + len(evaluation) == len(keys) == origin["topics"]


def test_shared_paragraphs_and_lines_are_removed_from_evaluation(tmp_path):
    shared = "This paragraph appears in both texts and is long enough to count."
    shared_line = "a line of forty or more characters shared by both files"
    write(tmp_path / "cal.txt", f"intro\n\n{shared}\n\nsomething else\n{shared_line}\n")
    write(tmp_path / "eval.jsonl", "\n".join(json.dumps({"text": t}) for t in [
        f"Unique evaluation paragraph one.\n\n{shared}", f"x\n{shared_line}", "Note:", "Unique two."]))
    params = CorpusParams(source="files", calibration_file=str(tmp_path / "cal.txt"),
                          evaluation_file=str(tmp_path / "eval.jsonl"))
    info = corpus.run(params, tmp_path / "out", log=lambda _: None)
    evaluation = (tmp_path / "out" / "evaluation.txt").read_text()
    assert shared not in evaluation and shared_line not in evaluation
    assert "Unique evaluation paragraph one." in evaluation and "Unique two." in evaluation
    assert info["evaluation_paragraphs_dropped"] == 2


def test_missing_text_file_is_bad_input(tmp_path):
    params = CorpusParams(source="files", calibration_file=str(tmp_path / "none.txt"),
                          evaluation_file=str(tmp_path / "none.txt"))
    with pytest.raises(BadInput, match="not found") as info:
        corpus.run(params, tmp_path / "out", log=lambda _: None)
    assert "corpus.calibration_file" in info.value.where
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_names_line_number(tmp_path):
    write(tmp_path / "cal.txt", "calibration")
    write(tmp_path / "eval.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n')
    params = CorpusParams(source="files", calibration_file=str(tmp_path / "cal.txt"),
                          evaluation_file=str(tmp_path / "eval.jsonl"))
    with pytest.raises(BadInput) as info:
        corpus.run(params, tmp_path / "out", log=lambda _: None)
    assert info.value.where.endswith("eval.jsonl:2")


def test_evaluation_equal_to_calibration_is_empty_and_refused(tmp_path):
    text = "The same paragraph in both files, long enough to count as overlap."
    write(tmp_path / "a.txt", text)
    params = CorpusParams(source="files", calibration_file=str(tmp_path / "a.txt"),
                          evaluation_file=str(tmp_path / "a.txt"))
    with pytest.raises(BadInput, match="evaluation text is empty"):
        corpus.run(params, tmp_path / "out", log=lambda _: None)


def test_unknown_source(tmp_path):
    with pytest.raises(BadInput, match="unknown corpus source"):
        corpus.run(CorpusParams(source="wiki"), tmp_path / "out", log=lambda _: None)


def test_short_calibration_text_says_how_many_samples_fit(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = write(tmp_path / "short.txt", "word1 token2 . " * 10)
    with pytest.raises(BadInput, match="has 30 tokens; 4 samples x 16 tokens need 64") as info:
        corpus.calibration_windows(tokenizer, text, 4, 16, "r")
    assert "at most 1 samples" in info.value.fix
    windows = corpus.calibration_windows(tokenizer, text, 3, 8, "r")
    assert [len(w) for w in windows] == [8, 8, 8]


def files_params(tmp_path, evaluation_name):
    write(tmp_path / "cal.txt", "calibration text\n")
    return CorpusParams(source="files", calibration_file=str(tmp_path / "cal.txt"),
                        evaluation_file=str(tmp_path / evaluation_name))


def refused(params, tmp_path, match):
    with pytest.raises(BadInput, match=match) as info:
        corpus.run(params, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    return info.value


def test_an_evaluation_file_that_is_not_utf8_names_the_file_its_key_and_the_byte(tmp_path):
    (tmp_path / "eval.txt").write_bytes(b"\xf9\x00binary\x00" * 4)
    error = refused(files_params(tmp_path, "eval.txt"), tmp_path, "a binary file, not UTF-8 text: byte 0xf9 at byte offset 0")
    assert error.where == f"{tmp_path / 'eval.txt'} (params.yaml: corpus.evaluation_file)"
    before = b'{"text": "fine"}\n{"text": "caf'
    (tmp_path / "eval.jsonl").write_bytes(before + b'\xe9"}\n')
    error = refused(files_params(tmp_path, "eval.jsonl"), tmp_path,
                    f"byte 0xe9 at byte offset {len(before)} \\(line 2\\)")
    assert "eval.jsonl" in error.where


@pytest.mark.parametrize("line, message", [
    ('{"text": null}', "'text' field is null, not a string"),
    ('{"text": 42}', "'text' field is int, not a string"),
    ('{"text": "a \\ud800 b"}', "lone surrogate \\\\ud800 at character 2"),
    ('["text"]', "not a JSON object with a 'text' field"),
])
def test_a_jsonl_text_field_must_be_a_string_of_characters(tmp_path, line, message):
    write(tmp_path / "eval.jsonl", '{"text": "fine"}\n' + line + "\n")
    error = refused(files_params(tmp_path, "eval.jsonl"), tmp_path, message)
    assert error.where == f"{tmp_path / 'eval.jsonl'}:2"
