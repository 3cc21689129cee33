import json

import pytest

from pipeline import formats, layout
from pipeline.config import load_recipe
from tests.conftest import write


def test_build_spec_leaves_out_gate_limits_and_description(project):
    recipe = load_recipe("gguf-iq4_xs")
    spec = formats.build_spec(recipe)
    assert spec["format"] == "gguf" and spec["type"] == "IQ4_XS" and spec["imatrix"] is True
    assert "gates" not in spec and "description" not in spec
    tuned = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"max_mean_kld": 9.0}),
                                      "description": "edited"})
    assert formats.build_spec(tuned) == spec


def test_write_build_spec(project):
    formats.write_build_spec("gguf-q8_0")
    written = json.loads(layout.recipe_spec("gguf-q8_0").read_text())
    assert written == {"recipe": "gguf-q8_0", "build": formats.build_spec(load_recipe("gguf-q8_0"))}


def test_build_spec_of_a_calibrating_format_records_the_calibration_device(project):
    write(layout.HOST_FILE, json.dumps({"gpus": [{"name": "NVIDIA H100"}]}))
    spec = formats.write_build_spec("awq-w4a16")
    assert spec["host"] == {"calibration_device": "cuda"}
    write(layout.HOST_FILE, json.dumps({"gpus": []}))
    assert formats.write_build_spec("awq-w4a16")["host"] == {"calibration_device": "cpu"}
    assert "host" not in formats.write_build_spec("gguf-q8_0")


def test_interrupted_build_leaves_no_artifact(project, monkeypatch):
    write(layout.SOURCE_DIR / "source.json", json.dumps({"origin": {}, "files": {}}))
    write(layout.CALIBRATION_TEXT, "calibration")
    gguf = formats.module("gguf")

    def dies_midway(recipe, *, out_dir, **_):
        (out_dir / "model.gguf").write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "build", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        formats.run_build("gguf-q8_0", threads=1, log=lambda _: None)
    assert list(layout.BUILDS_DIR.iterdir()) == []
