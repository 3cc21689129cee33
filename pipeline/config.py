"""Params (params.yaml) and recipes (recipes/NAME.yaml), validated by pydantic.

Every validation error becomes one BadInput naming the file, the key and the fix.
Unknown keys are rejected everywhere, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from pipeline.errors import BadInput

PARAMS_FILE = Path("params.yaml")
RECIPES_DIR = Path("recipes")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- recipe


GateName = Literal["accuracy", "speed"]


class RelativeLimit(Strict):
    """A limit of `factor` times another recipe's measured figure, e.g. a Q4_K_M's mean KLD at
    most 12 times the Q8_0's: it scales with the model where an absolute figure does not.
    Checked once both recipes are gated (``gates.verdict.resolve``)."""

    relative_to: str = Field(min_length=1)
    factor: float = Field(gt=0, allow_inf_nan=False)


# limit key -> (lowest allowed, highest allowed, whether the lowest is allowed itself)
LIMIT_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "max_ppl_ratio": (0.0, None, False),
    "max_mean_kld": (0.0, None, True),
    "min_top1_agreement": (0.0, 1.0, True),
    "min_decode_speedup": (0.0, None, False),
    "min_roofline_fraction": (0.0, None, True),
    "max_tokenizer_mismatch": (0.0, 1.0, True),
    # the same limits on the bound of the figure's 95 % interval (accuracy ci95)
    "max_ppl_ratio_upper": (0.0, None, False),
    "max_mean_kld_upper": (0.0, None, True),
    "min_top1_agreement_lower": (0.0, 1.0, True),
}
LIMIT_KEYS = tuple(LIMIT_BOUNDS)


class GateLimits(Strict):
    """Limits a recipe's artifact must meet. Each is optional (absent = not checked), and each
    is a number or a RelativeLimit (`{relative_to: <recipe>, factor: <x>}`)."""

    max_ppl_ratio: float | RelativeLimit | None = None
    max_mean_kld: float | RelativeLimit | None = None
    min_top1_agreement: float | RelativeLimit | None = None
    min_decode_speedup: float | RelativeLimit | None = None
    min_roofline_fraction: float | RelativeLimit | None = None
    max_tokenizer_mismatch: float | RelativeLimit | None = None
    max_ppl_ratio_upper: float | RelativeLimit | None = None
    max_mean_kld_upper: float | RelativeLimit | None = None
    min_top1_agreement_lower: float | RelativeLimit | None = None
    require: list[GateName] = Field(default_factory=lambda: ["accuracy", "speed"])

    @field_validator(*LIMIT_KEYS, mode="before")
    @classmethod
    def _number_or_relative(cls, value: Any, info) -> Any:
        if value is None or isinstance(value, RelativeLimit):
            return value
        if isinstance(value, dict):
            try:
                return RelativeLimit.model_validate(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                key = ".".join(str(part) for part in error["loc"])
                raise ValueError(f"a relative limit is {{relative_to: <recipe>, factor: <number>}}; "
                                 f"{key}: {error['msg']}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number or {{relative_to: <recipe>, factor: <number>}}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        low, high, low_allowed = LIMIT_BOUNDS[info.field_name]
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            span = f"{'[' if low_allowed else '('}{low:g}, {high:g}]" if high is not None else \
                f"{'at least' if low_allowed else 'above'} {low:g}"
            raise ValueError(f"must be {span}, got {value!r}")
        return float(value)


class GateLimitOverrides(GateLimits):
    """params.yaml `limits.<recipe>`: the keys given replace the recipe's own."""

    require: list[GateName] | None = None


class RecipeBase(Strict):
    """Keys every recipe has; each format module subclasses this with its own knobs."""

    format: str
    description: str = ""
    gates: GateLimits = Field(default_factory=GateLimits)
    _path: Path | None = PrivateAttr(default=None)  # the YAML file it was read from

    def where(self, key: str) -> str:
        """`<recipe file>: <key>`, for errors a build finds after validation."""
        return f"{self._path or 'recipe'}: {key}"


def load_recipe(name: str, recipes_dir: Path = RECIPES_DIR) -> RecipeBase:
    from pipeline import formats

    path = Path(recipes_dir) / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(recipes_dir).glob("*.yaml"))
        raise BadInput(
            f"no recipe named {name!r}",
            where=str(path),
            fix=f"create {path} or use one of: {', '.join(available) or '(none)'}",
        )
    raw = _read_yaml_mapping(path)
    fmt = raw.get("format")
    if fmt not in formats.FORMATS:
        raise BadInput(
            f"unknown format {fmt!r}",
            where=f"{path}: format",
            fix=f"set format to one of: {', '.join(sorted(formats.FORMATS))}",
        )
    recipe = _validate(formats.recipe_class(fmt), raw, path)
    recipe._path = path
    return recipe


