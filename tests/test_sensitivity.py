import json

import numpy as np
import pytest

from pipeline import sensitivity
from pipeline.config import SensitivityParams
from pipeline.formats import gguf


def test_groups_follow_what_runtimes_fuse_and_tied_embeddings_are_one_group():
    shapes = {
        "model.embed_tokens.weight": (100, 64),
        "model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.k_proj.weight": (32, 64),
        "model.layers.0.self_attn.v_proj.weight": (32, 64), "model.layers.0.self_attn.o_proj.weight": (64, 64),
        "model.layers.0.mlp.gate_proj.weight": (192, 64), "model.layers.0.mlp.up_proj.weight": (192, 64),
        "model.layers.0.mlp.down_proj.weight": (64, 192), "model.layers.0.input_layernorm.weight": (64,),
        "model.layers.0.mlp.router.weight": (8, 64), "model.norm.weight": (64,),
    }
    groups, unsearched = sensitivity.groups_of(shapes.items())
    assert [g.name for g in groups] == ["embedding", "layers.0.attn_qkv", "layers.0.attn_out",
                                        "layers.0.mlp_gate_up", "layers.0.mlp_down"]
    qkv = groups[1]
    assert qkv.layer == 0 and qkv.row_width == {64} and qkv.weights() == 128 * 64
    assert groups[4].row_width == {192}
    assert unsearched == ["model.layers.0.mlp.router.weight"]
    untied, _ = sensitivity.groups_of([*shapes.items(), ("lm_head.weight", (100, 64))])
    assert untied[-1].name == "output" and untied[-1].layer is None


def test_gguf_candidates_are_the_types_whose_blocks_tile_every_row():
    narrow = sensitivity.Group("layers.0.attn_qkv", "attn_qkv", 0, ("a", "b"), ((64, 576), (32, 576)))
    wide = sensitivity.Group("layers.0.mlp_down", "mlp_down", 0, ("c",), ((576, 1536),))
    assert gguf.search_candidates(narrow) == ["IQ4_NL", "Q5_0", "Q8_0"]
    assert gguf.search_candidates(wide) == list(gguf.SEARCH_TYPES)
    assert gguf.search_candidates(wide, ["q6_k", "q8_0"]) == ["Q8_0", "Q6_K"]
    assert gguf.search_bytes(narrow, "Q8_0") == 96 * 576 // 32 * 34


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    import torch

    from pipeline.runtimes.transformers import load_causal_lm

    return load_causal_lm(tiny_llama, dtype=torch.float32).eval()


def test_each_group_alone_costs_less_at_more_bits_and_the_model_is_left_as_it_was(tiny_model):
    import torch

    windows = [list(range(1, 65)), list(range(30, 94))]
    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in tiny_model.named_parameters())
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    candidates = {g.name: gguf.search_candidates(g) for g in groups}
    damage = sensitivity.measure(tiny_model, windows, groups, candidates,
                                 lambda w, t: gguf.search_round_trip(w, t, threads=1), unquantized_type="F16")
    for group in groups:
        assert damage[group.name]["F16"] == 0.0
        # 64-wide rows: only the 32-blocks; IQ4_NL (4.5 bits) damages more than Q5_0 and Q8_0
        assert set(damage[group.name]) == {"F16", "IQ4_NL", "Q5_0", "Q8_0"}
        assert damage[group.name]["IQ4_NL"] > damage[group.name]["Q5_0"] > damage[group.name]["Q8_0"] > 0
    for name, parameter in tiny_model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_the_damage_is_the_kl_divergence_of_the_quantized_model(tiny_model):
    """One group's figure, recomputed by hand from two forward passes' logits, in float64."""
    import torch

    windows = [list(range(1, 65))]
    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in tiny_model.named_parameters())
    down = next(g for g in groups if g.name == "layers.1.mlp_down")
    damage = sensitivity.measure(tiny_model, windows, [down], {down.name: ["Q5_0"]},
                                 lambda w, t: gguf.search_round_trip(w, t, threads=1), unquantized_type="F16")
    ids = torch.tensor(windows)
    parameter = dict(tiny_model.named_parameters())[down.parameters[0]]
    original = parameter.detach().clone()
    with torch.no_grad():
        base = torch.log_softmax(tiny_model(ids).logits.double(), -1)
        parameter.copy_(torch.from_numpy(gguf.search_round_trip(original.numpy(), "Q5_0", threads=1)))
        quantized = torch.log_softmax(tiny_model(ids).logits.double(), -1)
        parameter.copy_(original)
    expected = float((base.exp() * (base - quantized)).sum(-1).mean())
    assert damage[down.name]["Q5_0"] == pytest.approx(expected, rel=1e-5)


