"""The Hugging Face Hub: each release is one commit of `<recipe>/` in the model repo ORG/NAME.

The token comes only from the environment (HF_TOKEN) and is never written anywhere. The
upload itself needs network and a token, so it is not exercised by the tests here; everything
up to the `upload_folder` call is.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import BadInput, QpipeError
from pipeline.registries import SUMS_FILE, env_secret, read_sums, verify_files

TOKEN_VARIABLE = "HF_TOKEN"


class HubRegistry:
    def __init__(self, repo_id: str):
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise BadInput(f"not a Hub repository id: {repo_id!r}", where="--to", fix="use hf://ORG/NAME")
        self.repo_id = repo_id

    def __str__(self) -> str:
        return f"hf://{self.repo_id}"

    def location(self, release) -> str:
        return f"https://huggingface.co/{self.repo_id}/tree/main/{release.recipe}"

    def _api(self):
        from huggingface_hub import HfApi
        token = env_secret(TOKEN_VARIABLE)
        if token is None:
            raise BadInput("no Hugging Face token", where=str(self),
                           fix=f"set {TOKEN_VARIABLE} to a token with write access to {self.repo_id}")
        return HfApi(token=token)

    def has(self, release, sums: dict[str, str]) -> bool:
        from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError
        api = self._api()
        try:
            path = api.hf_hub_download(self.repo_id, f"{release.recipe}/{SUMS_FILE}")
        except (EntryNotFoundError, RepositoryNotFoundError):
            return False
        return read_sums(Path(path).read_text()) == sums

    def push(self, release) -> str:
        from huggingface_hub.utils import HfHubHTTPError

        api = self._api()
        try:
            api.create_repo(self.repo_id, repo_type="model", exist_ok=True)
            api.upload_folder(repo_id=self.repo_id, folder_path=str(release.folder), path_in_repo=release.recipe,
                              commit_message=f"qpipe: {release.recipe} {release.version}",
                              delete_patterns=["*"])  # the folder becomes exactly this release, in one commit
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (401, 403):
                raise BadInput(f"the Hub refused the token (HTTP {status})", where=str(self),
                               fix=f"set {TOKEN_VARIABLE} to a token with write access") from None
            raise QpipeError(f"upload to the Hub failed (HTTP {status})", where=str(self),
                             fix="retry; a failed upload_folder commits nothing") from None
        return self.location(release)

    def verify(self, release, sums: dict[str, str]) -> None:
        api = self._api()
        files = {name: Path(api.hf_hub_download(self.repo_id, f"{release.recipe}/{name}")) for name in sums}
        verify_files(files, sums, where=str(self))
