from pipeline import formats
from pipeline.formats import load_recipe


def test_build_spec_leaves_out_gate_limits_and_description(project):
    recipe = load_recipe("gguf-iq4_xs")
    spec = formats.build_spec(recipe)
    assert spec["format"] == "gguf" and spec["type"] == "IQ4_XS" and spec["imatrix"] is True
    assert "gates" not in spec and "description" not in spec
    tuned = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"max_mean_kld": 9.0}),
                                      "description": "edited"})
    assert formats.build_spec(tuned) == spec