def whole_pass_damage(model, windows, group, type_name) -> float:
    """One group's damage from two whole forward passes, nothing replayed."""
    import torch

    ids = torch.tensor(windows)
    parameters = dict(model.named_parameters())
    originals = {name: parameters[name].detach().clone() for name in group.parameters}
    with torch.no_grad():
        base = sensitivity.Distribution.of(model(ids).logits)
        for name, original in originals.items():
            parameters[name].copy_(torch.from_numpy(
                gguf.search_round_trip(original.float().numpy(), type_name, threads=1)).to(original.dtype))
        damage = sensitivity.kl_divergence(base, model(ids).logits)
        for name, original in originals.items():
            parameters[name].copy_(original)
    return damage


def assert_replayed_layers_change_nothing(model, windows):
    """Every group's figure, its pass started at its own layer, equals two whole passes'."""
    import torch

    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in model.named_parameters())
    damage = sensitivity.measure(model, windows, groups, {g.name: ["Q8_0"] for g in groups},
                                 lambda w, t: gguf.search_round_trip(w, t, threads=1), unquantized_type="F16")
    assert {g.layer for g in groups} - {None} == set(range(model.config.get_text_config().num_hidden_layers))
    for group in groups:
        assert damage[group.name]["Q8_0"] == pytest.approx(whole_pass_damage(model, windows, group, "Q8_0"),
                                                           rel=1e-6, abs=1e-12), group.name
    assert not any("forward" in vars(module) for module in model.modules())  # every layer computes again
    assert not any(module._forward_hooks for module in model.modules())
    ids = torch.tensor(windows)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def assert_scaled_figures_weigh_every_linear(model, windows):
    """Every Linear group scaled from Q8_0 to Q5_0: the anchor's figure is its pass's, and the
    scaled one is larger, so each of the group's Linears was seen called (fused or not)."""
    import torch

    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in model.named_parameters())
    linear = [g for g in groups if all(isinstance(model.get_submodule(name.removesuffix(".weight")), torch.nn.Linear)
                                       for name in g.parameters)]
    candidates = {g.name: ["Q8_0", "Q5_0"] for g in linear}

    def round_trip(w, t):
        return gguf.search_round_trip(w, t, threads=1)

    scaled = sensitivity.measure(model, windows, linear, candidates, round_trip, unquantized_type="F16",
                                 scaled_from={g.name: "Q8_0" for g in linear})
    passed = sensitivity.measure(model, windows, linear, {g.name: ["Q8_0"] for g in linear}, round_trip,
                                 unquantized_type="F16")
    for group in linear:
        assert scaled[group.name]["Q8_0"] == pytest.approx(passed[group.name]["Q8_0"], rel=1e-9), group.name
        assert scaled[group.name]["Q5_0"] > scaled[group.name]["Q8_0"] > 0, group.name
        inputs = {}
        with torch.inference_mode(), sensitivity.inputs_kept(model, group, inputs):
            model(torch.tensor(windows))
        assert set(inputs) == set(group.parameters), group.name
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_a_groups_pass_starting_at_its_own_layer_scores_as_a_whole_pass(tiny_model):
    assert_replayed_layers_change_nothing(tiny_model, [list(range(1, 65)), list(range(30, 94))])


