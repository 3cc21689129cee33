from pipeline import formats, keys_doc
from pipeline.config import Params, RecipeBase
from tests.conftest import REPO


def test_docs_recipes_md_is_current():
    assert (REPO / "docs" / "recipes.md").read_text() == keys_doc.render(), "run `make docs`"


def test_every_key_has_a_description():
    def undescribed(model, prefix=""):
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += undescribed(annotation, f"{prefix}{name}.")
        return missing

    missing = undescribed(Params) + undescribed(RecipeBase)
    for name in formats.FORMATS:
        recipe = formats.recipe_class(name)
        missing += [key for key in undescribed(recipe) if key.split(".")[0] not in RecipeBase.model_fields]
    assert missing == []


def test_a_table_row_shows_type_default_bounds_and_description():
    row = next(line for line in keys_doc.render().splitlines() if line.startswith("| `imatrix_ctx`"))
    assert row == "| `imatrix_ctx` | integer | `512` | ≥ 32 | tokens per llama-imatrix chunk |"
