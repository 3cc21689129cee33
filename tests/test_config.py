from pathlib import Path

import pytest

from pipeline.config import LIMITS, load_params
from pipeline.formats import load_recipe
from pipeline.errors import BadInput
from tests.conftest import write


def recipe(tmp_path: Path, text: str) -> Path:
    write(tmp_path / "recipes" / "r.yaml", text)
    return tmp_path / "recipes"


def error_of(call) -> BadInput:
    with pytest.raises(BadInput) as info:
        call()
    return info.value


def test_valid_gguf_recipe_resolves_defaults(tmp_path):
    loaded = load_recipe("r", recipe(tmp_path, "format: gguf\ntype: q4_k_m\n"))
    assert loaded.type == "Q4_K_M"
    assert loaded.outtype == "f16"
    assert loaded.gates.require == ["accuracy", "speed"]


def test_unknown_recipe_key_names_file_key_and_valid_keys(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: gguf\ntype: Q8_0\nbits: 8\n")))
    assert "unknown key 'bits'" in error.what
    assert error.where.endswith("r.yaml: bits")
    assert "imatrix" in error.fix and "outtype" in error.fix
    assert error.exit_code == 2


def test_unknown_gate_key_lists_gate_keys(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: gguf\ntype: Q8_0\ngates:\n  max_kld: 1\n")))
    assert error.where.endswith("gates.max_kld")
    assert "max_mean_kld" in error.fix


def test_unknown_gguf_type_lists_valid_types(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: gguf\ntype: Q3_X\n")))
    assert "Q3_X" in error.what and "Q4_K_M" in error.what and "IQ4_XS" in error.what


def test_type_that_needs_imatrix_is_refused_without_it(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: gguf\ntype: IQ2_XS\n")))
    assert "imatrix: true" in error.what


@pytest.mark.parametrize("value", ["'0.1'", "fast", ".nan", "true"])
def test_gate_limit_must_be_a_number(tmp_path, value):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, f"format: gguf\ntype: Q8_0\ngates:\n  max_mean_kld: {value}\n")))
    assert error.where.endswith("gates.max_mean_kld")
    assert "number" in error.what or "finite" in error.what


def test_unknown_format_lists_formats(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: onnx\n")))
    assert "onnx" in error.what and "gguf" in error.fix


def test_missing_recipe_lists_available(tmp_path):
    recipes = recipe(tmp_path, "format: gguf\ntype: Q8_0\n")
    error = error_of(lambda: load_recipe("nope", recipes))
    assert "nope" in error.what and "r" in error.fix


def test_yaml_syntax_error_names_line(tmp_path):
    error = error_of(lambda: load_recipe("r", recipe(tmp_path, "format: gguf\ntype: [Q8_0\n")))
    assert "YAML" in error.what and "r.yaml:" in error.where


def test_params_reject_unknown_keys(tmp_path):
    path = write(tmp_path / "params.yaml", "reference:\n  windows: 4\n  tokens: 64\n")
    error = error_of(lambda: load_params(path))
    assert error.where.endswith("reference.tokens")
    assert "window_tokens" in error.fix


def test_params_defaults(tmp_path):
    params = load_params(write(tmp_path / "params.yaml", "recipes: [a]\n"))
    assert params.reference.windows == 40 and params.reference.window_tokens == 512
    assert params.model.source == "embedded:smollm2-135m"


def test_shipped_recipes_and_params_validate():
    repo = Path(__file__).resolve().parent.parent
    params = load_params(repo / "params.yaml")
    for name in params.recipes:
        load_recipe(name, repo / "recipes")


def test_each_dvc_stage_depends_on_its_own_code_and_on_params_keys_that_exist():
    import yaml

    from pipeline.config import Params
    from tests.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    own_code = {"host": "pipeline/host.py", "source": "pipeline/source.py", "corpus": "pipeline/corpus.py",
                "reference": "pipeline/reference.py", "sensitivity": "pipeline/sensitivity.py",
                "recipe": "pipeline/builds.py", "build": "pipeline/builds.py",
                "engine": "pipeline/engines.py", "baseline": "pipeline/baselines.py", "formats": "pipeline/baselines.py", "gate": "pipeline/gates",
                "report": "pipeline/report.py", "check": "pipeline/cli.py", "task_base": "pipeline/gates/tasks.py"}
    assert set(stages) == set(own_code)
    for name, stage in stages.items():
        body = stage.get("do", stage)
        deps = [dep.replace("${item}", "x") for dep in body.get("deps", [])]
        assert own_code[name] in deps, f"stage {name} does not depend on its code {own_code[name]}"
        for dep in deps:
            assert dep.startswith("artifacts/") or dep.startswith("recipes/") or (REPO / dep).exists(), (name, dep)
        for key in body.get("params", []):
            section, _, field = key.partition(".")
            assert section in Params.model_fields, (name, key)
            if field:
                assert field in Params.model_fields[section].annotation.model_fields, (name, key)
        assert "speed" not in body.get("params", []), f"stage {name}: name the speed keys it reads"


def test_params_yaml_holds_every_key_a_stage_tracks():
    """DVC stops a stage whose params key is missing from params.yaml, defaults or not."""
    import yaml

    from tests.conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("do", stage).get("params", []):
            section, _, field = key.partition(".")
            assert section in params and (not field or field in params[section]), key


def test_params_limits_replace_only_the_keys_given_and_say_where_each_is_set(tmp_path):
    from pipeline.config import RelativeLimit, effective_limits

    recipes = recipe(tmp_path, "format: gguf\ntype: Q4_K_M\ngates:\n  max_mean_kld: 0.07\n  max_ppl_ratio: 1.12\n"
                               "  require: [accuracy]\n")
    params = load_params(write(tmp_path / "params.yaml", "recipes: [r]\nlimits:\n  r:\n"
                                                         "    max_mean_kld: {relative_to: q8, factor: 12}\n"))
    limits, set_in = effective_limits(load_recipe("r", recipes), "r", params)
    assert limits.max_mean_kld == RelativeLimit(relative_to="q8", factor=12)
    assert limits.max_ppl_ratio == 1.12 and limits.require == ["accuracy"]
    assert set_in == {"max_mean_kld": "params.yaml: limits.r.max_mean_kld",
                      "max_ppl_ratio": f"{recipes / 'r.yaml'}: gates.max_ppl_ratio"}


def test_params_limits_for_an_unlisted_recipe_are_refused(tmp_path):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml",
                                               "recipes: [gguf-q4_k_m]\nlimits:\n  gguf-q4km:\n    max_mean_kld: 0.01\n")))
    assert error.where.endswith("limits.gguf-q4km") and "gguf-q4_k_m" in error.fix