def test_a_format_that_quantizes_activations_has_the_groups_inputs_quantized_while_it_is_measured(tiny_model):
    """ModelOpt's round trips: the weight alone, then weight and inputs, of one group; the
    inputs' quantizer runs only on the group's Linears, only while that group is measured."""
    import torch

    from pipeline.formats import modelopt

    windows = [list(range(1, 65)), list(range(30, 94))]
    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in tiny_model.named_parameters())
    down = next(g for g in groups if g.name == "layers.1.mlp_down")
    seen = []

    def inputs_round_trip(inputs, type_name):
        seen.append((tuple(inputs.shape), type_name))
        return modelopt.search_input_round_trip(inputs, type_name)

    def measure(input_round_trip):
        return sensitivity.measure(tiny_model, windows, [down], {down.name: ["NVFP4"]},
                                   lambda w, t: modelopt.search_round_trip(w, t, threads=1),
                                   unquantized_type="UNQUANTIZED", input_round_trip=input_round_trip)[down.name]

    weights_only, with_inputs = measure(None), measure(inputs_round_trip)
    assert seen == [((2, 64, 192), "NVFP4")]  # one pass, every window in it
    assert with_inputs["NVFP4"] > weights_only["NVFP4"] > 0
    assert not any(module._forward_pre_hooks for module in tiny_model.modules())
    baseline = measure(None)
    assert baseline == weights_only and torch.is_grad_enabled()


def test_the_output_error_is_the_squared_change_of_the_linears_outputs():
    import torch

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 8, generator=generator)
    quantized_weight = torch.round(weight * 4) / 4
    calls = [torch.randn(2, 5, 8, generator=generator), torch.randn(1, 3, 8, generator=generator)]

    def expected(round_inputs):
        return sum(float((round_inputs(x) @ quantized_weight.T - x @ weight.T).square().sum()) for x in calls)

    error = sensitivity.output_error({"w": weight}, {"w": calls}, lambda name: quantized_weight)
    assert error == pytest.approx(expected(lambda x: x), rel=1e-5)
    with_inputs = sensitivity.output_error({"w": weight}, {"w": calls}, lambda name: quantized_weight,
                                           lambda x: torch.round(x * 2) / 2)
    assert with_inputs == pytest.approx(expected(lambda x: torch.round(x * 2) / 2), rel=1e-5)
    assert sensitivity.output_error({"w": weight}, {"w": calls}, lambda name: weight) == 0.0


def test_a_scaled_group_is_passed_at_its_anchor_type_and_the_others_scaled_by_their_output_error(tiny_model):
    """The anchor's figure is its pass's; each other type's is the anchor's times the ratio of
    their output errors on the inputs the group's Linears were called with."""
    import torch

    windows = [list(range(1, 65)), list(range(30, 94))]
    groups, _ = sensitivity.groups_of((n, tuple(p.shape)) for n, p in tiny_model.named_parameters())
    layer_groups = [g for g in groups if g.layer is not None]
    candidates = {g.name: gguf.search_candidates(g) for g in layer_groups}

    def round_trip(w, t):
        return gguf.search_round_trip(w, t, threads=1)

    passes = []
    scaled = sensitivity.measure(tiny_model, windows, layer_groups, candidates, round_trip, unquantized_type="F16",
                                 scaled_from={g.name: "IQ4_NL" for g in layer_groups},
                                 progress=lambda: passes.append(1))
    measured = sensitivity.measure(tiny_model, windows, layer_groups, candidates, round_trip, unquantized_type="F16")
    assert len(passes) == len(layer_groups)
    parameters = dict(tiny_model.named_parameters())
    for group in layer_groups:
        assert scaled[group.name]["IQ4_NL"] == pytest.approx(measured[group.name]["IQ4_NL"], rel=1e-9)
        assert scaled[group.name]["IQ4_NL"] > scaled[group.name]["Q5_0"] > scaled[group.name]["Q8_0"] > 0
        inputs = {}
        with torch.inference_mode(), sensitivity.inputs_kept(tiny_model, group, inputs):
            tiny_model(torch.tensor(windows))
        weights = {name: parameters[name].detach() for name in group.parameters}

        def error(type_name):
            return sensitivity.output_error(weights, inputs, lambda name: torch.from_numpy(
                round_trip(weights[name].numpy(), type_name)))

        assert scaled[group.name]["Q8_0"] == pytest.approx(
            measured[group.name]["IQ4_NL"] * error("Q8_0") / error("IQ4_NL"), rel=1e-5)
    assert not any(module._forward_pre_hooks for module in tiny_model.modules())


