"""The bad-input corpus: every case a user has hit or could hit, through the qpipe command.

Each case asserts the exit code (1 `check` refusing a result it cannot call a pass, 2 bad
input, 3 the host lacks something, 4 a tool failed),
one line without a traceback, that the line names the file or key, and that nothing
half-written is left under artifacts/. The host cases sit beside the code they exercise: a
stage that does not fit in memory (tests/test_memory.py), a full disk and a tool's unforeseen
failure (tests/test_cli.py, tests/formats/test_gguf.py), a killed stage's leftovers
(tests/test_files.py).
"""

import json

import pytest
from typer.testing import CliRunner

from pipeline import layout
from pipeline.cli import app
from tests.conftest import write
from tests.test_source import checkpoint, latin1_config, safetensors_file

runner = CliRunner()


def params_with_source(root, source):
    text = (root / "params.yaml").read_text().replace("source: embedded:smollm2-135m", f"source: {source}", 1)
    (root / "params.yaml").write_text(text)


def gguf_build(truncate: bool):
    from pipeline.files import sha256_artifact

    build_dir = layout.build_dir("gguf-q8_0")
    write(build_dir / "model.gguf", "GGUF" + "x" * 60)
    write(build_dir / "build.json", json.dumps({"recipe": "gguf-q8_0", "format": "gguf", "artifact": {
        "file": "model.gguf", "bytes": 64, "sha256": sha256_artifact(build_dir / "model.gguf")}}))
    write(layout.HOST_FILE, json.dumps({"cpu": {"physical_cores": 2, "model": "x"}, "bandwidth": {"gb_s": 10}}))
    if truncate:
        (build_dir / "model.gguf").write_text("GGUF")


def source_case(tmp_path, root, damage, **files):
    ckpt = checkpoint(tmp_path, **files)
    damage(ckpt)
    params_with_source(root, ckpt)


def no_tokenizer(ckpt):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()


def garbage_bin(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 10)


def corpus_files(root, tmp_path, evaluation: bytes, suffix=".txt"):
    write(tmp_path / "cal.txt", "calibration text\n")
    (tmp_path / f"eval{suffix}").write_bytes(evaluation)
    text = (root / "params.yaml").read_text().replace(
        "source: embedded:pydoc", f"source: files\n  calibration_file: {tmp_path / 'cal.txt'}\n"
                                  f"  evaluation_file: {tmp_path / f'eval{suffix}'}", 1)
    (root / "params.yaml").write_text(text)


def double_intermediate_size(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))


def task_data_not_utf8(root):
    from tests.lm_eval_tasks import PARAMS, write_tasks

    tasks = write_tasks(root)
    (tasks / "gen.jsonl").write_bytes((tasks / "gen.jsonl").read_bytes().replace(b"Paris", b"P\xe2ris"))
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("tasks: []\n", PARAMS))


def gated(root, params, *results):
    """params.yaml, then gate results judged against it (tests/test_cli.py's gate_result: (recipe, limits))."""
    from pipeline.config import GateLimits
    from tests.test_cli import gate_result, write_gate_results

    write(root / "params.yaml", params)
    write_gate_results(*(gate_result(recipe, GateLimits(**limits)) for recipe, limits in results))


def limits_edited_after_the_gate(root):
    gated(root, "recipes: [gguf-q8_0]\n", ("gguf-q8_0", {"max_mean_kld": 0.1}))
    write(root / "params.yaml", "recipes: [gguf-q8_0]\nlimits:\n  gguf-q8_0: {max_mean_kld: 0.001}\n")


