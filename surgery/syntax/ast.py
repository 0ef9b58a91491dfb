"""Typed, frozen AST of a `.surg` spec. Every node carries the :class:`Span` it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from surgery.errors import Span

Value = Union[int, float, bool, str, "Word", tuple]


@dataclass(frozen=True)
class Word:
    """A bare word used as a value (an enum choice such as ``ntk_dynamic`` or ``nf4``)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Literal:
    value: Value
    span: Span


@dataclass(frozen=True)
class Arg:
    """One argument of a call: ``key=value`` when `key` is set, else positional."""

    key: str | None
    value: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    """A transform application ``name(args…)``; a bare word ``ia3`` is a call without arguments."""

    name: str
    args: tuple[Arg, ...]
    span: Span
    has_parens: bool = True


@dataclass(frozen=True)
class Seq:
    """``a + b``: b is applied to a's result at the same anchor."""

    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class Par:
    """``a | b``: both see the same input; their contributions are summed."""

    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class ListValue:
    items: tuple["Expr", ...]
    span: Span


Expr = Union[Call, Seq, Par, Literal, ListValue]


@dataclass(frozen=True)
class Index:
    """``[i]`` (stop is None, single) or ``[start:stop]`` (a slice; either end may be None)."""

    start: int | None
    stop: int | None
    is_slice: bool


@dataclass(frozen=True)
class Segment:
    name: str  # "*" for a glob segment
    index: Index | None = None


@dataclass(frozen=True)
class RoleSelector:
    """A selector in architecture roles: ``layers[0:8].attn.q``, ``attn.*``, ``mlp.down``."""

    segments: tuple[Segment, ...]
    span: Span

    def __str__(self) -> str:
        out = []
        for s in self.segments:
            text = s.name
            if s.index is not None:
                i = s.index
                text += f"[{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}]" if i.is_slice else f"[{i.start}]"
            out.append(text)
        return ".".join(out)


@dataclass(frozen=True)
class RawSelector:
    """A quoted module path or glob on the model's own names: ``"model.layers.*.self_attn.q_proj"``."""

    pattern: str
    span: Span

    def __str__(self) -> str:
        return repr(self.pattern)


Selector = Union[RoleSelector, RawSelector]


@dataclass(frozen=True)
class Rule:
    selectors: tuple[Selector, ...]
    expr: Expr
    span: Span


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its rules in order (``let`` constants already substituted) and its text."""

    rules: tuple[Rule, ...]
    source: str
    file: str = "<spec>"
