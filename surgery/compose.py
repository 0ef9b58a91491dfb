"""Composition nodes: how the calls of a rule combine at one anchor, as a small typed tree.

``Leaf(i)`` is call (or step) ``i``; the groups combine their items:

* :class:`Seq` — ``a + b``: b is applied to a's result (at its own anchors when the kinds differ).
* :class:`Par` — ``a | b``: both see the same input; their contributions are summed at one anchor.
* :class:`Gate` — ``gate(a | b, …)``: UniPELT's learned gates, one per branch (:mod:`surgery.gating`).
* :class:`Fuse` — ``fuse("out/a", "out/b", …)``: AdapterFusion over trained adapters, each named by the
  output directory it was saved in (a path string reads as ``trained("out/a")``, see
  :mod:`surgery.transforms.fuse`).

Each group is a *combinator*, registered with :func:`combinator` under the name the language
spells it with; a combinator validates its own keyword parameters (its operands are the positional
arguments) and says whether its operands must share one anchor. The trees are data: the anchor
kind that wraps a target (:mod:`surgery.anchors`) decides which modules realise each node.

Trees are over call positions while a rule is checked, and over step indices in a plan; the
operations below (:meth:`prune`, :meth:`relabel`, :meth:`head`, :meth:`leaves`) work on both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar, Union

from surgery.errors import Span, SpecError
from surgery.syntax import ast
from surgery.transforms.registry import Params


@dataclass(frozen=True)
class Leaf:
    """One call of a rule (a position) or one step of a plan (a step index)."""

    index: int

    def leaves(self) -> list[int]:
        return [self.index]

    def prune(self, keep: set[int] | frozenset[int]) -> Node | None:
        return self if self.index in keep else None

    def relabel(self, new: Mapping[int, int | None] | list[int | None]) -> Node | None:
        index = new[self.index]
        return None if index is None else Leaf(index)

    def head(self) -> int | None:
        return self.index

    def groups(self) -> list[Group]:
        return []


@dataclass(frozen=True)
class Group:
    """A combinator over `items`; `span` is where it was written (absent where the planner joins rules)."""

    items: tuple[Node, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    params: Params = field(default_factory=lambda: NoParams())

    combinator: ClassVar[Combinator]

    def leaves(self) -> list[int]:
        return [i for item in self.items for i in item.leaves()]

    def groups(self) -> list[Group]:
        return [self, *(g for item in self.items for g in item.groups())]

    def rebuilt(self, items: list[Node]) -> Node | None:
        """This group over `items` (what is left after pruning); one item of ``+``/``|`` is that item."""
        if not items:
            return None
        if len(items) == 1 and self.combinator.collapses:
            return items[0]
        return replace(self, items=tuple(items))

    def prune(self, keep: set[int] | frozenset[int]) -> Node | None:
        return self.rebuilt([p for p in (item.prune(keep) for item in self.items) if p is not None])

    def relabel(self, new: Mapping[int, int | None] | list[int | None]) -> Node | None:
        return self.rebuilt([r for r in (item.relabel(new) for item in self.items) if r is not None])

    def head(self) -> int | None:
        """The leaf applied first and alone (the head of nested sequences), None if there is none."""
        return None

    @classmethod
    def operand(cls, expr: ast.Expr) -> ast.Expr:
        """The expression a positional argument of a call of this combinator stands for (itself)."""
        return expr

    def operand_errors(self, calls: list[ast.Call]) -> list[SpecError]:
        """What this combinator refuses among its operands (`calls`: the rule's calls by position)."""
        return []


@dataclass(frozen=True)
class Combinator:
    """A way to combine transforms at an anchor; registered beside the transforms."""

    name: str
    node: type[Group]
    spelling: str            # how a spec writes it: "+", "|", "gate(…)"
    summary: str
    params: type[Params]     # its keyword parameters (operands are positional)
    one_anchor: bool         # its operands act at one anchor, so they must share an anchor kind
    collapses: bool          # a group of one item is that item (``+``, ``|``), not a gate of one
    supported: bool = True   # planned and built; False: parsed and planned, refused with a clear error

    @property
    def called(self) -> bool:
        """Whether a spec writes it as a call ``name(…)`` (rather than an operator)."""
        return self.spelling.endswith("(…)")


COMBINATORS: dict[str, Combinator] = {}

G = TypeVar("G", bound=Group)


class NoParams(Params):
    """A combinator without keyword parameters."""


def combinator(
    name: str, *, spelling: str, summary: str, one_anchor: bool, collapses: bool = False,
    params: type[Params] = NoParams, supported: bool = True,
) -> Callable[[type[G]], type[G]]:
    """Register a composition node class as the combinator `name`."""

    def register(cls: type[G]) -> type[G]:
        if name in COMBINATORS:
            raise RuntimeError(f"combinator {name!r} registered twice")  # a programming error
        cls.combinator = COMBINATORS[name] = Combinator(
            name, cls, spelling, summary, params, one_anchor, collapses, supported)
        return cls

    return register


@combinator("seq", spelling="+", summary="applies each item to the result of the one before it",
            one_anchor=False, collapses=True)
@dataclass(frozen=True)
class Seq(Group):
    def head(self) -> int | None:
        return self.items[0].head()


@combinator("par", spelling="|", summary="sums its branches' contributions at one anchor",
            one_anchor=True, collapses=True)
@dataclass(frozen=True)
class Par(Group):
    pass


@combinator("gate", spelling="gate(…)", summary="UniPELT's learned gates", one_anchor=True)
@dataclass(frozen=True)
class Gate(Group):
    pass


@combinator("fuse", spelling="fuse(…)", summary="AdapterFusion", one_anchor=True)
@dataclass(frozen=True)
class Fuse(Group):
    OPERAND: ClassVar[str] = "trained"  # the transform naming a trained adapter; only fuse() takes it

    @classmethod
    def operand(cls, expr: ast.Expr) -> ast.Expr:
        """A path string names the adapter saved in that output: ``"out/a"`` is ``trained("out/a")``."""
        if isinstance(expr, ast.Literal) and isinstance(expr.value, str):
            return ast.Call(cls.OPERAND, (ast.Arg(None, expr, expr.span),), expr.span)
        return expr

    def operand_errors(self, calls: list[ast.Call]) -> list[SpecError]:
        errors = []
        for item in self.items:
            if isinstance(item, Leaf) and calls[item.index].name == self.OPERAND:
                continue
            span = calls[item.index].span if isinstance(item, Leaf) else item.span
            errors.append(SpecError(
                f"each operand of fuse(…) is one trained adapter, named by the output it was saved in: "
                f'fuse("out/task_a", "out/task_b") (or {self.OPERAND}("out/task_a"))', span or self.span))
        return errors


Node = Union[Leaf, Group]  # Group: Seq, Par, Gate, Fuse, or any combinator registered later


def called(name: str) -> Combinator | None:
    """The combinator a call ``name(…)`` spells, if any."""
    found = COMBINATORS.get(name)
    return found if found is not None and found.called else None
