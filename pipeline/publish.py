"""Publish what passed: registries (directory, OCI, Hugging Face Hub), model cards, provenance.

`qpipe publish --to URL` stages every artifact whose gate verdict is `pass` (or every gated
artifact with --include-failed) into a folder holding

    the build directory's files   (model.gguf or the compressed-tensors directory, build.json, ...)
    README.md                     model card, Hugging Face front matter + the gate figures
    provenance.json               source, recipe, tools, git commit, dvc.lock entry, gate result
    SHA256SUMS                    `sha256sum` lines over every other file

and pushes it to the registry under a version derived from the artifact's sha256, so the same
artifact published twice is a no-op. After a push the files are read back from the registry
and checked against SHA256SUMS. A push that dies midway leaves no version behind: the
directory registry renames a finished folder into place; the OCI registry gets the manifest
(the only thing a tag points to) after every blob; the Hub gets one commit.

Registries (URL schemes): dir://PATH, oci://HOST[:PORT]/REPOSITORY, hf://ORG/NAME.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipeline import layout
from pipeline.errors import BadInput, QpipeError
from pipeline.registries import SUMS_FILE, Release, read_sums

SCHEMES = ("dir", "oci", "hf")
CARD_FILE = "README.md"
PROVENANCE_FILE = "provenance.json"


# ---------------------------------------------------------------- choosing what to publish


def select(recipes: list[str], include_failed: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results to publish, results refused); refuses to run before any gate has. Relative
    limits are judged over the recipes given (``gates.verdict.resolve``)."""
    from pipeline.files import read_json
    from pipeline.gates import verdict

    results = verdict.resolve([read_json(layout.gate_file(name)) for name in recipes
                               if layout.gate_file(name).is_file()])
    if not results:
        raise BadInput("no gate results to publish", where=str(layout.GATES_DIR),
                       fix="run `dvc repro` first: only gated artifacts are published")
    chosen = [r for r in results if include_failed or r["verdict"] == "pass"]
    refused = [r for r in results if r not in chosen]
    return chosen, refused


# ---------------------------------------------------------------- staging


def sha256sums(folder: Path) -> dict[str, str]:
    from pipeline.files import sha256_tree

    return {name: digest for name, digest in sha256_tree(folder).items() if name != SUMS_FILE}


def model_name(source: dict[str, Any]) -> str:
    origin = source["origin"]
    name = origin.get("model") or origin.get("id") or Path(origin.get("path", "model")).name
    return name.rsplit("/", 1)[-1]


