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


def test_stale_partial_from_a_killed_run_is_cleared_and_said(tmp_path, capsys):
    import subprocess

    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid now names no process, as a kill -9'd stage's does
    (tmp_path / f".out.partial-{finished.pid}").mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"left by an interrupted run (process {finished.pid})" in capsys.readouterr().err


def test_a_running_stage_keeps_its_staging_directory(tmp_path):
    import os

    live = tmp_path / f".out.partial-{os.getppid()}"  # another process that is alive
    live.mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert live.is_dir()


def test_write_json_and_sha256(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert sha256_file(tmp_path / "a.json") == __import__("hashlib").sha256(b'{\n  "x": 1\n}\n').hexdigest()


def build_record(tmp_path, payload=b"GGUF" + bytes(60)):
    from pipeline.files import sha256_artifact

    (tmp_path / "model.gguf").write_bytes(payload)
    return {"recipe": "gguf-q4_0", "artifact": {"file": "model.gguf", "bytes": len(payload),
                                                 "sha256": sha256_artifact(tmp_path / "model.gguf")}}


def test_an_artifact_that_matches_its_build_record_passes(tmp_path):
    from pipeline.files import verify_artifact

    assert verify_artifact(tmp_path, build_record(tmp_path)) == tmp_path / "model.gguf"


import pytest  # noqa: E402


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:20]), "is 20 bytes and build.json records 64"),
    (lambda path: path.write_bytes(b"EVIL" + path.read_bytes()[4:]), "sha256 differs"),
    (lambda path: path.unlink(), "is missing"),
])
def test_a_truncated_edited_or_missing_artifact_is_named_with_the_rebuild(tmp_path, damage, message):
    from pipeline.errors import BadInput
    from pipeline.files import verify_artifact

    record = build_record(tmp_path)
    damage(tmp_path / "model.gguf")
    with pytest.raises(BadInput, match=message) as info:
        verify_artifact(tmp_path, record)
    assert info.value.exit_code == 2 and info.value.where.endswith("model.gguf")
    assert "dvc repro build@gguf-q4_0" in info.value.fix


def test_a_directory_artifact_is_checked_without_the_build_json_written_after_it(tmp_path):
    import json

    from pipeline.errors import BadInput
    from pipeline.files import artifact_bytes, sha256_artifact, verify_artifact

    (tmp_path / "model.safetensors").write_bytes(bytes(100))
    (tmp_path / "config.json").write_text("{}")
    record = {"recipe": "awq-w4a16", "artifact": {"file": ".", "bytes": artifact_bytes(tmp_path),
                                                   "sha256": sha256_artifact(tmp_path)}}
    (tmp_path / "build.json").write_text(json.dumps(record))  # as run_build writes it, after measuring
    assert verify_artifact(tmp_path, record) == tmp_path / "."
    (tmp_path / "config.json").write_text('{"edited": 1}')
    with pytest.raises(BadInput, match="bytes and build.json records"):
        verify_artifact(tmp_path, record)
