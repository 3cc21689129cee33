import subprocess

import pytest

from pipeline import versions

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(GIT + ["init", "-q"], check=True)
    (tmp_path / "a").write_text("1")
    subprocess.run(GIT + ["add", "a"], check=True)
    subprocess.run(GIT + ["commit", "-qm", "one"], check=True)
    return tmp_path


def release(recipe, version):
    return {"recipe": recipe, "version": version, "pushed": True, "location": f"oci://127.0.0.1:5000/m:{version}"}


def commit(repo, text):
    (repo / "a").write_text(text)
    subprocess.run(GIT + ["commit", "-qam", text], check=True)


def test_each_new_registry_version_gets_the_next_gto_version_and_a_known_one_none(repo):
    logged = []
    assert versions.register([release("gguf-q4_0", "sha256-aaa"), release("awq-w4a16", "sha256-bbb")],
                             log=logged.append) == ["gguf-q4_0@v0.0.1", "awq-w4a16@v0.0.1"]
    commit(repo, "2")
    assert versions.register([release("gguf-q4_0", "sha256-aaa"), release("awq-w4a16", "sha256-ccc")],
                             log=logged.append) == ["awq-w4a16@v0.0.2"]
    assert "gguf-q4_0 sha256-aaa: already versioned as gguf-q4_0@v0.0.1" in logged
    message = subprocess.run(["git", "tag", "-l", "--format=%(contents:subject)", "awq-w4a16@v0.0.2"],
                             capture_output=True, text=True).stdout.strip()
    assert message == "qpipe publish: sha256-ccc at oci://127.0.0.1:5000/m:sha256-ccc"
    # GTO itself reads them back as versions of the artifact
    shown = subprocess.run(["gto", "show", "awq-w4a16", "--json"], capture_output=True, text=True, check=True).stdout
    assert "v0.0.1" in shown and "v0.0.2" in shown
