"""Where every stage reads and writes, relative to the project root (docs/design.md, "Data flow")."""

from __future__ import annotations

from pathlib import Path

# the version of the output schemas (docs/design.md) that build.json, gate results and run
# records carry; 1 is every record written before they carried one
SCHEMA_VERSION = 2

ARTIFACTS = Path("artifacts")
HOST_FILE = ARTIFACTS / "host.json"
SOURCE_DIR = ARTIFACTS / "source"
CORPUS_DIR = ARTIFACTS / "corpus"
REFERENCE_DIR = ARTIFACTS / "reference"
SENSITIVITY_DIR = ARTIFACTS / "sensitivity"    # each tensor group's damage at each candidate type
RECIPES_DIR = ARTIFACTS / "recipes"
BUILDS_DIR = ARTIFACTS / "builds"
ENGINES_DIR = ARTIFACTS / "engines"
GATES_DIR = ARTIFACTS / "gates"
BASELINES_DIR = ARTIFACTS / "baselines"
FORMATS_USED_FILE = ARTIFACTS / "formats.json"   # the formats `recipes` uses: what the baseline measures
REPORT_DIR = ARTIFACTS / "report"
RUNS_DIR = ARTIFACTS / "runs"
TASKS_BASE_DIR = ARTIFACTS / "tasks"
TASKS_BASE_FILE = TASKS_BASE_DIR / "base.json"   # the unquantized model's task scores
TASK_CONFIGS_DIR = Path("tasks")                  # the project's own lm-eval task YAMLs (local data)

CALIBRATION_TEXT = CORPUS_DIR / "calibration.txt"
EVALUATION_TEXT = CORPUS_DIR / "evaluation.txt"


def recipe_spec(recipe: str) -> Path:
    """The recipe's build knobs (and the host facts its build depends on): build@R's input."""
    return RECIPES_DIR / f"{recipe}.json"


def engine_spec(recipe: str) -> Path:
    """The recipe's engine settings: engine@R's input, so that a limit edit does not re-run it."""
    return RECIPES_DIR / f"{recipe}.engine.json"


def build_dir(recipe: str) -> Path:
    return BUILDS_DIR / recipe


def engine_dir(recipe: str) -> Path:
    return ENGINES_DIR / recipe


def engine_record(recipe: str) -> Path:
    """engine.json: what the engine@R stage built, or why not."""
    return engine_dir(recipe) / "engine.json"


def gate_file(recipe: str) -> Path:
    return GATES_DIR / f"{recipe}.json"


def baseline_file(format_name: str) -> Path:
    return BASELINES_DIR / f"{format_name}.json"


def run_record(stage: str) -> Path:
    """How a stage's last run went (seconds, peak memory, when): kept out of its hashed outputs."""
    return RUNS_DIR / f"{stage}.json"