def base_model(source: dict[str, Any]) -> str | None:
    """The Hub id of the source checkpoint, where it has one."""
    origin = source["origin"]
    return origin.get("model") or (origin.get("id") if origin.get("kind") == "hub" else None)


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def dvc_lock_entry(recipe: str) -> dict[str, Any] | None:
    """The build@recipe stage as dvc.lock recorded it, and the sha256 of that entry."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.is_file():
        return None
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(f"build@{recipe}")
    if stage is None:
        return None
    return {"stage": f"build@{recipe}", "sha256": hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest(),
            "outs": stage.get("outs")}


def stage_release(result: dict[str, Any], staging_root: Path) -> Release:
    """Copy the build directory and write the card, provenance and checksums beside it."""
    from pipeline.files import read_json, verify_artifact, write_json

    recipe = result["recipe"]
    build_dir = layout.build_dir(recipe)
    build = read_json(build_dir / "build.json")
    if build["artifact"]["sha256"] != result["artifact"]["sha256"]:
        raise BadInput(f"the build of {recipe} changed after its gate ran", where=str(build_dir),
                       fix=f"run `dvc repro` so that gate@{recipe} scores this build")
    verify_artifact(build_dir, build)
    source = read_json(layout.SOURCE_DIR / "source.json")
    release = Release(model=model_name(source), recipe=recipe, version="sha256-" + build["artifact"]["sha256"][:12],
                      format=result["format"], folder=Path(staging_root) / recipe)
    shutil.copytree(build_dir, release.folder)
    provenance = {
        "model": release.model,
        "recipe": recipe,
        "version": release.version,
        "source": {"origin": source["origin"], "sha256": build["source"]["sha256"], "files": source["files"]},
        "resolved_recipe": build["resolved_recipe"],
        "tools": build.get("tools"),
        "pipeline": {"qpipe": _qpipe_version(), **git_commit()},
        "dvc_lock": dvc_lock_entry(recipe),
        "gate": result,
    }
    write_json(release.folder / PROVENANCE_FILE, provenance)
    (release.folder / CARD_FILE).write_text(model_card(release, result, build, source))
    write_sums(release.folder)
    return release


def write_sums(folder: Path) -> None:
    from pipeline.files import sha256sum_lines

    (Path(folder) / SUMS_FILE).write_text(sha256sum_lines(sha256sums(folder)))


def _qpipe_version() -> str:
    from pipeline import __version__

    return __version__


# ---------------------------------------------------------------- model card


def card_metadata(release: Release, result: dict[str, Any], build: dict[str, Any],
                  source: dict[str, Any]) -> dict[str, Any]:
    from pipeline import formats

    recipe = build["resolved_recipe"]
    knobs = {k: v for k, v in recipe.items() if k not in ("gates", "description", "format")}
    info = formats.module(release.format).INFO
    metadata = {
        "library_name": info.library_name,
        "tags": ["quantized", *info.tags, "qpipe"],
        "quantization": {"format": release.format, "recipe": release.recipe, **knobs,
                         "bits_per_weight": round(result["artifact"]["bits_per_weight"], 3)},
    }
    base = base_model(source)
    if base:
        metadata = {"base_model": base, "base_model_relation": "quantized", **metadata}
    return metadata


def model_card(release: Release, result: dict[str, Any], build: dict[str, Any], source: dict[str, Any]) -> str:
    import yaml

    metadata = card_metadata(release, result, build, source)
    accuracy, speed = result["accuracy"], result["speed"]

    def figure(section: dict[str, Any], key: str, fmt: str) -> str:
        if section.get("status") != "ok" or section.get(key) is None:
            return "not run"
        interval = (section.get("ci95") or {}).get(key)
        spread = ((section.get("spread") or {}).get(key) or {}).get("stdev")
        return (fmt.format(section[key])
                + (f" (95 % CI {fmt.format(interval['low'])}–{fmt.format(interval['high'])})" if interval else "")
                + (f" ± {fmt.format(spread)} sd" if spread is not None else ""))

    accuracy_by = accuracy.get("runtime") or f"not run: {accuracy.get('reason')}"
    speed_by = speed.get("runtime") or f"not run: {speed.get('reason')}"

    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "",
        f"# {release.model} — {release.recipe}", "",
        f"{build['resolved_recipe'].get('description') or release.recipe}. Built by qpipe from "
        f"`{source['origin'].get('model') or source['origin'].get('id') or source['origin'].get('path')}` "
        f"(checkpoint sha256 `{build['source']['sha256']}`). Gate verdict: **{result['verdict']}**.", "",
        "## Gate figures", "",
        "| figure | value | measured by |", "|---|---|---|",
        f"| size | {result['artifact']['bytes'] / 1e6:.1f} MB ({result['artifact']['bits_per_weight']:.2f} bits/weight) | file |",
        f"| ppl ratio vs unquantized | {figure(accuracy, 'ppl_ratio', '{:.4f}')} | {accuracy_by} |",
        f"| mean KLD vs unquantized (full vocabulary) | {figure(accuracy, 'mean_kld', '{:.4f}')} | {accuracy_by} |",
        f"| top-1 agreement | {figure(accuracy, 'top1_agreement', '{:.3f}')} | {accuracy_by} |",
        f"| decode tok/s (batch 1) | {figure(speed, 'decode_tok_s', '{:.1f}')} | {speed_by} |",
        f"| prefill tok/s | {figure(speed, 'prefill_tok_s', '{:.0f}')} | {speed_by} |",
        "",
        f"Evaluation: {accuracy.get('eval_tokens', 'no')} tokens of {evaluation_text()}, disjoint from the "
        f"calibration text, scored against the unquantized model. Host: {result['host'].get('cpu')}, "
        f"{result['host'].get('gpu') or 'no GPU'}.", "",
        "## Checks", "",
        *[f"- {c['name']}: {c['value'] if c['value'] is None else format(c['value'], '.4g')} vs {c['limit']} → {c['verdict']}"
          for c in result["checks"]],
        "", "## Tools", "",
        *[f"- {name}: {version}" for name, version in (build.get("tools") or {}).items()],
        "", f"Files are listed with their sha256 in `{SUMS_FILE}`; `{PROVENANCE_FILE}` holds the full record.", "",
    ]
    return "\n".join(lines)


def evaluation_text() -> str:
    """Which text the gates scored: the corpus source and the evaluation text's sha256."""
    from pipeline.files import read_json

    corpus = read_json(layout.CORPUS_DIR / "corpus.json") if (layout.CORPUS_DIR / "corpus.json").is_file() else {}
    reference = read_json(layout.REFERENCE_DIR / "reference.json") if (layout.REFERENCE_DIR / "reference.json").is_file() else {}
    source = corpus.get("source") or "the evaluation text"
    digest = reference.get("evaluation_text_sha256")
    return f"`{source}` evaluation text" + (f" (sha256 `{digest[:16]}…`)" if digest else "")


