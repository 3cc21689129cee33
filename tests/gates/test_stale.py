import pytest

from pipeline.config import load_params
from pipeline.gates import stale
from tests.conftest import write

RECIPE = "format: gguf\ntype: Q4_0\ngates:\n  max_mean_kld: 0.3\n"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "recipes" / "q4.yaml", RECIPE)
    write(tmp_path / "params.yaml", "recipes: [q4]\n")
    return tmp_path


def result_now():
    return {"recipe": "q4", "verdict": "pass", "judged_against": stale.current("q4", load_params())}


def test_a_result_judged_against_the_params_and_recipe_of_now_is_not_stale(workspace):
    assert stale.stale_reason(result_now(), load_params()) is None
    assert set(result_now()["judged_against"]) == {"limits", "recipe", *stale.PARAMS_PARTS}


@pytest.mark.parametrize("params, recipe, named", [
    ("recipes: [q4]\nlimits:\n  q4: {max_mean_kld: 0.2}\n", RECIPE, "limits (recipes/q4.yaml gates, params.yaml limits.q4)"),
    ("recipes: [q4]\n", RECIPE.replace("0.3", "0.2"), "limits (recipes/q4.yaml gates"),
    ("recipes: [q4]\n", RECIPE.replace("Q4_0", "Q4_K_M"), "recipes/q4.yaml keys"),
    ("recipes: [q4]\nreference: {windows: 8}\n", RECIPE, "params.yaml `reference`"),
    ("recipes: [q4]\ntasks: [{name: arc_easy}]\n", RECIPE, "params.yaml `tasks`"),
])
def test_each_part_that_changed_since_the_gate_is_named(workspace, params, recipe, named):
    made = result_now()
    write(workspace / "params.yaml", params)
    write(workspace / "recipes" / "q4.yaml", recipe)
    reason = stale.stale_reason(made, load_params())
    assert reason.startswith("it was judged against other ") and named in reason and reason.endswith(" than now")


def test_a_change_that_moves_no_part_leaves_it_fresh(workspace):
    made = result_now()
    write(workspace / "recipes" / "q4.yaml", RECIPE + "description: same knobs\n")
    write(workspace / "params.yaml", "recipes: [q4]\nlimits:\n  q4: {max_mean_kld: 0.3}\n")  # the same limit
    assert stale.stale_reason(made, load_params()) is None


def test_a_result_without_the_record_a_dropped_recipe_and_an_unreadable_one_are_stale(workspace):
    made = result_now()
    assert "written by an older qpipe" in stale.stale_reason({"recipe": "q4", "verdict": "pass"}, load_params())
    write(workspace / "params.yaml", "recipes: []\n")
    assert stale.stale_reason(made, load_params()) == "recipe q4 is no longer in params.yaml `recipes`"
    write(workspace / "params.yaml", "recipes: [q4]\n")
    write(workspace / "recipes" / "q4.yaml", "format: gguf\ntype: Q4_0\nbits: 4\n")
    assert "its recipe no longer reads (unknown key 'bits')" in stale.stale_reason(made, load_params())
    assert stale.stale_results([made], load_params()) == {"q4": stale.stale_reason(made, load_params())}