# ---------------------------------------------------------------- params


class ModelParams(Strict):
    # embedded:smollm2-135m | a local HF checkpoint directory | a hub id (org/name)
    source: str = "embedded:smollm2-135m"
    revision: str | None = None


class CorpusParams(Strict):
    # embedded:pydoc | files | hf:<dataset id>
    source: str = "embedded:pydoc"
    calibration_file: str | None = None
    evaluation_file: str | None = None
    text_field: str = "text"
    hf_config: str | None = None
    hf_calibration_split: str = "train"
    hf_evaluation_split: str = "test"


class ReferenceParams(Strict):
    windows: int = Field(40, ge=1)
    window_tokens: int = Field(512, ge=8)
    # the unquantized model's dtype on every device; bfloat16 halves its memory (README: its
    # effect on a near-lossless quant's KLD)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class SpeedParams(Strict):
    prompt_tokens: int = Field(512, ge=1)
    gen_tokens: int = Field(128, ge=2)
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    threads: int = Field(0, ge=0)  # 0 = one per physical core
    # requests at once for output throughput, where the runtime batches (vLLM, TensorRT-LLM)
    concurrency: int = Field(8, ge=1)


class Params(Strict):
    model: ModelParams = Field(default_factory=ModelParams)
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    reference: ReferenceParams = Field(default_factory=ReferenceParams)
    speed: SpeedParams = Field(default_factory=SpeedParams)
    recipes: list[str] = Field(default_factory=list)
    # recipe name -> limits that replace the recipe file's (for `dvc exp run -S limits.R.key=value`)
    limits: dict[str, GateLimitOverrides] = Field(default_factory=dict)


def effective_limits(recipe: RecipeBase, name: str, params: Params) -> tuple[GateLimits, dict[str, str]]:
    """The recipe's gate limits with params.yaml `limits.<name>` applied, and for each limit
    set, where it was set (`recipes/R.yaml: gates.key` or `params.yaml: limits.R.key`)."""
    override = params.limits.get(name)
    given = {key: getattr(override, key) for key in override.model_fields_set} if override else {}
    limits = recipe.gates.model_copy(update=given)
    recipe_file = recipe._path or Path(RECIPES_DIR) / f"{name}.yaml"
    set_in = {key: (f"{PARAMS_FILE}: limits.{name}.{key}" if key in given else f"{recipe_file}: gates.{key}")
              for key in LIMIT_KEYS if getattr(limits, key) is not None}
    return limits, set_in


def load_params(path: Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise BadInput("params file not found", where=str(path), fix="run qpipe from the project root")
    params = _validate(Params, _read_yaml_mapping(path), path)
    for name in params.limits:
        if name not in params.recipes:  # a typo would otherwise change nothing, silently
            raise BadInput(f"limits are set for recipe {name!r}, which `recipes` does not list",
                           where=f"{path}: limits.{name}",
                           fix=f"use one of: {', '.join(params.recipes) or '(no recipes listed)'}")
    return params


# ---------------------------------------------------------------- helpers


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInput(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where,
                       fix="correct the YAML syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInput("expected a mapping of keys to values", where=str(path),
                       fix="write the file as `key: value` lines")
    return raw


def _validate(model: type[BaseModel], raw: dict[str, Any], path: Path):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        what, where, fix = _describe(exc, model, path)
        raise BadInput(what, where=where, fix=fix) from None


def _describe(exc: ValidationError, model: type[BaseModel], path: Path) -> tuple[str, str, str]:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    more = exc.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if error["type"] == "extra_forbidden":
        parent = _model_at(model, error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else ""
        return (f"unknown key {key!r}{suffix}", f"{path}: {key}",
                f"remove it or use one of: {allowed}" if allowed else "remove it")
    if error["type"] == "literal_error":
        return (f"{error['msg']} (got {error.get('input')!r}){suffix}", f"{path}: {key}",
                "use one of the values listed")
    return (f"{error['msg']} (got {error.get('input')!r}){suffix}", f"{path}: {key}",
            "correct the value")


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested pydantic model that holds the key at `loc` (None if not a model)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