def validate_card(path: Path) -> None:
    """Parse the card with huggingface_hub's ModelCard (offline: the Hub's own YAML validation
    needs network) and check the keys qpipe promises."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "tags", "quantization"):
        if key not in data:
            raise QpipeError(f"model card lacks {key}", where=str(path), fix="this is a qpipe bug")


# ---------------------------------------------------------------- registries


def registry(url: str):
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise BadInput(f"unknown registry {url!r}", where="--to",
                       fix="use dir://PATH, oci://HOST[:PORT]/REPOSITORY or hf://ORG/NAME")
    if scheme == "dir":
        from pipeline.registries.directory import DirectoryRegistry

        return DirectoryRegistry(Path(rest))
    if scheme == "oci":
        from pipeline.registries.oci import OciRegistry

        return OciRegistry(rest)
    from pipeline.registries.hub import HubRegistry

    return HubRegistry(rest)


def run(url: str, recipes: list[str], *, include_failed: bool, log=print) -> list[dict[str, Any]]:
    import tempfile

    target = registry(url)
    chosen, refused = select(recipes, include_failed)
    for result in refused:
        log(f"refused {result['recipe']}: verdict {result['verdict']} ({'; '.join(result.get('reasons', []))}); "
            "--include-failed publishes it anyway")
    published = []
    with tempfile.TemporaryDirectory(prefix="qpipe-publish-") as scratch:
        for result in chosen:
            release = stage_release(result, Path(scratch))
            validate_card(release.folder / CARD_FILE)
            sums = read_sums((release.folder / SUMS_FILE).read_text())
            if target.has(release, sums):
                log(f"{release.recipe} {release.version}: already in {target}, nothing to do")
                published.append({"recipe": release.recipe, "version": release.version, "pushed": False,
                                  "location": target.location(release)})
                continue
            log(f"{release.recipe} {release.version}: pushing {len(sums) + 1} files to {target}")
            location = target.push(release)
            target.verify(release, sums)
            log(f"{release.recipe} {release.version}: published and verified at {location}")
            published.append({"recipe": release.recipe, "version": release.version, "pushed": True,
                              "location": location})
    if refused and not chosen:
        raise QpipeError(f"nothing to publish: {', '.join(r['recipe'] for r in refused)} did not pass",
                         where=str(layout.GATES_DIR), fix="fix the failing gates, or pass --include-failed")
    return published
