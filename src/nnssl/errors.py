"""Exceptions that reach users.

Every error a user can cause (bad input, unset environment variables, missing datasets)
derives from `NnsslError`. The command-line entry points print such errors as one clear
message and exit with status 2 instead of showing a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class NnsslError(Exception):
    """Base class for errors caused by input or environment, with a message that says the fix."""


class MissingEnvironmentVariable(NnsslError):
    """An `nnssl_*` root (or a `$VAR` used in a path) is not set."""

    def __init__(self, name: str, purpose: str = "") -> None:
        self.name = name
        what = f" ({purpose})" if purpose else ""
        super().__init__(
            f"environment variable '{name}' is not set{what}. "
            f"Set it to a folder, e.g. `export {name}=/data/{name}`, "
            f"see documentation/getting_started.md."
        )


class DatasetNotFound(NnsslError):
    """No `DatasetXXX_Name` folder matches the requested id or name."""


class AmbiguousDataset(NnsslError):
    """A dataset id matches several different `DatasetXXX_Name` folders."""


class InvalidInput(NnsslError):
    """Input data or a file in a known format is malformed; the message lists every problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        # Callers that shorten `problems` for the message keep the complete list here.
        self.all_problems: list = list(self.problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)
