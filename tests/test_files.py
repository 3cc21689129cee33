import pytest

from pipeline.files import atomic_dir, sha256_file, write_json


def test_atomic_dir_renames_into_place(tmp_path):
    with atomic_dir(tmp_path / "out") as staging:
        (staging / "a").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a").read_text() == "x"


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_previous(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as staging:
            (staging / "half").write_text("half-written")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (final / "old").read_text() == "previous"


def test_stale_partial_from_a_killed_run_is_cleared(tmp_path):
    (tmp_path / ".out.partial-99999").mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_and_sha256(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert sha256_file(tmp_path / "a.json") == __import__("hashlib").sha256(b'{\n  "x": 1\n}\n').hexdigest()
