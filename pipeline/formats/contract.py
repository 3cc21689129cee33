"""What a format module must provide, and a check that it does (docs/adding-a-format.md).

A format is a module, registered by name in ``pipeline.formats.FORMATS``, with:

- ``INFO``: a ``FormatInfo`` (what doctor, publish, memory checks and the report read);
- ``Recipe``: its pydantic recipe model, a subclass of ``config.RecipeBase``;
- the functions of ``Format`` below, which the build, baseline and gate stages call;
- optionally the hooks in ``OPTIONAL_HOOKS``.

The stages and the CLI ask the format; they never branch on its name. Importing a format
module must not import torch, transformers, llama_cpp, modelopt or llmcompressor: each heavy
package is imported inside the function that needs it (a test checks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from pipeline.memory import Factors

if TYPE_CHECKING:
    from pipeline.config import SpeedParams


@dataclass(frozen=True)
class FormatInfo:
    name: str                   # the recipes' `format:` value and the registry key
    distribution: str           # the package its build needs, as pip names it
    extra: str | None           # the qpipe extra that installs it (None: a core dependency)
    library_name: str           # the model card's library_name
    tags: tuple[str, ...]       # the model card's runtime tags
    calibrates: bool            # the build runs the model on calibration text (on the GPU where there is one)
    build_memory: Factors       # peak memory of its build on the CPU (memory.estimate)
    gate_memory: Factors        # peak memory of its accuracy gate on the CPU
    gate_maps_artifact: bool    # the gate's runtime maps the artifact file whole (llama.cpp)
    # the qpipe extra of the runtime whose engine or speed gate needs a CUDA GPU (vllm, trtllm);
    # None: the format gates fully on a CPU. `qpipe ci init` runs its recipes on GPU runners.
    gpu_runtime: str | None = None


class Format(Protocol):
    """The module-level functions every format defines (the stages call them)."""

    INFO: FormatInfo
    Recipe: type

    def build(self, recipe, *, source_dir: Path, calibration_text: Path, out_dir: Path, threads: int,
              log) -> dict[str, Any]:
        """Source checkpoint -> artifact files in ``out_dir`` (a staging directory); return the
        format's part of build.json. Raise ``errors.RecipeNotApplicable`` before heavy work when
        the recipe cannot apply to this model."""

    def build_unavailable_reason(self) -> str | None:
        """Why this host cannot build the format (a tool missing), or None."""

    def artifact_path(self, build_dir: Path) -> Path:
        """The file or directory a runtime loads."""

    def bits_per_weight(self, build_dir: Path) -> float:
        """Stored bits per logical weight."""

    def decode_bytes_per_token(self, build_dir: Path, context_tokens: float) -> dict[str, float]:
        """Bytes one decode step reads (weights, kv_cache, total), for the roofline."""

    def runtime_name(self, build_dir: Path | None = None) -> str:
        """What the gates run the artifact with (``None``: what they would run here)."""

    def open_session(self, build_dir: Path, threads: int, speed: SpeedParams):
        """The artifact loaded once by the runtime that gates it here (a ``runtimes.Session``:
        its ``window_logits``, ``generate``, ``measure_speed``, ``runtime`` and ``device``), the
        native runtime or a declared emulation. The gate scores its accuracy windows, task
        requests and speed through it, then closes it. ``speed`` is params `speed`: a format
        reads the settings its runtime has at load time (gguf: ``n_gpu_layers``, llama.cpp's
        offload), and the session's ``measure_speed`` gets the same object."""

    def tokenize(self, build_dir: Path, text: str) -> list[int]:
        """The artifact's own tokenizer's ids for ``text``."""

    def baseline_speed(self, source_dir: Path, prompt: list[int], speed: SpeedParams, *,
                       threads: int) -> dict[str, Any]:
        """The unquantized model's speed on the same runtime and params `speed`, for
        ``decode_speedup``."""

    def accuracy_unavailable_reason(self, build_dir: Path | None = None) -> str | None:
        """Why the accuracy gate cannot run here (the gate records ``not_run``), or None."""

    def speed_unavailable_reason(self, build_dir: Path | None = None) -> str | None:
        """Why the speed gate cannot run here, or None. The baseline stage asks with ``None``."""


