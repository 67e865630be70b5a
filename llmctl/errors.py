"""One exception family for everything a user can get wrong or run into.

Core code raises these; only ``cli.main`` turns them into a message and an exit
code. Each class carries its exit code, so the mapping lives in one place and
is documented in docs/configuration.md ("Exit codes").
"""

from __future__ import annotations

from typing import Any

# Documented exit codes. Keep docs/configuration.md in step with this table.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_DOES_NOT_FIT = 4
EXIT_HUB = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_ERROR: "error: invalid model file, I/O failure, or any other failure",
    EXIT_USAGE: "usage error: bad option, bad value, ambiguous name, missing confirmation",
    EXIT_NOT_FOUND: "not found: unknown model name or missing file",
    EXIT_DOES_NOT_FIT: "does not fit: the model needs more memory than this machine has",
    EXIT_HUB: "hub: the Hugging Face Hub is unreachable, offline mode is on, or it answered with an error",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class LlmctlError(Exception):
    """Base of every error llmctl reports to the user."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LlmctlError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class NotFoundError(LlmctlError):
    """A model name or a file that does not exist."""

    exit_code = EXIT_NOT_FOUND


class AmbiguousNameError(UsageError):
    """A name or prefix that matches more than one model."""

    def __init__(self, name: str, candidates: list[str]) -> None:
        shown = ", ".join(candidates[:8]) + (" …" if len(candidates) > 8 else "")
        super().__init__(
            f"'{name}' matches {len(candidates)} models: {shown}",
            hint="use the full name from `llmctl list`",
        )
        self.candidates = candidates


class InvalidModelError(LlmctlError):
    """A file that is not a GGUF model we can safely read."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(
            f"{path}: not a valid GGUF model: {problem}",
            hint="re-download the file or check that it is a GGUF model",
        )
        self.path = path
        self.problem = problem


class StoreError(LlmctlError):
    """The model index or the files it tracks cannot be read or written."""


class DoesNotFitError(LlmctlError):
    """No way to load the model within this machine's memory."""

    exit_code = EXIT_DOES_NOT_FIT

    def __init__(self, plan: object) -> None:
        label = getattr(getattr(plan, "candidate", None), "label", "the model")
        reason = getattr(plan, "reason", "")
        super().__init__(
            f"{label} does not fit on this machine: {reason}",
            hint="try a smaller quantisation, a shorter --ctx, or --force to load it anyway",
        )
        self.plan = plan
        self.full_plan: Any = None  # the whole plan (every candidate, reasons): what `fit` prints before exiting

    def for_planning_only(self) -> DoesNotFitError:
        """The error as a command that loads nothing (``fit``) reports it: no --force to suggest."""
        if self.hint and "--force" in self.hint:
            self.hint = "try a smaller quantisation or a shorter --ctx"
        return self
