"""Publishing: selection, staging (card, provenance, checksums) and the directory registry.
The OCI registry has its own tests with a real registry server (tests/registries/test_oci.py)."""

import json
import shutil

import pytest

from pipeline import layout, publish, registries
from pipeline.errors import BadInput, QpipeError
from pipeline.files import sha256_artifact
from tests.conftest import write
from tests.test_report import gate_result


@pytest.fixture
def gated(project):
    """Two gated GGUF builds (a pass and a fail) with real files, in a project directory."""
    write(layout.SOURCE_DIR / "source.json", json.dumps({
        "origin": {"kind": "embedded", "id": "embedded:smollm2-135m", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "files": {"model.safetensors": "ab" * 32}}))
    for name, verdict in (("gguf-q8_0", "pass"), ("gguf-q4_0", "fail")):
        build_dir = layout.build_dir(name)
        write(build_dir / "model.gguf", f"GGUF bytes of {name}")
        sha = sha256_artifact(build_dir / "model.gguf")
        size = (build_dir / "model.gguf").stat().st_size
        write(build_dir / "build.json", json.dumps({
            "recipe": name, "format": "gguf", "artifact": {"file": "model.gguf", "bytes": size, "sha256": sha},
            "source": {"sha256": "cd" * 32}, "tools": {"llama_cpp_python": "0.3.36"},
            "resolved_recipe": {"format": "gguf", "type": name.split("-")[1].upper(), "description": "d", "gates": {}}}))
        result = gate_result(name, 0.01, 80.0, verdict=verdict)
        result.update(artifact={"bytes": size, "sha256": sha, "bits_per_weight": 8.5}, checks=[], host={"cpu": "x"},
                      reasons=[] if verdict == "pass" else ["max_mean_kld: mean_kld 0.3 vs limit 0.1"])
        result["accuracy"]["ci95"] = {"mean_kld": {"low": 0.009, "high": 0.0112}}
        result["speed"]["spread"] = {"decode_tok_s": {"stdev": 1.25}}
        write(layout.gate_file(name), json.dumps(result))
    return project


RECIPES = ["gguf-q8_0", "gguf-q4_0"]


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(BadInput, match="unknown registry 's3://bucket'") as info:
        publish.registry("s3://bucket")
    assert "dir://PATH" in info.value.fix and "oci://" in info.value.fix and "hf://" in info.value.fix


def test_publishing_before_any_gate_ran_is_refused(project):
    with pytest.raises(BadInput, match="no gate results to publish"):
        publish.run(f"dir://{project}/registry", RECIPES, include_failed=False, log=lambda _: None)


def test_directory_publish_refuses_failed_then_is_a_no_op_the_second_time(gated, tmp_path):
    messages = []
    root = tmp_path / "registry"
    first = publish.run(f"dir://{root}", RECIPES, include_failed=False, log=messages.append)
    assert [(e["recipe"], e["pushed"]) for e in first] == [("gguf-q8_0", True)]
    assert any(m.startswith("refused gguf-q4_0: verdict fail (max_mean_kld") for m in messages)
    version = first[0]["version"]
    folder = root / "SmolLM2-135M-Instruct" / "gguf-q8_0" / version
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "SHA256SUMS", "build.json", "model.gguf",
                                                       "provenance.json"]
    sums = registries.read_sums((folder / "SHA256SUMS").read_text())
    assert set(sums) == {"README.md", "build.json", "model.gguf", "provenance.json"}
    index = json.loads((root / "index.json").read_text())
    assert [(v["recipe"], v["version"]) for v in index["versions"]] == [("gguf-q8_0", version)]
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["gate"]["verdict"] == "pass" and provenance["source"]["sha256"] == "cd" * 32
    assert "commit" in provenance["pipeline"] and provenance["resolved_recipe"]["type"] == "Q8_0"

    again = publish.run(f"dir://{root}", RECIPES, include_failed=False, log=messages.append)
    assert [e["pushed"] for e in again] == [False]
    assert messages[-1].endswith("already in dir://" + str(root) + ", nothing to do")


def test_include_failed_publishes_the_failed_one_too(gated, tmp_path):
    published = publish.run(f"dir://{tmp_path}/r", RECIPES, include_failed=True, log=lambda _: None)
    assert [e["recipe"] for e in published] == RECIPES


def test_nothing_passing_is_an_error_naming_them(gated, tmp_path):
    with pytest.raises(QpipeError, match="nothing to publish: gguf-q4_0 did not pass"):
        publish.run(f"dir://{tmp_path}/r", ["gguf-q4_0"], include_failed=False, log=lambda _: None)


