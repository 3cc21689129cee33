"""Publishing to a real OCI registry on loopback: push, pull back, verify, re-push as a no-op,
an interrupted push, unreachable and refusing registries."""

import json

import pytest
import requests

from pipeline import publish, registries
from pipeline.errors import BadInput, HostLacks
from pipeline.registries import oci
from tests.test_publish import RECIPES, gated  # noqa: F401 (fixture)


def tags(address, repository):
    response = requests.get(f"http://{address}/v2/{repository}/tags/list", timeout=5)
    return [] if response.status_code == 404 else (response.json().get("tags") or [])


def test_push_pull_verify_and_push_again(gated, oci_registry):  # noqa: F811
    url = f"oci://{oci_registry}/team/smollm2"
    first = publish.run(url, RECIPES, include_failed=False, log=lambda _: None)
    assert [(e["recipe"], e["pushed"]) for e in first] == [("gguf-q8_0", True)]
    tag = f"gguf-q8_0-{first[0]['version']}"
    assert tags(oci_registry, "team/smollm2") == [tag]

    manifest = requests.get(f"http://{oci_registry}/v2/team/smollm2/manifests/{tag}", timeout=5,
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert manifest["artifactType"] == "application/vnd.qpipe.model.gguf.v1" and manifest["config"]["mediaType"] == oci.CONFIG_MEDIA_TYPE
    layers = {l["annotations"][oci.TITLE]: l["mediaType"] for l in manifest["layers"]}
    assert layers["model.gguf"] == "application/vnd.docker.ai.gguf.v3"
    assert layers["build.json"] == "application/vnd.docker.ai.model.file"
    assert all(l["annotations"][oci.FILE_PATH] == l["annotations"][oci.TITLE] for l in manifest["layers"])
    assert set(layers) == {"README.md", "SHA256SUMS", "build.json", "model.gguf", "provenance.json"}
    config = requests.get(f"http://{oci_registry}/v2/team/smollm2/blobs/{manifest['config']['digest']}", timeout=5).json()
    assert config["verdict"] == "pass" and config["recipe"] == "gguf-q8_0"

    # pulled back with ORAS itself, file by file
    from oras.provider import Registry

    registry = Registry(hostname=oci_registry, insecure=True)
    pulled = registry.pull(target=f"{oci_registry}/team/smollm2:{tag}", outdir=str(gated / "pulled"))
    sums = registries.read_sums((gated / "pulled" / "SHA256SUMS").read_text())
    registries.verify_files({name: gated / "pulled" / name for name in sums}, sums, where="pulled")
    assert len(pulled) == 5

    again = publish.run(url, RECIPES, include_failed=False, log=lambda _: None)
    assert [e["pushed"] for e in again] == [False]
    assert tags(oci_registry, "team/smollm2") == [tag]


def test_interrupted_push_leaves_no_tag_and_a_retry_completes(gated, oci_registry, monkeypatch):  # noqa: F811
    from oras.provider import Registry

    real_upload_manifest = Registry.upload_manifest

    def dies_before_the_manifest(self, manifest, container):
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "upload_manifest", dies_before_the_manifest)
    url = f"oci://{oci_registry}/team/smollm2"
    with pytest.raises(KeyboardInterrupt):
        publish.run(url, RECIPES, include_failed=False, log=lambda _: None)
    assert tags(oci_registry, "team/smollm2") == []
    monkeypatch.setattr(Registry, "upload_manifest", real_upload_manifest)
    assert publish.run(url, RECIPES, include_failed=False, log=lambda _: None)[0]["pushed"] is True
    assert len(tags(oci_registry, "team/smollm2")) == 1


def test_unreachable_registry_names_the_host(gated):  # noqa: F811
    from tests.registries.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(HostLacks, match=f"cannot reach the OCI registry at {address}"):
        publish.run(f"oci://{address}/team/model", RECIPES, include_failed=False, log=lambda _: None)


def test_refused_authentication_names_the_variables_and_no_secret(gated, oci_registry_with_auth, monkeypatch):  # noqa: F811
    url = f"oci://{oci_registry_with_auth}/team/smollm2"
    monkeypatch.delenv(oci.USER_VARIABLE, raising=False)
    monkeypatch.delenv(oci.PASSWORD_VARIABLE, raising=False)
    with pytest.raises(BadInput, match="refused an anonymous push") as info:
        publish.run(url, RECIPES, include_failed=False, log=lambda _: None)
    assert oci.USER_VARIABLE in info.value.fix and oci.PASSWORD_VARIABLE in info.value.fix
    monkeypatch.setenv(oci.USER_VARIABLE, "pusher")
    monkeypatch.setenv(oci.PASSWORD_VARIABLE, "wrong-password")
    with pytest.raises(BadInput, match="refused the credentials") as info:
        publish.run(url, RECIPES, include_failed=False, log=lambda _: None)
    assert "wrong-password" not in info.value.one_line()
    monkeypatch.setenv(oci.PASSWORD_VARIABLE, "right-password")
    assert publish.run(url, RECIPES, include_failed=False, log=lambda _: None)[0]["pushed"] is True


def test_address_errors():
    with pytest.raises(BadInput, match="not an OCI repository address"):
        oci.OciRegistry("registry.example")
    with pytest.raises(BadInput, match="lowercase"):
        oci.OciRegistry("registry.example/Team/Model")
    assert oci.OciRegistry("127.0.0.1:5000/a/b").insecure is True
    assert oci.OciRegistry("registry.example/a/b").insecure is False


def test_no_written_file_or_message_holds_a_credential(gated, oci_registry_with_auth, tmp_path, monkeypatch):  # noqa: F811
    """Credentials set for the registry and the Hub appear in no staged file, card, provenance,
    registry blob or log line after publishing to an authenticated registry and a directory."""
    secrets = {oci.PASSWORD_VARIABLE: "right-password", "HF_TOKEN": "hf_secretTOKENvalue1234"}
    monkeypatch.setenv(oci.USER_VARIABLE, "pusher")
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    said = []
    publish.run(f"oci://{oci_registry_with_auth}/team/smollm2", RECIPES, include_failed=True, log=said.append)
    publish.run(f"dir://{tmp_path / 'directory-registry'}", RECIPES, include_failed=True, log=said.append)
    searched = [path for root in (tmp_path, gated) for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "provenance.json" for path in searched) and len(said) >= 2
    for value in secrets.values():
        assert not [path for path in searched if value.encode() in path.read_bytes()], value
        assert not [line for line in said if value in line]