@pytest.mark.parametrize("value, message", [
    ("{relative_to: q8}", "factor: Field required"),
    ("{relative_to: q8, factor: 0}", "greater than 0"),
    ("{relative_to: q8, factor: 2, by: 1}", "by: Extra inputs"),
    ("1.5", "must be [0, 1]"),
])
def test_a_bad_limit_in_params_names_its_key(tmp_path, value, message):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml",
                                               f"recipes: [r]\nlimits:\n  r:\n    min_top1_agreement: {value}\n")))
    assert error.where.endswith("limits.r.min_top1_agreement") and message in error.what


def test_tasks_are_lm_eval_names_with_optional_shots_limit_and_metric(tmp_path):
    params = load_params(write(tmp_path / "params.yaml", "tasks:\n  - {name: arc_easy, num_fewshot: 0, limit: 500}\n"
                                                         "  - {name: gsm8k, metric: 'exact_match,strict-match'}\n"))
    assert [(t.name, t.num_fewshot, t.limit, t.metric) for t in params.tasks] == [
        ("arc_easy", 0, 500, None), ("gsm8k", None, None, "exact_match,strict-match")]
    assert load_params(write(tmp_path / "params.yaml", "recipes: []\n")).tasks == []


@pytest.mark.parametrize("tasks, where, message", [
    ("[{name: arc_easy}, {name: arc_easy}]", "tasks", "repeated: arc_easy"),
    ("[{name: arc_easy, limit: 0}]", "tasks.0.limit", "greater than or equal to 1"),
    ("[{name: arc_easy, shots: 5}]", "tasks.0.shots", "unknown key"),
    ("[{limit: 5}]", "tasks.0.name", "Field required"),
])
def test_a_bad_task_names_its_key(tmp_path, tasks, where, message):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml", f"tasks: {tasks}\n")))
    assert error.where.endswith(where) and message in error.what


@pytest.mark.parametrize("value, message", [
    ("0", "must be a number above 0"),
    ("{arc_easy: -1}", "arc_easy: must be a number above 0"),
    ("{}", "name at least one task"),
])
def test_a_bad_task_recovery_limit_names_its_key(tmp_path, value, message):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml",
                                               f"recipes: [r]\nlimits:\n  r:\n    min_task_recovery: {value}\n")))
    assert error.where.endswith("limits.r.min_task_recovery") and message in error.what