CASES = {
    # name: (set-up(tmp_path, project root), command, exit code, text (or texts) the line must hold)
    "unknown recipe key": (lambda t, r: write(r / "recipes/broken.yaml", "format: gguf\ntype: Q4_K_M\nbits: 4\n"),
                           ["build", "broken"], 2, "broken.yaml: bits"),
    "unknown format": (lambda t, r: write(r / "recipes/broken.yaml", "format: onnx\n"),
                       ["recipe", "broken"], 2, "broken.yaml: format"),
    "unknown params key": (lambda t, r: write(r / "params.yaml", "reference:\n  tokens: 64\nrecipes: []\n"),
                           ["corpus"], 2, "params.yaml: reference.tokens"),
    "params not YAML": (lambda t, r: write(r / "params.yaml", "recipes: [a\n"), ["corpus"], 2, "params.yaml:"),
    "limits for an unlisted recipe": (
        lambda t, r: write(r / "params.yaml", "recipes: [gguf-q8_0]\nlimits:\n  gguf-q4km: {max_mean_kld: 0.1}\n"),
        ["corpus"], 2, "params.yaml: limits.gguf-q4km"),
    "a bad relative limit": (
        lambda t, r: write(r / "params.yaml", "recipes: [gguf-q8_0]\nlimits:\n  gguf-q8_0:\n"
                                              "    max_mean_kld: {relative_to: gguf-q4_0}\n"),
        ["corpus"], 2, "limits.gguf-q8_0.max_mean_kld"),
    "relative limits in a cycle": (
        lambda t, r: write(r / "params.yaml", "recipes: [gguf-q8_0, gguf-q4_0]\nlimits:\n"
                                              "  gguf-q8_0: {max_mean_kld: {relative_to: gguf-q4_0, factor: 2}}\n"
                                              "  gguf-q4_0: {max_mean_kld: {relative_to: gguf-q8_0, factor: 2}}\n"),
        ["gate", "gguf-q4_0"], 2, ("limits.gguf-q8_0.max_mean_kld", "limits.gguf-q4_0.max_mean_kld")),
    "evaluation text not UTF-8": (lambda t, r: corpus_files(r, t, b"\xf9\x00\x01binary" * 8), ["corpus"], 2,
                                  ("eval.txt", "params.yaml: corpus.evaluation_file", "byte 0xf9 at byte offset 0")),
    "a JSONL text field that is null": (lambda t, r: corpus_files(r, t, b'{"text": "fine"}\n{"text": null}\n',
                                                                  ".jsonl"), ["corpus"], 2, ("eval.jsonl:2", "null")),
    "params not UTF-8": (lambda t, r: (r / "params.yaml").write_bytes(b"recipes: []\n# caf\xe9\n"), ["corpus"], 2,
                         ("params.yaml", "byte 0xe9")),
    "a config that disagrees with its weights": (
        lambda t, r: source_case(t, r, double_intermediate_size), ["source"], 2,
        ("mlp.down_proj.weight", "config.json: intermediate_size", "in the weights, but config.json makes it")),
    "config.json not UTF-8": (lambda t, r: source_case(t, r, latin1_config), ["source"], 2, "config.json"),
    "safetensors index not JSON": (
        lambda t, r: source_case(t, r, lambda c: write(c / "model.safetensors.index.json", "{weight_map")),
        ["source"], 2, "model.safetensors.index.json"),
    "task data not UTF-8": (lambda t, r: task_data_not_utf8(r), ["task-base"], 2,
                            ("tasks/gen.jsonl", "task qpipe_gen", "tasks[1].name", "byte 0xe2")),
    "check after a limits edit without dvc repro": (lambda t, r: limits_edited_after_the_gate(r), ["check"], 1,
                                                    ("1 stale", "gguf-q8_0", "dvc repro")),
    "a relative limit whose recipe is not in the run": (
        lambda t, r: gated(r, "recipes: [gguf-q4_0]\n",
                           ("gguf-q4_0", {"max_mean_kld": {"relative_to": "gguf-q8_0", "factor": 2}})),
        ["check"], 1, "did not pass: gguf-q4_0"),
    "no checkpoint directory": (lambda t, r: params_with_source(r, t / "nowhere"), ["source"], 2, "model.source"),
    "no config.json": (lambda t, r: source_case(t, r, lambda c: (c / "config.json").unlink()),
                       ["source"], 2, "ckpt"),
    "truncated safetensors": (
        lambda t, r: source_case(t, r, lambda c: safetensors_file(c / "model.safetensors", b"\x00" * 8, 16)),
        ["source"], 2, "model.safetensors"),
    "unknown architecture": (
        lambda t, r: source_case(t, r, lambda c: (c / "config.json").write_text('{"model_type": "nolm"}')),
        ["source"], 2, "config.json: model_type"),
    "no tokenizer": (lambda t, r: source_case(t, r, no_tokenizer), ["source"], 2, "ckpt"),
    ".bin of garbage": (lambda t, r: source_case(t, r, garbage_bin), ["source"], 2, "pytorch_model.bin"),
    "unknown embedded model": (lambda t, r: params_with_source(r, "embedded:gpt-5"), ["source"], 2, "model.source"),
    "gate before build": (lambda t, r: None, ["gate", "gguf-q8_0"], 2, "artifacts/builds/gguf-q8_0"),
    "build before source": (lambda t, r: None, ["build", "gguf-q8_0"], 2, "artifacts/source"),
    "truncated GGUF at the gate": (lambda t, r: gguf_build(truncate=True), ["gate", "gguf-q8_0"], 2,
                                   "artifacts/builds/gguf-q8_0/model.gguf"),
    "no such recipe": (lambda t, r: None, ["build", "gguf-q9"], 2, "recipes/gguf-q9.yaml"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gets_one_line_its_exit_code_and_leaves_nothing(name, project, tmp_path):
    set_up, command, code, names = CASES[name]
    set_up(tmp_path, project)
    before = {p for p in (project / "artifacts").rglob("*")} if (project / "artifacts").exists() else set()
    result = runner.invoke(app, command)
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and lines[-1].startswith("error: ")
    assert all(text in lines[-1] for text in ((names,) if isinstance(names, str) else names)), lines[-1]
    after = {p for p in (project / "artifacts").rglob("*")} if (project / "artifacts").exists() else set()
    assert not [p for p in after - before if ".partial-" in p.name or p.suffix == ".tmp"]
    assert not [p for p in after - before if p.name in ("source.json", "build.json", "reference.json")]
