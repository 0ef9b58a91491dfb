"""Lark → :mod:`surgery.syntax.ast`. Syntax errors carry ``file:line:col``, the line and a caret."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from surgery.errors import Span, SpecError
from surgery.syntax import ast

# Friendlier names for the terminals lark reports as "expected".
_TOKEN_NAMES = {
    "NAME": "a name", "STRING": "a quoted string", "SIGNED_INT": "a number", "SIGNED_FLOAT": "a number",
    "INT": "a number", "OP": "'+' or '|'", "COLON": "':'", "SEMI": "';'", "COMMA": "','", "DOT": "'.'",
    "LPAR": "'('", "RPAR": "')'", "ARGS_OPEN": "'('", "LSQB": "'['", "RSQB": "']'", "EQUAL": "'='",
    "STAR": "'*'", "$END": "the end of the spec", "LET": "'let'", "TRUE": "true", "FALSE": "false",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark.open_from_package(
        "surgery", "surgery.lark", ("grammar",), parser="lalr", propagate_positions=True, maybe_placeholders=True
    )


def _span(meta_or_token, source: str, file: str) -> Span:
    m = meta_or_token
    return Span(file, m.line, m.column, m.end_line, m.end_column, source)


def _point(line: int, column: int, source: str, file: str, width: int = 1) -> Span:
    return Span(file, line, column, line, column + width, source)


class _Build(Transformer):
    """Tree → AST. Nodes get spans from lark's propagated positions."""

    def __init__(self, source: str, file: str):
        super().__init__(visit_tokens=False)
        self.source, self.file = source, file

    def _s(self, meta) -> Span:
        return _span(meta, self.source, self.file)

    def _int(self, token: Token) -> int:
        # Every integer ends up in torch or C code as a 64-bit int, where a larger one fails with a
        # C++ backtrace far from the spec.
        value = int(token)
        if not -(2**63) <= value < 2**63:
            raise SpecError("integer out of range: integers lie between -2**63 and 2**63 - 1",
                            _span(token, self.source, self.file))
        return value

    @v_args(meta=True)
    def start(self, meta, children):
        return list(children)

    @v_args(meta=True)
    def let(self, meta, children):
        name, value = children
        return ast.Let(str(name), value, self._s(meta))

    @v_args(meta=True)
    def rule(self, meta, children):
        *selectors, expr = children
        return ast.Rule(tuple(selectors), expr, self._s(meta))

    @v_args(meta=True)
    def raw_selector(self, meta, children):
        return ast.RawSelector(str(children[0])[1:-1], self._s(meta))

    @v_args(meta=True)
    def role_selector(self, meta, children):
        return ast.RoleSelector(tuple(children), self._s(meta))

    def named_seg(self, children):
        return ast.Segment(str(children[0]), children[1])

    def star_seg(self, children):
        return ast.Segment("*")

    def at(self, children):
        return ast.Index(self._int(children[0]), None, is_slice=False)

    def slice(self, children):
        start, stop = (None if c is None else self._int(c) for c in children)
        return ast.Index(start, stop, is_slice=True)

    @v_args(meta=True)
    def chain(self, meta, children):
        items, ops = children[0::2], {str(o) for o in children[1::2]}
        if len(items) == 1:
            return items[0]
        span = self._s(meta)
        if len(ops) > 1:
            raise SpecError("'+' and '|' are mixed here; add parentheses to say which applies first", span)
        return (ast.Seq if ops == {"+"} else ast.Par)(tuple(items), span)

    @v_args(meta=True)
    def group(self, meta, children):
        return children[0]

    @v_args(meta=True)
    def call(self, meta, children):
        name, paren, *args = children
        args = tuple(a for a in args if a is not None)
        return ast.Call(str(name), args, self._s(meta), has_parens=paren is not None)

    @v_args(meta=True)
    def kwarg(self, meta, children):
        return ast.Arg(str(children[0]), children[1], self._s(meta))

    @v_args(meta=True)
    def posarg(self, meta, children):
        return ast.Arg(None, children[0], self._s(meta))

    @v_args(meta=True)
    def list(self, meta, children):
        return ast.ListValue(tuple(c for c in children if c is not None), self._s(meta))

    @v_args(meta=True)
    def float(self, meta, children):
        value = float(children[0])
        if math.isinf(value):  # "1e999": a float literal must be a finite number
            raise SpecError("number too large for a float", self._s(meta))
        return ast.Literal(value, self._s(meta))

    @v_args(meta=True)
    def int(self, meta, children):
        return ast.Literal(self._int(children[0]), self._s(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return ast.Literal(str(children[0])[1:-1], self._s(meta))

    @v_args(meta=True)
    def true(self, meta, children):
        return ast.Literal(True, self._s(meta))

    @v_args(meta=True)
    def false(self, meta, children):
        return ast.Literal(False, self._s(meta))


# Tokens that can start a value or a transform; when all are acceptable, say so in a few words.
_VALUE_START = {"NAME", "SIGNED_INT", "SIGNED_FLOAT", "STRING", "LSQB", "ARGS_OPEN"}
_VALUE_SIDE = _VALUE_START | {"TRUE", "FALSE"}

# Parentheses, calls and lists nest at most this deep: the tree builder recurses, and a spec nested
# deeper than this is a mistake, not a model. The same bound holds after `let` substitution.
MAX_NESTING = 32
# The rules of a spec hold at most this many expression nodes once `let` constants are substituted
# (a let value alone too): a constant used twice in the next one doubles, so without a bound a few
# lines could stand for an exponential spec. Real specs hold tens of nodes.
MAX_NODES = 10_000


def _expected_names(expected) -> list[str]:
    expected = {t for t in expected if not t.startswith("__")}
    names = set()
    if _VALUE_START <= expected:
        expected -= _VALUE_SIDE
        names.add("a transform or value")
    return sorted(names | {_TOKEN_NAMES.get(t, t.lower()) for t in expected})


def _syntax_error(e: UnexpectedInput, source: str, file: str) -> SpecError:
    line, column = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        # lark's end token borrows the position of the last real token: point just after it.
        token = getattr(e, "token", None)
        if token is not None and token.end_line is not None and token.type == "$END":
            line, column = token.end_line, token.end_column
        else:
            line, column = 1, 1
        expected = getattr(e, "expected", None) or getattr(e, "accepts", None) or ()
        got = "the spec ends"
    elif isinstance(e, UnexpectedCharacters):
        char = source[e.pos_in_stream]
        rest = source[e.pos_in_stream + 1:].split("\n", 1)[0]
        if char in "\"'" and char not in rest:
            message = f"syntax error: unterminated string; add the closing {char} on this line"
            return SpecError(message, _point(line, column, source, file))
        got = f"unexpected character {char!r}"
        expected = e.allowed or ()
    else:
        token = e.token
        got = f"unexpected {token.value!r}"
        expected = e.accepts or e.expected or ()
    names = _expected_names(expected)
    hint = f"; expected {', '.join(names)}" if names and len(names) <= 8 else ""
    return SpecError(f"syntax error: {got}{hint}", _point(line, column, source, file))


def _check_nesting(tree: Tree, source: str, file: str) -> None:
    """Refuse nesting deeper than :data:`MAX_NESTING` before the (recursive) tree builder sees it."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in ("group", "call", "list") and (node.data != "call" or node.children[1] is not None):
            depth += 1
            if depth > MAX_NESTING:
                raise SpecError(
                    f"expressions nest more than {MAX_NESTING} levels deep", _span(node.meta, source, file)
                )
        stack += [(c, depth) for c in node.children if isinstance(c, Tree)]


def _check_separators(items, source: str, file: str) -> None:
    """Two statements on one line need a ';' between them (newlines are white space to lark)."""
    previous_end = None
    for item in items:
        if isinstance(item, Token):  # a ';'
            previous_end = None
            continue
        if previous_end is not None and item.span.line == previous_end:
            raise SpecError("expected ';' or a newline before this rule", item.span)
        previous_end = item.span.end_line


@dataclass(frozen=True)
class _Expanded:
    """An expression with ``let`` constants substituted, and what it would be written out.

    ``size`` counts its nodes and ``nest`` its nesting as the parser counts it (a call's or list's
    brackets, and a group around a ``+``/``|`` chain that is an operand of another chain), both
    as if every constant had been written out in place. Constants share their nodes, so these
    are computed per constant once, never by walking the (possibly exponential) written-out tree.
    ``via`` names the constant use that brought the deepest nesting, for the error.
    """

    expr: ast.Expr
    size: int
    nest: int
    via: tuple[str, Span, int] | None = None  # (constant, where it is used, its own nesting)


class _Budget:
    """Expression nodes left once constants are substituted; an error at the node that overdraws it."""

    def __init__(self, what: str):
        self.used, self.what, self.substituted = 0, what, False

    def spend(self, n: int, span: Span, name: str | None = None) -> None:
        self.used += n
        self.substituted |= name is not None
        if self.used > MAX_NODES:
            alone = f" ('{name}' alone has {n:,})" if name else ""
            once = " once let constants are substituted" if self.substituted else ""
            raise SpecError(f"{self.what} holds more than {MAX_NODES:,} expression nodes{once}{alone}", span)


def _substitute(expr, constants: dict[str, _Expanded], budget: _Budget) -> _Expanded:
    """Replace bare words naming a ``let`` constant by the constant's value, within the limits."""
    if isinstance(expr, ast.Call) and not expr.has_parens and not expr.args and expr.name in constants:
        value = constants[expr.name]
        budget.spend(value.size, expr.span, expr.name)
        return _Expanded(value.expr, value.size, value.nest, (expr.name, expr.span, value.nest) if value.nest else None)
    budget.spend(1, expr.span)
    if isinstance(expr, ast.Call):
        args = [(a, _substitute(a.value, constants, budget)) for a in expr.args]
        new = ast.Call(expr.name, tuple(ast.Arg(a.key, x.expr, a.span) for a, x in args), expr.span, expr.has_parens)
        return _nested(new, [x for _, x in args], 1 if expr.has_parens else 0)
    if isinstance(expr, (ast.Seq, ast.Par, ast.ListValue)):
        items = [_substitute(i, constants, budget) for i in expr.items]
        new = type(expr)(tuple(x.expr for x in items), expr.span)
        if isinstance(expr, ast.ListValue):
            return _nested(new, items, 1)
        # A chain inside a chain is written in parentheses: one level more.
        return _nested(new, [_Expanded(x.expr, x.size, x.nest + isinstance(x.expr, (ast.Seq, ast.Par)), x.via)
                             for x in items], 0)
    return _Expanded(expr, 1, 0)


def _nested(node, children: list[_Expanded], own: int) -> _Expanded:
    deepest = max(children, key=lambda x: x.nest, default=None)
    nest = own + (deepest.nest if deepest else 0)
    via = deepest.via if deepest else None
    if nest > MAX_NESTING:
        brought = f" ('{via[0]}' alone nests {via[2]})" if via else ""
        raise SpecError(f"expressions nest more than {MAX_NESTING} levels deep once let constants are "
                        f"substituted{brought}", via[1] if via else node.span)
    return _Expanded(node, 1 + sum(x.size for x in children), nest, via)


def parse(text: str, file: str = "<spec>") -> ast.Spec:
    """Parse spec text into an :class:`ast.Spec`; raise :class:`SpecError` with a position on failure."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    _check_nesting(tree, text, file)
    try:
        items = _Build(text, file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        if isinstance(e.orig_exc, ValueError) and isinstance(e.obj, Tree):  # int() refuses 4300+ digits
            limit = sys.get_int_max_str_digits()
            raise SpecError(f"number too long: at most {limit} digits", _span(e.obj.meta, text, file)) from None
        raise
    _check_separators(items, text, file)
    constants: dict[str, _Expanded] = {}
    rules = []
    spec_budget = _Budget("this spec")  # the rules together, as if written out
    for item in items:
        if isinstance(item, Token):
            continue
        if isinstance(item, ast.Let):
            if item.name in constants:
                raise SpecError(f"'{item.name}' is already defined", item.span)
            constants[item.name] = _substitute(item.value, constants, _Budget(f"'{item.name}'"))
        else:
            rules.append(ast.Rule(item.selectors, _substitute(item.expr, constants, spec_budget).expr, item.span))
    return ast.Spec(tuple(rules), text, file)


def parse_file(path: str | Path) -> ast.Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not spec text
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # point at the first byte that is not UTF-8
        before = e.object[: e.start].decode("utf-8").split("\n")
        source = e.object.decode("utf-8", errors="replace")
        raise SpecError(f"spec is not UTF-8 text (byte 0x{e.object[e.start]:02x} here); save it as UTF-8",
                        _point(len(before), len(before[-1]) + 1, source, str(path))) from None
    return parse(text, str(path))