@pytest.mark.parametrize("value, message", [
    ("0.1", "name the position buckets it holds"),
    ("{2048+: -1}", "2048+: must be a number at least 0"),
    ("{}", "name at least one position bucket"),
])
def test_a_bad_position_bucket_limit_names_its_key(tmp_path, value, message):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml",
                                               f"recipes: [r]\nlimits:\n  r:\n    max_mean_kld_at: {value}\n")))
    assert error.where.endswith("limits.r.max_mean_kld_at") and message in error.what


@pytest.mark.parametrize("buckets", ["[]", "[512, 2048]", "[0, 512, 512]"])
def test_position_buckets_start_at_0_and_rise(tmp_path, buckets):
    error = error_of(lambda: load_params(write(tmp_path / "params.yaml", f"reference: {{position_buckets: {buckets}}}\n")))
    assert error.where.endswith("reference.position_buckets") and "must start at 0 and rise" in error.what


def test_a_bucket_limit_names_a_bucket_of_params(tmp_path):
    from pipeline.config import effective_limits
    from pipeline.gates import check_keyed_limits

    recipes = recipe(tmp_path, "format: gguf\ntype: Q8_0\ngates:\n  max_mean_kld_at: {2048-4095: 0.1}\n")
    params = load_params(write(tmp_path / "params.yaml", "recipes: [r]\nreference: {position_buckets: [0, 2048]}\n"))
    assert params.reference.bucket_labels() == ["0-2047", "2048+"]
    limits, set_in = effective_limits(load_recipe("r", recipes), "r", params)
    error = error_of(lambda: check_keyed_limits(limits, params, set_in))
    assert "max_mean_kld_at names 2048-4095" in error.what and "reference.position_buckets" in error.what
    assert error.fix == "use one of: 0-2047, 2048+"


def test_a_recovery_limit_for_a_task_params_does_not_name_is_refused(tmp_path):
    from pipeline.config import effective_limits
    from pipeline.gates import check_keyed_limits

    recipes = recipe(tmp_path, "format: gguf\ntype: Q8_0\ngates:\n  min_task_recovery: {arc_easy: 0.95}\n")
    params = load_params(write(tmp_path / "params.yaml", "recipes: [r]\ntasks: [{name: arc_challenge}]\n"))
    limits, set_in = effective_limits(load_recipe("r", recipes), "r", params)
    error = error_of(lambda: check_keyed_limits(limits, params, set_in))
    assert "names arc_easy" in error.what and error.where.endswith("r.yaml: gates.min_task_recovery")
    assert "arc_challenge" in error.fix
    recipes = recipe(tmp_path, "format: gguf\ntype: Q8_0\ngates:\n  min_task_recovery_lower: {arc_esy: 0.9}\n")
    limits, set_in = effective_limits(load_recipe("r", recipes), "r", params)
    error = error_of(lambda: check_keyed_limits(limits, params, set_in))
    assert "min_task_recovery_lower names arc_esy" in error.what
    assert error.where.endswith("r.yaml: gates.min_task_recovery_lower")


def test_relative_limits_in_a_cycle_are_refused_when_params_are_read_naming_both_keys(tmp_path):
    write(tmp_path / "params.yaml", "recipes: [q8, q4]\nlimits:\n"
                                    "  q8: {max_mean_kld: {relative_to: q4, factor: 2}}\n"
                                    "  q4: {max_mean_kld: {relative_to: q8, factor: 2}}\n")
    error = error_of(lambda: load_params(tmp_path / "params.yaml"))
    assert "cycle (q8 max_mean_kld -> q4 max_mean_kld -> q8)" in error.what
    assert error.where == (f"{tmp_path / 'params.yaml'}: limits.q8.max_mean_kld and "
                           f"{tmp_path / 'params.yaml'}: limits.q4.max_mean_kld")


