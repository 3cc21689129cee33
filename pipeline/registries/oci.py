"""Any OCI registry, through ORAS (the `oras` package): one OCI artifact per release.

Layout, following Docker Model Runner's model artifacts (the closest published convention for
a GGUF file as an OCI artifact; Ollama's layout is private to Ollama, and KitOps packs whole
directories as tarballs):

- the manifest's `artifactType` is one per format (`application/vnd.qpipe.model.<format>.v1`)
  and the config media type is qpipe's own (`application/vnd.qpipe.model.config.v1+json`): the
  config JSON holds the format, the
  recipe, the gate verdict and figures, and the source hash;
- one layer per file with Docker Model Runner's media types (`application/vnd.docker.ai.gguf.v3`,
  `application/vnd.docker.ai.safetensors`, `...chat.template.jinja`, and
  `application/vnd.docker.ai.model.file` for any other file) and its `org.cncf.model.filepath`
  annotation, plus `org.opencontainers.image.title` so `oras pull` writes the files back under
  their names;
- the tag is `<recipe>-<version>` in the repository of the URL (oci://HOST[:PORT]/REPOSITORY).

Blobs are uploaded first and the manifest last, so a push that dies midway leaves blobs no tag
points to, which the registry ignores; there is no half-published version. Loopback registries
(127.0.0.1, localhost) are spoken to over plain HTTP, all others over HTTPS. Credentials come
only from QPIPE_REGISTRY_USERNAME / QPIPE_REGISTRY_PASSWORD (HTTP basic auth).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.errors import BadInput, HostLacks, QpipeError
from pipeline.registries import SUMS_FILE, env_secret, read_sums, verify_files

USER_VARIABLE = "QPIPE_REGISTRY_USERNAME"
PASSWORD_VARIABLE = "QPIPE_REGISTRY_PASSWORD"


def artifact_type(format_name: str) -> str:
    """One OCI artifact type per format, e.g. application/vnd.qpipe.model.gguf.v1."""
    return f"application/vnd.qpipe.model.{format_name}.v1"


CONFIG_MEDIA_TYPE = "application/vnd.qpipe.model.config.v1+json"
TITLE = "org.opencontainers.image.title"
FILE_PATH = "org.cncf.model.filepath"  # Docker Model Runner's per-file annotation
LAYER_MEDIA_TYPES = {  # Docker Model Runner's (pkg/distribution/types/config.go)
    ".gguf": "application/vnd.docker.ai.gguf.v3",
    ".safetensors": "application/vnd.docker.ai.safetensors",
    ".jinja": "application/vnd.docker.ai.chat.template.jinja",
}
DEFAULT_LAYER_MEDIA_TYPE = "application/vnd.docker.ai.model.file"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class OciRegistry:
    def __init__(self, address: str):
        host, _, repository = address.partition("/")
        if not host or not repository:
            raise BadInput(f"not an OCI repository address: {address!r}", where="--to",
                           fix="use oci://HOST[:PORT]/REPOSITORY, e.g. oci://registry.example/team/model")
        if repository != repository.lower():
            raise BadInput(f"OCI repository names are lowercase: {repository!r}", where="--to",
                           fix=f"use oci://{host}/{repository.lower()}")
        self.host, self.repository = host, repository
        self.insecure = host.split(":")[0] in LOOPBACK or host.startswith("[::1]")
        self._client = None

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repository}"

    def reference(self, release) -> str:
        return f"{self.host}/{self.repository}:{release.recipe}-{release.version}"

    def location(self, release) -> str:
        return f"oci://{self.reference(release)}"

    # ------------------------------------------------------------ connection

    def client(self):
        if self._client is None:
            import requests
            from oras.provider import Registry
            user, password = env_secret(USER_VARIABLE), env_secret(PASSWORD_VARIABLE)
            scheme = "http" if self.insecure else "https"
            try:
                probe = requests.get(f"{scheme}://{self.host}/v2/", timeout=10,
                                     auth=(user, password) if user and password else None)
            except requests.exceptions.RequestException as exc:
                raise HostLacks(f"cannot reach the OCI registry at {self.host} ({type(exc).__name__})",
                                where=str(self), fix="check the host and port, and that the registry is up; "
                                                     "nothing was pushed") from None
            if probe.status_code == 401:
                raise BadInput(
                    f"the OCI registry at {self.host} refused "
                    + ("the credentials" if user and password else "an anonymous push"),
                    where=str(self), fix=f"set {USER_VARIABLE} and {PASSWORD_VARIABLE} to an account that may push")
            client = Registry(hostname=self.host, insecure=self.insecure,
                              auth_backend="basic" if user and password else "token")
            if user and password:
                client.auth.set_basic_auth(user, password)
            self._client = client
        return self._client

    def _container(self, release):
        return self.client().get_container(self.reference(release))

    # ------------------------------------------------------------ registry interface

    def manifest(self, release) -> dict | None:
        from requests import Response

        client = self.client()
        container = self._container(release)
        response: Response = client.do_request(f"{client.prefix}://{container.manifest_url()}", "GET",
                                               headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        if response.status_code == 404:
            return None
        client._check_200_response(response)
        return response.json()

    def has(self, release, sums: dict[str, str]) -> bool:
        manifest = self.manifest(release)
        if manifest is None:
            return False
        layer = next((l for l in manifest["layers"] if l.get("annotations", {}).get(TITLE) == SUMS_FILE), None)
        if layer is None:
            return False
        with tempfile.TemporaryDirectory(prefix="qpipe-oci-") as scratch:
            path = self.client().download_blob(self._container(release), layer["digest"], str(Path(scratch) / SUMS_FILE))
            return read_sums(Path(path).read_text()) == sums

    def push(self, release) -> str:
        import oras.oci

        from pipeline.files import read_json

        client = self.client()
        container = self._container(release)
        layers = []
        for path in sorted(p for p in release.folder.rglob("*") if p.is_file()):
            name = str(path.relative_to(release.folder))
            layer = oras.oci.NewLayer(str(path), media_type=LAYER_MEDIA_TYPES.get(path.suffix, DEFAULT_LAYER_MEDIA_TYPE))
            layer["annotations"] = {TITLE: name, FILE_PATH: name}
            client._check_200_response(client.upload_blob(str(path), container, layer))
            layers.append(layer)
        provenance = read_json(release.folder / "provenance.json")
        gate = provenance["gate"]
        with tempfile.TemporaryDirectory(prefix="qpipe-oci-") as scratch:
            config_path = Path(scratch) / "config.json"
            config_path.write_text(json.dumps({
                "model": release.model, "recipe": release.recipe, "version": release.version,
                "format": release.format, "verdict": gate["verdict"],
                "accuracy": {k: gate["accuracy"].get(k) for k in ("runtime", "ppl_ratio", "mean_kld", "top1_agreement")},
                "speed": {k: gate["speed"].get(k) for k in ("runtime", "decode_tok_s", "prefill_tok_s", "reason")},
                "source_sha256": provenance["source"]["sha256"],
            }, sort_keys=True))
            config = oras.oci.NewLayer(str(config_path), media_type=CONFIG_MEDIA_TYPE)
            client._check_200_response(client.upload_blob(str(config_path), container, config))
        manifest = oras.oci.NewManifest()
        manifest.update(artifactType=artifact_type(release.format), config=config, layers=layers, annotations={
            "org.opencontainers.image.title": f"{release.model} {release.recipe}",
            "org.opencontainers.image.version": release.version,
            "org.opencontainers.image.description": f"{release.format} artifact built and gated by qpipe",
        })
        client._check_200_response(client.upload_manifest(manifest, container))  # the tag appears only now
        return self.location(release)

    def verify(self, release, sums: dict[str, str]) -> None:
        manifest = self.manifest(release)
        if manifest is None:
            raise QpipeError(f"{self.reference(release)} is not in the registry after the push", where=str(self),
                             fix="publish again")
        with tempfile.TemporaryDirectory(prefix="qpipe-oci-") as scratch:
            files = {}
            for index, layer in enumerate(manifest["layers"]):
                name = layer.get("annotations", {}).get(TITLE, f"layer-{index}")
                files[name] = Path(self.client().download_blob(self._container(release), layer["digest"],
                                                               str(Path(scratch) / f"{index}.blob")))
            verify_files(files, sums, where=self.location(release))
