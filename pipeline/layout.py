"""Where every stage reads and writes, relative to the project root (DESIGN.md, Data flow)."""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
HOST_FILE = ARTIFACTS / "host.json"
SOURCE_DIR = ARTIFACTS / "source"
CORPUS_DIR = ARTIFACTS / "corpus"
REFERENCE_DIR = ARTIFACTS / "reference"
RECIPES_DIR = ARTIFACTS / "recipes"
BUILDS_DIR = ARTIFACTS / "builds"
ENGINES_DIR = ARTIFACTS / "engines"
GATES_DIR = ARTIFACTS / "gates"
BASELINES_DIR = ARTIFACTS / "baselines"
REPORT_DIR = ARTIFACTS / "report"

CALIBRATION_TEXT = CORPUS_DIR / "calibration.txt"
EVALUATION_TEXT = CORPUS_DIR / "evaluation.txt"


def recipe_spec(recipe: str) -> Path:
    return RECIPES_DIR / f"{recipe}.json"


def build_dir(recipe: str) -> Path:
    return BUILDS_DIR / recipe


def engine_dir(recipe: str) -> Path:
    return ENGINES_DIR / recipe


def gate_file(recipe: str) -> Path:
    return GATES_DIR / f"{recipe}.json"


def baseline_file(format_name: str) -> Path:
    return BASELINES_DIR / f"{format_name}.json"
