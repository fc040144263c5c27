"""The one exception type the core raises for problems a user can fix."""

from __future__ import annotations


class CifarctlError(Exception):
    """A problem with a one-line explanation that names the fix; the CLI prints it without a traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CifarctlError):
    """A bad option or input file (exit 2, like a command-line usage error)."""

    exit_code = 2


class Interrupted(CifarctlError):
    """The user stopped the command (Ctrl-C, SIGTERM): reported as an interruption, not an error."""

    exit_code = 130