def test_a_cycle_through_a_recipe_file_and_a_self_reference_are_refused_and_an_override_breaks_a_cycle(tmp_path):
    write(tmp_path / "recipes" / "q8.yaml", "format: gguf\ntype: Q8_0\n")
    write(tmp_path / "recipes" / "q4.yaml",
          "format: gguf\ntype: Q4_0\ngates:\n  min_top1_agreement: {relative_to: q8, factor: 0.9}\n")
    params = write(tmp_path / "params.yaml", "recipes: [q8, q4]\nlimits:\n  q8: {max_mean_kld: {relative_to: q4, factor: 2}}\n")
    error = error_of(lambda: load_params(params))
    assert error.where.endswith(f"{tmp_path / 'recipes' / 'q4.yaml'}: gates.min_top1_agreement")
    write(tmp_path / "params.yaml", "recipes: [q8, q4]\nlimits:\n  q4: {min_top1_agreement: 0.7}\n"
                                    "  q8: {max_mean_kld: {relative_to: q4, factor: 2}}\n")
    assert load_params(params).recipes == ["q8", "q4"]  # the number in params replaces the recipe's relative limit
    write(tmp_path / "params.yaml", "recipes: [q8]\nlimits:\n  q8: {max_mean_kld: {relative_to: q8, factor: 2}}\n")
    assert "cycle (q8 max_mean_kld -> q8)" in error_of(lambda: load_params(params)).what


def test_a_chain_of_relative_limits_and_one_to_an_unlisted_recipe_load(tmp_path):
    write(tmp_path / "params.yaml", "recipes: [a, b, c]\nlimits:\n  a: {max_mean_kld: {relative_to: b, factor: 2}}\n"
                                    "  b: {max_mean_kld: {relative_to: c, factor: 2}}\n"
                                    "  c: {max_mean_kld: {relative_to: z, factor: 2}}\n")
    assert load_params(tmp_path / "params.yaml").recipes == ["a", "b", "c"]


def test_a_text_file_is_utf8_with_an_optional_byte_order_mark(tmp_path):
    from pipeline.config import read_text

    assert read_text(write(tmp_path / "a.txt", "café\n")) == "café\n"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9")
    assert read_text(tmp_path / "bom.txt") == "café"


def test_text_in_another_encoding_names_the_file_the_byte_offset_and_line(tmp_path):
    from pipeline.config import read_text

    (tmp_path / "latin1.txt").write_bytes("line one\ncafé\n".encode("latin-1"))
    error = error_of(lambda: read_text(tmp_path / "latin1.txt", "params.yaml: corpus.evaluation_file"))
    assert "not UTF-8 text: byte 0xe9 at byte offset 12 (line 2)" in error.what
    assert error.where == f"{tmp_path / 'latin1.txt'} (params.yaml: corpus.evaluation_file)" and "iconv" in error.fix
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfab\xf9")  # the offset counts the byte-order mark
    assert "byte 0xf9 at byte offset 5" in error_of(lambda: read_text(tmp_path / "bom.txt")).what
    (tmp_path / "model.bin").write_bytes(b"\xf9\x00\x01\x02")
    error = error_of(lambda: read_text(tmp_path / "model.bin"))
    assert error.what.startswith("a binary file, not UTF-8 text: byte 0xf9 at byte offset 0")


def test_params_in_another_encoding_are_bad_input_naming_the_file(tmp_path):
    (tmp_path / "params.yaml").write_bytes("recipes: []\n# café\n".encode("latin-1"))
    error = error_of(lambda: load_params(tmp_path / "params.yaml"))
    assert "not UTF-8" in error.what and error.where == str(tmp_path / "params.yaml")


def test_gate_limits_are_the_limit_table_then_require():
    from pipeline.config import GateLimitOverrides, GateLimits

    assert list(GateLimits.model_fields) == [limit.key for limit in LIMITS] + ["require"]
    # params may also say where its limits came from (`qpipe limits suggest --write`)
    assert list(GateLimitOverrides.model_fields) == list(GateLimits.model_fields) + ["suggested"]
    for limit in LIMITS:
        assert GateLimits.model_fields[limit.key].description == limit.description


@pytest.mark.parametrize("key", [limit.key for limit in LIMITS])
def test_each_limit_takes_exactly_the_numbers_its_table_row_allows(tmp_path, key):
    from pipeline.config import LIMIT_BY_KEY

    limit = LIMIT_BY_KEY[key]

    def error(value):
        value = value if limit.figure else f"{{0-511: {value}}}"  # held only per position bucket
        try:
            load_params(write(tmp_path / "params.yaml", f"recipes: [r]\nlimits:\n  r:\n    {key}: {value}\n"))
        except BadInput as bad:
            return bad.what
        return None

    assert (error(limit.low) is None) == limit.low_allowed
    assert limit.allowed() in (error(limit.low - 0.5) or "")
    if limit.high is not None:
        assert error(limit.high) is None and limit.allowed() in (error(limit.high + 0.5) or "")