def test_interrupted_publish_leaves_no_version_and_a_retry_completes(gated, tmp_path, monkeypatch):
    root = tmp_path / "registry"
    real_copytree = shutil.copytree
    from pipeline.registries import directory

    def dies_midway(source, target, **kwargs):
        if not str(target).startswith(str(root)):
            return real_copytree(source, target, **kwargs)  # staging, before the registry
        write(target / "model.gguf", "half")
        raise KeyboardInterrupt

    monkeypatch.setattr(directory.shutil, "copytree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        publish.run(f"dir://{root}", RECIPES, include_failed=False, log=lambda _: None)
    model_dir = root / "SmolLM2-135M-Instruct" / "gguf-q8_0"
    assert list(model_dir.iterdir()) == [] and not (root / "index.json").exists()
    monkeypatch.setattr(directory.shutil, "copytree", real_copytree)
    assert publish.run(f"dir://{root}", RECIPES, include_failed=False, log=lambda _: None)[0]["pushed"] is True


def test_a_damaged_published_copy_is_detected(gated, tmp_path):
    root = tmp_path / "registry"
    entry = publish.run(f"dir://{root}", RECIPES, include_failed=False, log=lambda _: None)[0]
    write(root / "SmolLM2-135M-Instruct" / "gguf-q8_0" / entry["version"] / "model.gguf", "flipped bits")
    from pipeline.registries.directory import DirectoryRegistry

    sums = registries.read_sums((root / "SmolLM2-135M-Instruct" / "gguf-q8_0" / entry["version"] / "SHA256SUMS").read_text())
    release = registries.Release("SmolLM2-135M-Instruct", "gguf-q8_0", entry["version"], "gguf", tmp_path)
    with pytest.raises(QpipeError, match=r"different \['model.gguf'\]"):
        DirectoryRegistry(root).verify(release, sums)


def test_a_build_changed_after_its_gate_is_refused(gated, tmp_path):
    write(layout.build_dir("gguf-q8_0") / "build.json",
          layout.build_dir("gguf-q8_0").joinpath("build.json").read_text().replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(BadInput, match="changed after its gate ran"):
        publish.run(f"dir://{tmp_path}/r", RECIPES, include_failed=False, log=lambda _: None)


def test_a_truncated_artifact_is_named_before_anything_is_published(gated, tmp_path):
    artifact = layout.build_dir("gguf-q8_0") / "model.gguf"
    artifact.write_bytes(artifact.read_bytes()[:5])
    with pytest.raises(BadInput, match="is 5 bytes and build.json records") as info:
        publish.run(f"dir://{tmp_path}/r", RECIPES, include_failed=False, log=lambda _: None)
    assert info.value.where == str(artifact)
    assert not (tmp_path / "r").exists()


def test_model_card_front_matter_follows_the_hub_convention(gated, tmp_path):
    from huggingface_hub import ModelCard

    release = publish.stage_release(json.loads(layout.gate_file("gguf-q8_0").read_text()), tmp_path)
    card = ModelCard.load(release.folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "quantized" and data["library_name"] == "gguf"
    assert {"quantized", "gguf", "llama.cpp"} <= set(data["tags"])
    assert data["quantization"]["type"] == "Q8_0" and data["quantization"]["bits_per_weight"] == 8.5
    assert "| mean KLD vs unquantized (full vocabulary) | 0.0100 (95 % CI 0.0090–0.0112) | r |" in card.text
    assert "| decode tok/s (batch 1) | 80.0 ± 1.2 sd | r |" in card.text
    publish.validate_card(release.folder / "README.md")


def test_unparseable_card_fails_validation(tmp_path):
    path = write(tmp_path / "README.md", "---\nbase_model: [unclosed\n---\n# x\n")
    with pytest.raises(Exception):
        publish.validate_card(path)


def test_hub_needs_a_token_from_the_environment(gated, monkeypatch):
    from pipeline.registries.hub import HubRegistry

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(BadInput, match="no Hugging Face token") as info:
        HubRegistry("team/model")._api()
    assert "HF_TOKEN" in info.value.fix
    with pytest.raises(BadInput, match="not a Hub repository id"):
        HubRegistry("just-a-name")


def test_hub_push_uploads_the_staged_folder_in_one_commit(gated, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from pipeline.registries.hub import HubRegistry

    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    release = publish.stage_release(json.loads(layout.gate_file("gguf-q8_0").read_text()), tmp_path)
    HubRegistry("team/model").push(release)
    upload = calls["upload"]
    assert calls["create"] == "team/model" and upload["repo_id"] == "team/model"
    assert upload["path_in_repo"] == "gguf-q8_0" and upload["folder_path"] == str(release.folder)
    assert release.version in upload["commit_message"]
    staged = {p.name for p in release.folder.iterdir()}
    assert {"README.md", "SHA256SUMS", "provenance.json", "model.gguf"} <= staged
    assert not any("hf_secret_value" in p.read_text(errors="ignore") for p in release.folder.iterdir())