def test_the_stage_without_formats_loads_nothing(tmp_path, monkeypatch):
    import pipeline.runtimes.transformers as transformers_runtime

    monkeypatch.setattr(transformers_runtime, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    record = sensitivity.run(SensitivityParams(), tmp_path / "no-source", tmp_path / "none.txt", tmp_path / "out",
                             threads=1, log=lambda _: None)
    assert record["formats"] == {}
    assert json.loads((tmp_path / "out" / sensitivity.SENSITIVITY_FILE).read_text()) == record


def test_the_stage_measures_every_group_of_a_named_format(tiny_llama, tmp_path):
    (tiny_llama / "source.json").write_text("{}")
    params = SensitivityParams(formats=["gguf"], windows=2, window_tokens=64, types={"gguf": ["Q8_0", "Q5_0"]},
                               check_groups=3)
    record = sensitivity.run(params, tiny_llama, tiny_llama.parent / "calibration.txt", tmp_path / "out",
                             threads=1, log=lambda _: None)
    measured = record["formats"]["gguf"]
    assert measured["method"] == "scaled"
    # the tied embedding is no Linear: every type passed; each layer group passed at Q5_0 (the
    # fewest bytes) and its Q8_0 scaled, but for the 3 checked groups, passed at both
    check = measured["estimate_check"]
    assert [(pair["group"], pair["type"]) for pair in check["pairs"]] == [
        ("layers.0.attn_qkv", "Q8_0"), ("layers.0.mlp_gate_up", "Q8_0"), ("layers.1.attn_qkv", "Q8_0")]
    assert check["spearman"] is not None and check["median_relative_error"] >= 0
    scaled = {g["name"] for g in measured["groups"] if any(o["scaled"] for o in g["options"].values())}
    assert scaled == {f"layers.{layer}.{kind}" for layer in (0, 1)
                      for kind in ("attn_qkv", "attn_out", "mlp_gate_up", "mlp_down")} - {
        pair["group"] for pair in check["pairs"]}
    for group in measured["groups"]:
        assert not group["options"]["Q5_0"]["scaled"]
    assert [g["name"] for g in measured["groups"]][:2] == ["embedding", "layers.0.attn_qkv"]
    assert len(measured["groups"]) == 1 + 2 * 4
    for group in measured["groups"]:
        assert set(group["options"]) == {"F16", "Q5_0", "Q8_0"}
        assert group["options"]["Q8_0"]["bytes"] < group["options"]["F16"]["bytes"]
    # norms: 2 per layer and the final one, 64 wide
    assert measured["other_weights"] == 5 * 64
    assert measured["weights"] == measured["other_weights"] + sum(
        np.prod(shape) for g in measured["groups"] for shape in g["shapes"])


def test_the_stage_refuses_before_loading_when_its_windows_and_model_do_not_fit(tiny_llama, tmp_path, monkeypatch):
    from pipeline import memory
    from pipeline.errors import HostLacks

    (tiny_llama / "source.json").write_text("{}")
    params = SensitivityParams(formats=["gguf"], windows=2, window_tokens=64)
    need = sensitivity.memory_need(params, tiny_llama, "cpu")
    assert need.window_tokens == 128 and need.dtype == "float32"  # every window's logits at once
    # and 2 layers' fp32 outputs of width 64, and a down projection's inputs of width 192, for 128 tokens
    assert need.mapped_bytes == (2 * 64 + 192) * 128 * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": need.bytes - 1)
    monkeypatch.setattr("pipeline.runtimes.transformers.load_causal_lm",
                        lambda *a, **k: pytest.fail("loaded the model before checking its memory"))
    with pytest.raises(HostLacks, match="the sensitivity stage in float32 needs about") as refused:
        sensitivity.run(params, tiny_llama, tiny_llama.parent / "calibration.txt", tmp_path / "out",
                        threads=1, log=lambda _: None)
    assert "sensitivity.dtype: bfloat16" in refused.value.fix
    assert not (tmp_path / "out").exists()


def test_a_format_without_a_search_is_refused_naming_the_key(tmp_path):
    from pipeline.errors import BadInput

    with pytest.raises(BadInput) as refused:
        sensitivity.run(SensitivityParams(formats=["myquant"]), tmp_path, tmp_path / "c.txt", tmp_path / "out",
                        threads=1, log=lambda _: None)
    assert refused.value.where == "params.yaml: sensitivity.formats" and "gguf, awq, modelopt" in refused.value.fix
    assert not (tmp_path / "out").exists()
