"""User-facing errors.

A `DelrecError` is a mistake in the user's input (a file, a config value, a CLI option). The CLI prints it as one
line and exits with status 2; it never shows a traceback for these. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike


class DelrecError(Exception):
    """An input error that names where it happened: ``file:line: field: message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [p for p in (where, f"field '{self.field}'" if self.field else "") if p]
        text = " ".join(self.message.split())  # one line, whatever the message held
        return f"{': '.join(parts)}: {text}" if parts else text


class ConfigError(DelrecError):
    """A bad configuration value (YAML file or CLI option)."""


class DataError(DelrecError):
    """A malformed data file."""
