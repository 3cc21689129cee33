"""`qpipe add-recipe`: one command lists a recipe in params.yaml, dvc.yaml and the CI workflows,
every other line kept; and the check that dvc.yaml's artifacts follow params.yaml's recipes.
The workflows' part is in tests/ci/test_workflows.py."""

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import recipe_listing
from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import BadInput
from pipeline.formats import load_recipe
from tests.conftest import REPO, write

runner = CliRunner()


def add_recipe(*arguments):
    return runner.invoke(app, ["add-recipe", *arguments])


def test_the_shipped_dvc_yaml_has_an_artifact_for_every_recipe_and_no_other():
    assert recipe_listing.artifact_problems(load_params(REPO / "params.yaml").recipes, REPO / "dvc.yaml") == []


def test_a_copy_is_listed_everywhere_and_every_other_line_stays(project):
    params, dvc, source = ((project / name).read_text()
                           for name in ("params.yaml", "dvc.yaml", "recipes/gguf-q4_k_m.yaml"))
    result = add_recipe("gguf-q3_k_m", "--from", "gguf-q4_k_m", "--description", "llama.cpp Q3_K_M: what it costs")
    assert result.exit_code == 0, result.output
    copy = (project / "recipes/gguf-q3_k_m.yaml").read_text().splitlines()
    assert copy[1] == 'description: "llama.cpp Q3_K_M: what it costs"'
    assert copy[:1] + copy[2:] == source.splitlines()[:1] + source.splitlines()[2:]  # limits and their comments too
    last = "  - trtllm-int8-wo    # ModelOpt INT8 weight-only -> TensorRT-LLM checkpoint (legacy engine backend)\n"
    assert (project / "params.yaml").read_text() == params.replace(last, last + "  - gguf-q3_k_m\n")
    assert (project / "dvc.yaml").read_text() == dvc + (
        "  gguf-q3_k_m:\n"
        "    path: artifacts/builds/gguf-q3_k_m\n"
        "    type: model\n"
        "    desc: 'llama.cpp Q3_K_M: what it costs'\n"
        "    labels: [gguf, llama.cpp]\n")
    assert load_params().recipes[-1] == "gguf-q3_k_m"
    assert load_recipe("gguf-q3_k_m").description == "llama.cpp Q3_K_M: what it costs"
    assert recipe_listing.artifact_problems(load_params().recipes) == []
    assert "wrote recipes/gguf-q3_k_m.yaml" in result.output and "wrote dvc.yaml" in result.output


def test_a_hand_written_recipe_is_listed_where_it_is_missing_and_then_refused(project):
    write(project / "recipes/awq-g32.yaml", "format: awq\ndescription: AWQ W4A16, groups of 32\ngroup_size: 32\n")
    params = (project / "params.yaml").read_text()
    write(project / "params.yaml", params.replace("recipes:\n", "recipes:\n  - awq-g32\n"))  # listed by hand, as before
    result = add_recipe("awq-g32")
    assert result.exit_code == 0, result.output
    assert "wrote dvc.yaml" in result.output and "params.yaml" not in result.output
    entry = yaml.safe_load((project / "dvc.yaml").read_text())["artifacts"]["awq-g32"]
    assert entry == {"path": "artifacts/builds/awq-g32", "type": "model", "desc": "AWQ W4A16, groups of 32",
                     "labels": ["awq", "compressed-tensors", "vllm"]}
    result = add_recipe("awq-g32")
    assert result.exit_code == 2 and "already listed" in result.output


