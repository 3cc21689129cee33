"""The sensitivity stage: what quantizing each group of tensors alone costs, measured once per
model and calibration text, for the per-tensor precision search (``pipeline.search``).

A group is what a runtime can give one precision: per decoder layer the attention's q/k/v
projections (vLLM fuses them, so they share a scheme), its output projection, the MLP's
gate/up projections (fused likewise) and its down projection; and the token embedding and
the output layer (one group where they are tied). For each group and each candidate type a
format offers for its row width, the group's weights are put through that format's own
quantizer and back (GGUF: ggml_quantize_chunk, what llama-quantize calls) while every other
tensor stays as the checkpoint holds it, and the damage is the mean KL divergence, over the
full vocabulary and every position of the calibration windows, from the unquantized model's
next-token distribution. Cost: one forward pass of the windows per (group, candidate), from
the group's own decoder layer on, with the model loaded once and one group's original weights
kept aside (docs/sensitivity.md).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BadInput

SENSITIVITY_FILE = "sensitivity.json"

# a group kind from the name of the module holding the weight; layers are `...layers.N...`
GROUP_KINDS = {
    "q_proj": "attn_qkv", "k_proj": "attn_qkv", "v_proj": "attn_qkv", "qkv_proj": "attn_qkv",
    "query_key_value": "attn_qkv",
    "o_proj": "attn_out", "out_proj": "attn_out", "dense": "attn_out",
    "gate_proj": "mlp_gate_up", "up_proj": "mlp_gate_up", "gate_up_proj": "mlp_gate_up",
    "down_proj": "mlp_down",
    "embed_tokens": "embedding", "lm_head": "output",
}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Group:
    name: str                    # e.g. "layers.3.attn_qkv", "embedding"
    kind: str                    # a GROUP_KINDS value
    layer: int | None
    parameters: tuple[str, ...]  # the model's parameter names
    shapes: tuple[tuple[int, int], ...]

    @property
    def row_width(self) -> set[int]:
        return {shape[1] for shape in self.shapes}

    def weights(self) -> int:
        return sum(rows * width for rows, width in self.shapes)


def groups_of(named_parameters) -> tuple[list[Group], list[str]]:
    """The model's groups (in model order) and the names of its 2-D weights no group takes.
    `named_parameters`: (name, shape) pairs, as the model names them (tied weights once)."""
    members: dict[str, dict[str, Any]] = {}
    unsearched = []
    for name, shape in named_parameters:
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        kind = GROUP_KINDS.get(module)
        layer_match = LAYER_INDEX.search(name)
        if kind is None or (kind in ("embedding", "output")) == bool(layer_match):
            unsearched.append(name)
            continue
        layer = int(layer_match.group(1)) if layer_match else None
        key = f"layers.{layer}.{kind}" if layer is not None else kind
        entry = members.setdefault(key, {"kind": kind, "layer": layer, "parameters": [], "shapes": []})
        entry["parameters"].append(name)
        entry["shapes"].append(tuple(int(size) for size in shape))
    groups = [Group(name=key, kind=entry["kind"], layer=entry["layer"], parameters=tuple(entry["parameters"]),
                    shapes=tuple(entry["shapes"])) for key, entry in members.items()]
    return groups, unsearched


def types_that_tile(group: Group, types: list[str] | None, search_types: tuple[str, ...], block_of) -> list[str]:
    """The search types (or those of `types`, in search order) whose block, ``block_of(type)``
    values a scale, divides every row of the group."""
    wanted = [t.upper() for t in types] if types else list(search_types)
    return [t for t in search_types if t in wanted and all(width % block_of(t) == 0 for width in group.row_width)]


def fused_disagreement(type_of_linear: dict[str, str]) -> tuple[list[str], list[str]] | None:
    """The first set of Linears a runtime fuses into one layer (a group: q/k/v, gate/up) whose
    types in ``type_of_linear`` ({Linear module name: its type}) differ, as (names, types);
    None where every fused set agrees."""
    groups, _ = groups_of((f"{name}.weight", (0, 0)) for name in type_of_linear)
    for group in groups:
        names = [parameter.removesuffix(".weight") for parameter in group.parameters]
        types = sorted({type_of_linear[name] for name in names})
        if len(types) > 1:
            return names, types
    return None


@dataclass(frozen=True)
class Distribution:
    """The unquantized model's next-token distribution over the windows ([..., V] float32 torch
    each): its logits, its probabilities and their sums (1 but for rounding)."""
    logits: Any
    probs: Any
    prob_sums: Any

    @classmethod
    def of(cls, logits) -> Distribution:
        import torch

        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        return cls(logits, probs, probs.sum(dim=-1))


KL_CHUNK_POSITIONS = 16  # positions whose full-vocabulary terms are worked at once, in cache


def kl_divergence(base: Distribution, logits) -> float:
    """Mean over positions of KL(base || quantized), full vocabulary. With d the base logits less
    the quantized ones and p the base probabilities over their sum s,
    KL = sum(p d) / s + log1p(sum(p expm1(-d)) / s): it sums only small differences, never two
    log-normalizers of size ~10, and expm1 / log1p keep the second-order terms that are the
    divergence (float64's figure to ~1e-7 at a KLD of 5e-7, where log_softmax's is off by 1 %).
    A few positions at a time: whole [T, V] temporaries made it memory-bound, 7x slower."""
    import torch

    vocabulary = base.logits.shape[-1]
    base_logits, probs = base.logits.reshape(-1, vocabulary), base.probs.reshape(-1, vocabulary)
    prob_sums, logits = base.prob_sums.reshape(-1), logits.reshape(-1, vocabulary)
    total = 0.0
    for start in range(0, base_logits.shape[0], KL_CHUNK_POSITIONS):
        rows = slice(start, start + KL_CHUNK_POSITIONS)
        difference = base_logits[rows] - logits[rows].float()
        linear = (probs[rows] * difference).sum(dim=-1)
        exponential = difference.neg_().expm1_().mul_(probs[rows]).sum(dim=-1)
        total += float((linear / prob_sums[rows] + torch.log1p(exponential / prob_sums[rows])).sum())
    return total / base_logits.shape[0]


def measure(model, windows: list[list[int]], groups: list[Group], candidates: dict[str, list[str]],
            round_trip, *, unquantized_type: str, input_round_trip=None, scaled_from: dict[str, str] | None = None,
            progress=None, replay_layers: bool = True) -> dict[str, dict[str, float]]:
    """{group name: {type: mean KLD}} with each group alone put through `round_trip(weight
    [rows, width] float32 numpy, type) -> numpy` for each of `candidates[group name]` (the
    format's quantizer, from the weights as its build holds them), and for a format that
    quantizes activations too, the group's inputs through `input_round_trip(tensor, type) ->
    tensor` (every window in one batch, so a max-calibrated scale sees them all); the
    `unquantized_type` (the format's unquantized file or checkpoint type) is taken as damage 0.
    A group of `scaled_from` ({group name: type}, Linears only) is passed through the model at
    that type alone; its other types' figures are that one's scaled by their output error
    (``output_error``). A group's pass starts at its own decoder layer (``layers_replayed``;
    `replay_layers` False: every pass runs the whole model, which benchmarks/sensitivity_cost.py
    compares)."""
    import torch

    parameters = dict(model.named_parameters())
    scaled_from = scaled_from or {}

    def inputs_quantized(group: Group, type_name: str):
        return contextlib.nullcontext() if input_round_trip is None else pre_hooks(
            model, group, lambda name, args: (input_round_trip(args[0], type_name), *args[1:]))

    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long, device=model.device)
    layers = decoder_layers(model, groups) if replay_layers else {}
    unquantized_outputs: dict[int, Any] = {}

    def window_logits():
        with torch.inference_mode():
            return model(ids, use_cache=False).logits

    def quantized(original, type_name: str):  # float32; copy_ casts it to the parameter's dtype
        return torch.from_numpy(round_trip(original.float().cpu().numpy(), type_name)).to(model.device)

    with kept_outputs(layers, unquantized_outputs):
        base = Distribution.of(window_logits())
    damage: dict[str, dict[str, float]] = {}
    for group in groups:
        originals = {name: parameters[name].detach().clone() for name in group.parameters}
        damage[group.name] = {unquantized_type: 0.0}
        first_changed = max(layers, default=-1) + 1 if group.kind == "output" else group.layer or 0
        passed = [scaled_from[group.name]] if group.name in scaled_from else candidates[group.name]
        inputs: dict[str, list] = {}
        for type_name in passed:
            with torch.no_grad():
                for name, original in originals.items():
                    parameters[name].copy_(quantized(original, type_name))
            with (inputs_kept(model, group, inputs) if group.name in scaled_from else contextlib.nullcontext(),
                  inputs_quantized(group, type_name), layers_replayed(layers, unquantized_outputs, first_changed)):
                damage[group.name][type_name] = kl_divergence(base, window_logits())
            if progress:
                progress()
        errors = {}
        if group.name in scaled_from:
            # the anchor's weights as the pass used them, still in the parameters: no second round trip
            errors = {type_name: output_error(
                originals, inputs, (lambda name: parameters[name]) if type_name == passed[0] else
                (lambda name, t=type_name: quantized(originals[name], t).to(originals[name].dtype)),
                None if input_round_trip is None else lambda x, t=type_name: input_round_trip(x, t))
                for type_name in candidates[group.name]}
        with torch.no_grad():
            for name, original in originals.items():
                parameters[name].copy_(original)
        if errors:
            anchor = scaled_from[group.name]
            for type_name in candidates[group.name]:
                damage[group.name][type_name] = (damage[group.name][anchor] * errors[type_name] / errors[anchor]
                                                 if errors[anchor] > 0 else 0.0)
    return damage


@contextlib.contextmanager
def pre_hooks(model, group: Group, hook, *, prepend: bool = False):
    """Inside the block, ``hook(parameter name, args)`` runs before each of the group's modules
    (what it returns, if anything, replaces their arguments)."""
    handles = [model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
        lambda module, args, name=name: hook(name, args), prepend=prepend) for name in group.parameters]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def inputs_kept(model, group: Group, inputs: dict[str, list]):
    """Inside the block, the inputs each of the group's modules is called with (before any hook
    that quantizes them) are appended to `inputs[parameter name]`."""
    return pre_hooks(model, group, lambda name, args: inputs.setdefault(name, []).append(args[0].detach()),
                     prepend=True)


def output_error(weights: dict[str, Any], inputs: dict[str, list], quantized, input_round_trip=None) -> float:
    """The squared error the group's Linears make on the inputs they were called with:
    sum over its Linears of ||q(X) quantized(W)^T - X W^T||^2, q the format's input round trip (or
    none). A KL divergence from small output changes is a quadratic form in them, so for one
    group the ratio of two types' output errors stands in for the ratio of their damages, where
    the quantizers' errors have alike directions (the stage checks this, ``estimate_check``)."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for name, weight in weights.items():
            weight = weight.float()
            weight_error = quantized(name).float() - weight
            for called_with in inputs.get(name, []):
                x = called_with.float()
                x_quantized = x if input_round_trip is None else input_round_trip(called_with).float()
                # = q(x) Wq^T - x W^T, without subtracting two near-equal outputs
                error = x_quantized @ weight_error.T
                if input_round_trip is not None:
                    error += (x_quantized - x) @ weight.T
                total += float(error.square().sum())
    return total


def decoder_layers(model, groups: list[Group]) -> dict[int, Any]:
    """{layer index: decoder layer module} of the whole decoder stack the groups' layers sit in
    (every layer, whether or not a group measured here is in it; {} where no group is)."""
    for group in groups:
        if group.layer is not None:
            name = group.parameters[0]
            return dict(enumerate(model.get_submodule(name[:LAYER_INDEX.search(name).start()] + ".layers")))
    return {}


@contextlib.contextmanager
def kept_outputs(layers: dict[int, Any], outputs: dict[int, Any]):
    """Inside the block, each decoder layer's output (whatever it returns) is kept in `outputs`."""
    handles = [layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
               for index, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def layers_replayed(layers: dict[int, Any], outputs: dict[int, Any], first_changed: int):
    """Inside the block, the decoder layers before `first_changed` return their unquantized
    outputs without computing: their weights and inputs are the unquantized pass's, so the
    figures are the same as a whole pass's, for half the passes' work on average. The last one
    returns a copy, in case a later layer writes into its input."""
    import torch

    def copied(output):
        return output.clone() if isinstance(output, torch.Tensor) else type(output)(copied(o) for o in output)

    replayed = [index for index in layers if index < first_changed]
    for index in replayed:
        output = copied(outputs[index]) if index == replayed[-1] else outputs[index]
        layers[index].forward = lambda *args, output=output, **kwargs: output
    try:
        yield
    finally:
        for index in replayed:
            del layers[index].forward


def spread(items: list, count: int) -> list:
    """`count` of `items` evenly spaced from the first (all of them where there are fewer)."""
    return items[::max(1, len(items) // count)][:count] if count else []


def estimate_check(scaled: dict[str, dict[str, float]], passed: dict[str, dict[str, float]],
                   scaled_from: dict[str, str]) -> dict[str, Any]:
    """Each type of each group in `passed` whose figure in `scaled` was scaled, not passed, both
    figures; Spearman's rank correlation over them (None under 3) and the median relative error."""
    pairs = [{"group": group, "type": type_name, "scaled": scaled[group][type_name], "passed": figure}
             for group, figures in passed.items() for type_name, figure in figures.items()
             if type_name != scaled_from[group] and figure > 0]
    errors = sorted(abs(pair["scaled"] - pair["passed"]) / pair["passed"] for pair in pairs)
    return {"pairs": pairs,
            "spearman": rank_correlation([p["scaled"] for p in pairs], [p["passed"] for p in pairs])
            if len(pairs) > 2 else None,
            "median_relative_error": float(np.median(errors)) if errors else None}


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: measured figures)."""
    ranks = [np.argsort(np.argsort(values)) for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def load(directory: Path) -> dict[str, Any]:
    path = Path(directory) / SENSITIVITY_FILE
    if not path.is_file():
        raise BadInput("no sensitivity measurement", where=str(path), fix="run `qpipe sensitivity` (or `dvc repro`)")
    return json.loads(path.read_text())


def run(params, source_dir: Path, calibration_text: Path, out_dir: Path, *, threads: int, log=print) -> dict:
    """The sensitivity stage: for each format in `params.formats`, each group's damage at each
    candidate type and its bytes -> out_dir/sensitivity.json; with no format named, a record
    saying so (no model is loaded)."""
    from pipeline import formats
    from pipeline.files import atomic_dir

    searchable = [name for name in formats.FORMATS if hasattr(formats.module(name), "resolve_search")]
    for name in params.formats:
        if name not in searchable:
            raise BadInput(f"format {name!r} has no per-tensor search", where="params.yaml: sensitivity.formats",
                           fix=f"name only formats that have one: {', '.join(searchable)}")
    for name, types in params.types.items():
        known = formats.module(name).SEARCH_TYPES if name in searchable else ()
        unknown = [t for t in types if t.upper() not in known]
        if unknown:
            raise BadInput(f"{name} has no search type {', '.join(unknown)}", where=f"params.yaml: sensitivity.types.{name}",
                           fix=f"choose from: {', '.join(known) or '(no format of that name searches)'}")
    record: dict[str, Any] = {"windows": params.windows, "window_tokens": params.window_tokens, "formats": {}}
    if params.formats:
        record["formats"] = measure_formats(params, source_dir, calibration_text, threads=threads, log=log)
    with atomic_dir(out_dir) as staging:
        (staging / SENSITIVITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def memory_need(params, source_dir: Path, device: str):
    """What the stage needs for the checkpoint at `source_dir` (``memory.Need``): every window's
    logits are held at once, every decoder layer's unquantized output (``kept_outputs``) and a
    scaled group's inputs, at most the MLP's down projection's (``inputs_kept``)."""
    from pipeline import memory

    config = json.loads((Path(source_dir) / "config.json").read_text())
    text = {**config, **(config.get("text_config") or {})}
    tokens = params.windows * params.window_tokens
    widths = int(text["num_hidden_layers"]) * int(text["hidden_size"]) + int(text.get("intermediate_size") or 0)
    return memory.Need(memory.SENSITIVITY, memory.ModelSize.of(source_dir), window_tokens=tokens, dtype=params.dtype,
                       mapped_bytes=widths * tokens * memory.DTYPE_BYTES[params.dtype], device=device)


def measure_formats(params, source_dir: Path, calibration_text: Path, *, threads: int, log) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pipeline import formats, memory
    from pipeline.corpus import calibration_windows
    from pipeline.runtimes.transformers import load_causal_lm, torch_device

    if not (Path(source_dir) / "source.json").is_file():
        raise BadInput("no source checkpoint", where=str(source_dir), fix="run `qpipe source` first")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    windows = calibration_windows(tokenizer, calibration_text, params.windows, params.window_tokens,
                                  "params.yaml: sensitivity.windows / sensitivity.window_tokens")
    device = torch_device()
    memory.ensure_fits(memory_need(params, source_dir, device), stage=f"the sensitivity stage in {params.dtype}",
                       fix="set sensitivity.dtype: bfloat16 in params.yaml (half the weights' memory), or lower "
                           "sensitivity.windows / window_tokens (every window is scored in one batch)"
                       if params.dtype == "float32" else
                       "lower sensitivity.windows / window_tokens (every window is scored in one batch), or run on "
                       "a host with more memory or a GPU")
    model = load_causal_lm(source_dir, dtype=getattr(torch, params.dtype)).to(device).eval()
    groups, unsearched = groups_of((name, tuple(p.shape)) for name, p in model.named_parameters())
    weights = sum(p.numel() for p in model.parameters())
    measured = {}
    for format_name in params.formats:
        fmt = formats.module(format_name)
        candidates = {group.name: fmt.search_candidates(group, params.types.get(format_name)) for group in groups}
        scaled_from = {} if params.method == "measured" else {
            group.name: min(candidates[group.name], key=lambda type_name, group=group: fmt.search_bytes(group, type_name))
            for group in groups if len(candidates[group.name]) > 1 and all(
                isinstance(model.get_submodule(name.removesuffix(".weight")), torch.nn.Linear)
                for name in group.parameters)}
        checked = spread([group for group in groups if group.name in scaled_from], params.check_groups)
        count = (sum(1 if name in scaled_from else len(types) for name, types in candidates.items())
                 + sum(len(candidates[group.name]) for group in checked))
        log(f"sensitivity ({format_name}): {len(groups)} groups, {count} quantized forward passes of "
            f"{params.windows} x {params.window_tokens} tokens ({device}; {params.method}"
            + (f", the estimate checked on {len(checked)} groups" if checked else "") + ")")
        started = time.perf_counter()
        with tqdm(total=count, desc=f"sensitivity {format_name}", unit="pass", leave=False) as bar:
            def measured_at(measured_groups, scaled):
                return measure(model, windows, measured_groups, candidates,
                               lambda weight, type_name: fmt.search_round_trip(weight, type_name, threads=threads),
                               unquantized_type=fmt.SEARCH_UNQUANTIZED, scaled_from=scaled,
                               input_round_trip=getattr(fmt, "search_input_round_trip", None),
                               progress=lambda: bar.update(1))

            damage = measured_at(groups, scaled_from)
            passed = measured_at(checked, None) if checked else {}
        check = estimate_check(damage, passed, scaled_from) if scaled_from else None
        if check and check["pairs"]:
            log(f"sensitivity ({format_name}): the scaled figures against passes on {len(checked)} groups: Spearman "
                + (f"{check['spearman']:.2f}" if check["spearman"] is not None else "not judged (under 3 pairs)")
                + f", median relative error {check['median_relative_error']:.0%}")
        damage.update(passed)
        measured[format_name] = {
            "unquantized_type": fmt.SEARCH_UNQUANTIZED,
            "weights": weights,
            "groups": [{"name": group.name, "kind": group.kind, "layer": group.layer,
                        "parameters": list(group.parameters), "shapes": [list(shape) for shape in group.shapes],
                        "options": {type_name: {"bytes": fmt.search_bytes(group, type_name),
                                                "mean_kld": damage[group.name][type_name],
                                                "scaled": group.name in scaled_from and group.name not in passed
                                                and type_name not in (scaled_from[group.name], fmt.SEARCH_UNQUANTIZED)}
                                    for type_name in damage[group.name]}}
                       for group in groups],
            "unsearched": unsearched,
            # norms, biases and any weight no group takes: kept as the format keeps them
            "other_weights": weights - sum(group.weights() for group in groups),
            "method": params.method,
            "passes": count,
            "estimate_check": check,
            "seconds": round(time.perf_counter() - started, 1),
        }
        log(f"sensitivity ({format_name}): {measured[format_name]['seconds']:.0f} s")
    return measured