# optional hook -> its parameters
OPTIONAL_HOOKS: dict[str, tuple[str, ...]] = {
    # host facts the build depends on (written into artifacts/recipes/R.json)
    "host_build_knobs": ("host_info",),
    # the engine@R stage's work for this format: returns engine.json's status and facts
    "build_engine": ("recipe", "build_dir", "out_dir", "log"),
    # the tools its build runs, for doctor: label -> where it is, or what is missing
    "tools": (),
    # the per-tensor search (docs/sensitivity.md), with SEARCH_TYPES and SEARCH_UNQUANTIZED:
    # the types a sensitivity group's rows take, the format's quantizer and back, a group's
    # bytes at a type, and a recipe's `search:` solved into its per-tensor recipe keys
    "search_candidates": ("group", "types"),
    "search_round_trip": ("weight", "type_name", "threads"),
    # a format that quantizes activations too: a Linear's inputs through that type's quantizer
    "search_input_round_trip": ("inputs", "type_name"),
    "search_bytes": ("group", "type_name"),
    "resolve_search": ("recipe", "sensitivity"),
}


def parameters(function) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")


def contract_problems(module: ModuleType) -> list[str]:
    """Everything ``module`` lacks or defines differently from the contract (empty: it meets it)."""
    from pipeline.config import RecipeBase

    problems = []
    info = getattr(module, "INFO", None)
    if not isinstance(info, FormatInfo):
        problems.append("INFO is not a FormatInfo")
    recipe = getattr(module, "Recipe", None)
    if not (isinstance(recipe, type) and issubclass(recipe, RecipeBase)):
        problems.append("Recipe is not a subclass of config.RecipeBase")
    elif info is not None and recipe.model_fields["format"].annotation.__args__ != (info.name,):
        problems.append(f"Recipe.format does not accept exactly {info.name!r}")
    wanted = {name: parameters(member) for name, member in vars(Format).items()
              if inspect.isfunction(member) and not name.startswith("_")}
    wanted.update(OPTIONAL_HOOKS)
    for name, expected in wanted.items():
        function = getattr(module, name, None)
        if function is None:
            if name not in OPTIONAL_HOOKS:
                problems.append(f"{name}() is missing")
            continue
        if not callable(function):
            problems.append(f"{name} is not a function")
        elif parameters(function) != expected:
            problems.append(f"{name}{parameters(function)} should take {expected}")
    return problems


def missing_distribution(info: FormatInfo) -> str | None:
    """'<distribution> is not installed: pip install ...' when the build's package is absent."""
    from pipeline.host import package_version

    if package_version(info.distribution) is not None:
        return None
    install = f"pip install 'qpipe[{info.extra}]'" if info.extra else "pip install qpipe"
    return f"{info.distribution} is not installed: {install} (make setup does)"


def require_installed(info: FormatInfo, where: str) -> None:
    """A build's tool must be installed: else exit 3 naming the extra that installs it."""
    from pipeline.errors import HostLacks

    reason = missing_distribution(info)
    if reason:
        what, _, fix = reason.partition(": ")
        raise HostLacks(what, where=where, fix=fix)


def calibration_host_knobs(host_info: dict) -> dict:
    """``host_build_knobs`` of a format that calibrates: on the GPU where there is a usable one."""
    from pipeline.host import has_usable_gpu

    return {"calibration_device": "cuda" if has_usable_gpu(host_info) else "cpu"}


def calibration_plan(recipe, threads: int) -> tuple[str, int]:
    """Seed torch and set its threads; return where a calibrating build runs and how many
    samples it takes there (``gpu_calibration_samples`` on CUDA, else ``calibration_samples``):
    ``host.has_usable_gpu``, the answer the recipe stage's ``calibration_device`` recorded."""
    import torch

    from pipeline.host import has_usable_gpu

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if has_usable_gpu():
        return "cuda", recipe.gpu_calibration_samples
    return "cpu", recipe.calibration_samples
