"""One error root for everything `surgery` reports to a user.

Every error a user can cause derives from :class:`SurgeryError`. Errors tied to a place in a spec
carry a :class:`~surgery.syntax.ast.Span` and render as ``file:line:col``, the source line, and a
caret under the span (lark's ``get_context`` style). The CLI prints ``str(error)`` and exits 2 for
these, 1 for :class:`ObligationError`; it never shows a traceback for them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Span:
    """A half-open region of spec text, 1-based line/column like editors show."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int
    source: str = field(default="", repr=False, compare=False)

    def render(self) -> str:
        # Lines as the parser counts them: only "\n" ends a line (str.splitlines also splits at
        # form feeds and other separators, which would show the wrong line).
        lines = self.source.split("\n")
        text = lines[self.line - 1].rstrip("\r") if 0 < self.line <= len(lines) else ""
        width = (self.end_column - self.column) if self.end_line == self.line else len(text) - self.column + 1
        # Keep tabs in the indent so the caret lines up under the same character in a terminal.
        indent = "".join("\t" if c == "\t" else " " for c in text[: self.column - 1])
        caret = indent + " " * (self.column - 1 - len(text[: self.column - 1])) + "^" * max(1, width)
        return f"{self.file}:{self.line}:{self.column}\n  {text}\n  {caret}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to `word`, else the valid choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    if choices and len(choices) <= 12:
        return " (choose from " + ", ".join(repr(c) for c in choices) + ")"
    return ""


class SurgeryError(Exception):
    """Root of every error `surgery` raises for a user's input or a failed proof."""

    exit_code = 2

    def __init__(self, message: str, span: Span | None = None):
        super().__init__(message)
        self.message = message
        self.span = span

    def __str__(self) -> str:
        if self.span is None:
            return self.message
        return f"{self.span.render()}\nerror: {self.message}"


class SpecError(SurgeryError):
    """A spec that does not parse, or names something that does not exist."""


class SpecErrors(SpecError):
    """Several semantic errors of one spec, reported together."""

    def __init__(self, errors: Sequence[SurgeryError]):
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} error(s) in spec", self.errors[0].span if self.errors else None)

    def __str__(self) -> str:
        return "\n\n".join(str(e) for e in self.errors)


class ModelError(SurgeryError):
    """A model directory or model object that cannot be used."""


class ApplyError(SurgeryError):
    """A step failed while being applied; the model was rolled back."""


class ObligationError(SurgeryError):
    """An equivalence obligation did not hold; nothing was changed."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class SaveError(SurgeryError):
    """The output could not be written, or a saved directory cannot be loaded."""