@pytest.mark.parametrize("arguments, file, said", [
    (["bad name"], None, "cannot name a recipe"),
    (["gguf.q3"], None, "cannot name a recipe"),
    (["gguf-"], None, "cannot name a recipe"),
    (["gguf-q3", "--from", "gguf-q4_k_m"], None, "a copy needs its own description"),
    (["gguf-q4_0", "--from", "gguf-q4_k_m", "--description", "x"], None, "recipes/gguf-q4_0.yaml exists"),
    (["gguf-q3", "--from", "gguf-q9", "--description", "x"], None, "no recipe named 'gguf-q9'"),
    (["gguf-q3", "--description", "x"], None, "--description goes with --from"),
    (["gguf-q3"], None, "no recipe named 'gguf-q3'"),
    (["exl2-4bit"], "format: exl2\n", "unknown format 'exl2'"),
    (["gguf-q2"], "format: gguf\ntype: Q2_K_S\n", "needs `imatrix: true`"),
    (["gguf-q8_0"], None, "already listed in params.yaml, dvc.yaml and every CI workflow"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(project, arguments, file, said):
    if file:
        write(project / "recipes" / f"{arguments[0]}.yaml", file)
    before = {path: path.read_text() for path in (project / "params.yaml", project / "dvc.yaml")}
    recipes = sorted((project / "recipes").iterdir())
    result = add_recipe(*arguments)
    assert result.exit_code == 2, result.output
    assert said in result.output and len(result.output.strip().splitlines()) == 1
    assert {path: path.read_text() for path in before} == before
    assert sorted((project / "recipes").iterdir()) == recipes


def test_dvc_yaml_out_of_step_with_params_is_named(tmp_path):
    dvc = write(tmp_path / "dvc.yaml", yaml.safe_dump({"artifacts": {
        "a": {"path": "artifacts/builds/a", "type": "model", "labels": ["gguf"]},
        "b": {"path": "artifacts/builds/elsewhere", "type": "model", "labels": ["gguf"]},
        "gone": {"path": "artifacts/builds/gone", "type": "model", "labels": ["gguf"]},
        "dataset": {"path": "data/text", "type": "dataset"}}}))
    assert recipe_listing.artifact_problems(["a", "b", "c"], dvc) == [
        f"{dvc} artifacts.b is not `path: artifacts/builds/b`, `type: model` with labels",
        f"{dvc} `artifacts:` lacks c",
        f"{dvc} `artifacts:` lists gone that params.yaml does not"]
    assert recipe_listing.artifact_problems(["a", "b", "gone"], dvc) == [
        f"{dvc} artifacts.b is not `path: artifacts/builds/b`, `type: model` with labels"]


@pytest.mark.parametrize("text, added", [
    ("recipes: []\nlimits: {}\n", "recipes: [new]\nlimits: {}\n"),
    ("recipes: [a, b]  # two\n", "recipes: [a, b, new]  # two\n"),
    ("model: {}\n", "model: {}\nrecipes:\n  - new\n"),
    ("recipes:\n    - a   # first\n    # b is out\n\n# next\nlimits: {}\n",
     "recipes:\n    - a   # first\n    - new\n    # b is out\n\n# next\nlimits: {}\n"),
])
def test_a_recipe_joins_the_list_in_the_files_own_style(tmp_path, text, added):
    assert recipe_listing.with_list_item(text, "recipes", "new", tmp_path / "params.yaml") == added


def test_an_entry_joins_the_mapping_in_the_files_own_style(tmp_path):
    entry = {"path": "artifacts/builds/new", "type": "model", "desc": "it's: quoted", "labels": ["gguf", "llama.cpp"]}
    lines = "  new:\n    path: artifacts/builds/new\n    type: model\n    desc: 'it''s: quoted'\n" \
            "    labels: [gguf, llama.cpp]\n"
    assert recipe_listing.with_mapping_entry("stages: {}\nartifacts: {}\n", "artifacts", "new", entry,
                                             tmp_path) == "stages: {}\nartifacts:\n" + lines
    assert recipe_listing.with_mapping_entry("stages: {}\n", "artifacts", "new", entry,
                                             tmp_path) == "stages: {}\nartifacts:\n" + lines
    four = "artifacts:\n    old:\n        path: x\n# plots next\nplots: []\n"
    assert recipe_listing.with_mapping_entry(four, "artifacts", "new", {"path": "y"}, tmp_path) == \
        "artifacts:\n    old:\n        path: x\n    new:\n        path: y\n# plots next\nplots: []\n"


def test_a_layout_the_text_edit_cannot_keep_is_refused_not_rewritten(tmp_path):
    with pytest.raises(BadInput, match="cannot add to `recipes:`") as info:
        recipe_listing.with_list_item("recipes: [a,\n  b]\n", "recipes", "new", tmp_path / "params.yaml")
    assert "block style" in info.value.fix
    with pytest.raises(BadInput, match="cannot add to `artifacts:`"):
        recipe_listing.with_mapping_entry("artifacts: {a: {path: x}}\n", "artifacts", "new", {"path": "y"}, tmp_path)


def test_a_copys_description_replaces_the_whole_old_one_or_follows_format(tmp_path):
    folded = "format: awq\ndescription: >\n  two\n  lines\ngroup_size: 32\n"
    assert recipe_listing.with_description(folded, "one", tmp_path) == \
        'format: awq\ndescription: "one"\ngroup_size: 32\n'
    assert recipe_listing.with_description("format: awq\ngroup_size: 32\n", 'say "x"', tmp_path) == \
        'format: awq\ndescription: "say \\"x\\""\ngroup_size: 32\n'
