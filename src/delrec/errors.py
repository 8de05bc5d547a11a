"""User-facing errors.

A `DelrecError` is a mistake in the user's input (a file, a config value, a CLI option). The CLI prints it as one
line and exits with status 2; it never shows a traceback for these. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike

# An error line never grows with the input: a 10 MB title or a huge YAML value would otherwise be echoed back whole.
MAX_LINE = 300


def clip(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to ``limit`` characters, marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
            file = self.file if len(self.file) <= 120 else f"{self.file[:60]}…{self.file[-59:]}"  # keep the message
            where = file if self.line is None else f"{file}:{self.line}"
        parts = [p for p in (where, f"field '{self.field}'" if self.field else "") if p]
        text = " ".join(self.message.split())  # one line, whatever the message held
        return clip(f"{': '.join(parts)}: {text}" if parts else text)


class ConfigError(DelrecError):
    """A bad configuration value (YAML file or CLI option)."""


class DataError(DelrecError):
    """A malformed data file."""
