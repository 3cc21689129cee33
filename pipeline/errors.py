"""Error types and their exit codes.

Exit codes (docs/design.md, "Exit codes"): 0 ok, 1 a gate failed, 2 bad input or usage,
3 something this host lacks (a runtime, a GPU, disk space) was required, 4 a tool qpipe
drives (llama.cpp, transformers, llm-compressor, ModelOpt) failed in a way qpipe did not
foresee; the line carries the tool's own message, and QPIPE_DEBUG=1 shows the traceback.

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


class ToolFailed(QpipeError):
    """A runtime or tool raised something qpipe did not turn into a clearer error."""

    exit_code = 4


DEBUG_ENV = "QPIPE_DEBUG"


def from_unexpected(error: BaseException, stage: str) -> QpipeError:
    """One-line form of an exception a stage did not foresee: out of disk space is the host's
    (exit 3), anything else a tool's failure (exit 4) with its own message."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return HostLacks(f"no space left on the device while writing{' ' + str(error.filename) if error.filename else ''}",
                         where=stage, fix="free disk space where artifacts/ lives (`df -h artifacts`) and run again; "
                                          "nothing was left half-written")
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return ToolFailed(f"{type(error).__name__}: {message}" if message else type(error).__name__, where=stage,
                      fix=f"rerun with {DEBUG_ENV}=1 for the traceback; nothing was left half-written")
