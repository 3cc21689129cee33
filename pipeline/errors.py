"""Error types and their exit codes.

Exit codes (DESIGN.md, "Errors"): 0 ok, 1 a gate failed, 2 bad input or usage,
3 something this host lacks (a runtime, a GPU) was required.

Every error carries what went wrong, where (a file, a key, a stage) and how to fix it;
the CLI prints them as one line and no traceback.
"""

from __future__ import annotations


class QpipeError(Exception):
    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.fix = fix

    def one_line(self) -> str:
        parts = [f"error: {self.what}"]
        if self.where:
            parts.append(f"in {self.where}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " | ".join(parts)


class BadInput(QpipeError):
    """The user's params, recipe, checkpoint or text is wrong."""

    exit_code = 2


class RecipeNotApplicable(BadInput):
    """The recipe is valid but cannot apply to this model (a shape rule, an export the tool
    lacks for its architecture). Found before any heavy work; the build stage records it as a
    refusal, so that the other recipes still build and gate."""


class HostLacks(QpipeError):
    """A runtime, tool or device that this host does not have was required."""

    exit_code = 3


class GateFailed(QpipeError):
    """A required gate failed or did not run."""

    exit_code = 1
