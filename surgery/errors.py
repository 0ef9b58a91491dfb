"""One error root for everything `surgery` reports to a user.

Every error a user can cause derives from :class:`SurgeryError`. Errors tied to a place in a spec
carry a :class:`~surgery.syntax.ast.Span` and render as ``file:line:col``, the source line, and a
caret under the span (lark's ``get_context`` style). The CLI prints ``str(error)`` and exits 2 for
these, 1 for :class:`ObligationError`; it never shows a traceback for them.
"""

from __future__ import annotations

import difflib
import unicodedata
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
        """``file:line:col``, the source line and a caret under the span, as a terminal shows them.

        Columns count characters (as the parser does), but the caret is drawn in terminal cells: an
        East Asian wide character or an emoji takes two, a combining mark none, and a tab stays a
        tab so it expands the same above and below. A line longer than :data:`SHOWN_WIDTH` cells is
        shown as a window around the span, with ``…`` where it was cut.
        """
        # Lines as the parser counts them: only "\n" ends a line (str.splitlines also splits at
        # form feeds and other separators, which would show the wrong line).
        lines = self.source.split("\n")
        text = lines[self.line - 1].rstrip("\r") if 0 < self.line <= len(lines) else ""
        start = self.column - 1
        end = self.end_column - 1 if self.end_line == self.line else len(text)
        end = max(end, start + 1)
        first, last = _window(text, start)
        shown = ("…" if first else "") + text[first:last] + ("…" if last < len(text) else "")
        lead = 1 if first else 0  # the "…" takes one cell
        before = text[first:start] + " " * max(0, start - len(text))  # a span past the end (EOF)
        indent = "".join("\t" if c == "\t" else " " * _cells(c) for c in before)
        under = text[start:min(end, last)]
        caret = " " * lead + indent + "^" * max(1, _cells(under))
        return f"{self.file}:{self.line}:{self.column}\n  {shown}\n  {caret}"


# A source line longer than this many terminal cells is shown as a window around the span.
SHOWN_WIDTH = 100


def _window(text: str, start: int) -> tuple[int, int]:
    """Character bounds of at most SHOWN_WIDTH cells of `text`, with `start` in its first third."""
    if _cells(text) <= SHOWN_WIDTH:
        return 0, len(text)
    first, cells = min(start, len(text)), 0
    while first > 0 and cells + _cells(text[first - 1]) <= SHOWN_WIDTH // 3:
        first -= 1
        cells += _cells(text[first])
    last = first
    cells = 0
    while last < len(text) and cells + _cells(text[last]) <= SHOWN_WIDTH:
        cells += _cells(text[last])
        last += 1
    while first > 0 and cells + _cells(text[first - 1]) <= SHOWN_WIDTH:  # the line ended early: fill
        first -= 1
        cells += _cells(text[first])
    return first, last


def _cells(text: str) -> int:
    """How many terminal cells `text` takes: wide (W/F) characters two; combining marks, variation
    selectors and zero-width joiners none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to `word`, else the valid choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    if close:
        names = [repr(c) for c in close]
        return " (did you mean " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]) + "?)"
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
        shown = "\n\n".join(str(e) for e in self.errors[:MAX_SHOWN_ERRORS])
        more = len(self.errors) - MAX_SHOWN_ERRORS
        if more <= 0:
            return shown
        distinct = len({e.message for e in self.errors[MAX_SHOWN_ERRORS:]})
        return f"{shown}\n\n… and {more} more error(s) ({distinct} distinct message(s))"


# Beyond this many, the errors of one spec are summarised: thousands of the same error help no one.
MAX_SHOWN_ERRORS = 20


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
