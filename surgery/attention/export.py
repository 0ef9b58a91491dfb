"""An attention program under ``torch.export``: one custom op per attention call, ``surgery::attention``.

Traced op by op, the fast path of a program writes its tiles, frames and log-sum-exp merges into
every layer's graph (SmolLM2 with the design card: 8,351 op nodes instead of 1,704), and
``torch.export`` time grows with them. While exporting (``torch.compiler.is_exporting()``, true
inside ``torch.export.export``, non-strict included) an attention call whose program this module
can carry is instead one node, ``surgery.attention(program, query, key, value, …)``:

* ``program`` (the first argument, a string) is the program's stages written out from their own
  fields, e.g. ``Stage(owner='window(16, sinks=2)', rules=(WindowRule(size=16, sinks=2),),
  frame=SinkFrame(size=16, sinks=2), cache=Bounded(size=16, sinks=2, pre_rope=True))``, stages
  joined by `` + ``. It is readable where the graph is shown (``surgery diff``: where the window
  and the sinks enter) and exact: :func:`decode` rebuilds the same stages from it (a restricted
  reading of the text: only literals, tuples and the stage dataclasses by name; nothing is evaluated).
* what the program computes from the model at call time travels as tensor inputs, computed by the
  traced code before the op (so it stays visible in the graph): a rotary frame's table (the
  model's rotary called at positions 0 … size − 1, :func:`surgery.attention.frame.table_rotation`)
  and the call's cos/sin; a K/V prefix's keys and values (the prefix encoder's output); the
  attention mask the mask function built. (The position ids are not passed: only a consistent
  frame reads them, and it is not carried.) The table is traced once per forward, in the first
  attention that needs it, and read by the others (the model hands every layer the same cos/sin),
  and not under ``no_grad``: torch.export splits the whole graph at every grad-mode region, which
  cost more than the program's nodes did.
  The fields that produced them (a frame's ``rotary``, a prefix's ``kv``) and a stage's spec
  ``span`` are not written; inside the op the frame's rotary is the table it was handed.
* ``scaling``, ``dropout``, ``tile`` and ``reference`` are the call's options.

The op's real implementation runs :func:`surgery.attention.implementation.attention` on exactly
those inputs, so an exported program (``exported.module()``, or one saved and loaded in a process
that imports :mod:`surgery.attention`) computes what the eager model does; its fake implementation
gives the output's shape [B, Tq, H, Dv] (the layout of the real one). Nothing is looked up by name
except the stage classes (dataclasses of :mod:`surgery.attention.program` and of the transform
modules, whose names are unique).

Calls it does not carry stay traced op by op, as before: those with a cache layer (the layer's state
is the cache's, not the call's), a consistent frame (it reads the rotary's frequencies at every
query's own length, a method of the module, not a table), a program whose stages hold something
other than literals and stage dataclasses, and the empty program (already one sdpa node). The op
has no autograd formula: the exported graph is for inference; training and eager inference never
reach this module (``is_exporting()`` is False there).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sys
import weakref
from dataclasses import dataclass
from fractions import Fraction

import torch

from surgery.attention import program as program_module
from surgery.attention.frame import table_rotation
from surgery.attention.program import ConsistentFrame, KVPrefix, Program, RelativeFrame, SinkFrame, Stage

OP = "surgery::attention"

# Fields the op gets as tensors (or does not need), so the text leaves them out; decoded as None.
_PASSED = {(Stage, "span"), (SinkFrame, "rotary"), (RelativeFrame, "rotary"), (KVPrefix, "kv")}


class Unwritable(ValueError):
    """A stage holds a value the text cannot carry (the call then stays traced)."""


# ------------------------------------------------------------------------------ the program as text


@functools.cache
def _kinds() -> dict[str, type]:
    """Stage classes by name: the dataclasses of :mod:`surgery.attention.program` and of every
    transform module (a name defined twice is left out, so it cannot be written), and Fraction."""
    from surgery.transforms import register_all

    register_all()
    found: dict[str, list[type]] = {}
    modules = [program_module] + [m for name, m in sorted(sys.modules.items()) if name.startswith("surgery.transforms.")]
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__:
                found.setdefault(name, []).append(value)
    return {name: kinds[0] for name, kinds in found.items() if len(kinds) == 1} | {"Fraction": Fraction}


def _write(value) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, Fraction):
        return f"Fraction({value.numerator}, {value.denominator})"
    if isinstance(value, tuple):
        return "(" + ", ".join(_write(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    kind = type(value)
    if dataclasses.is_dataclass(value) and _kinds().get(kind.__name__) is kind:
        parts = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if (kind, f.name) in _PASSED or (f.default is not dataclasses.MISSING and v == f.default):
                continue
            parts.append(f"{f.name}={_write(v)}")
        return f"{kind.__name__}({', '.join(parts)})"
    raise Unwritable(f"{type(value).__name__} in an attention stage")


def _read(node: ast.expr):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.Tuple):
        return tuple(_read(e) for e in node.elts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _kinds():
        kind = _kinds()[node.func.id]
        given = {k.arg: _read(k.value) for k in node.keywords}
        if kind is Fraction:
            return Fraction(*(_read(a) for a in node.args))
        if node.args or None in given:
            raise ValueError(f"stage text: {node.func.id}(...) takes keyword arguments only")
        missing = {f.name: None for f in dataclasses.fields(kind)
                   if f.name not in given and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return kind(**missing, **given)
    raise ValueError(f"stage text: cannot read {ast.unparse(node)!r}")


def _strip(value):
    """`value` with the fields the text leaves out set to None (what :func:`decode` gives back)."""
    if isinstance(value, tuple):
        return tuple(_strip(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return dataclasses.replace(value, **{f.name: None if (kind, f.name) in _PASSED else _strip(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def encode(program: Program) -> str:
    """The program's stages as text (see the module docstring); Unwritable if a stage holds a value
    the text cannot carry, or one that does not read back as itself."""
    text = " + ".join(_write(stage) for stage in program.stages)
    if decode(text) != Program(_strip(program.stages)):
        raise Unwritable(f"{program.describe()} does not read back from {text!r}")
    return text


@functools.lru_cache(maxsize=256)
def decode(text: str) -> Program:
    """The program :func:`encode` wrote (its frame's rotary and its prefix's kv None)."""
    node = ast.parse(text, mode="eval").body
    terms = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        terms.append(node.right)
        node = node.left
    stages = tuple(_read(n) for n in [node, *reversed(terms)])
    if not all(isinstance(s, Stage) for s in stages):
        raise ValueError(f"stage text: {text!r} is not a sum of Stage(...)")
    return Program(stages)


# ------------------------------------------------------------------------------ the op


@dataclass(frozen=True)
class _Rotary:
    """A frame's rotary inside the op: called as the model's rotary is (by ``Table.of``), it gives the
    table the op was handed ([size, D] cos and sin, as [1, size, D])."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __call__(self, x, positions) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[None], self.sin[None]


@dataclass(frozen=True)
class _Module:
    """What :func:`surgery.attention.implementation.attention` reads of its attention module."""

    training: bool
    scaling: float


def _with_table(program: Program, cos: torch.Tensor, sin: torch.Tensor) -> Program:
    rotary = _Rotary(cos, sin)
    return Program(tuple(dataclasses.replace(s, frame=dataclasses.replace(s.frame, rotary=lambda: rotary))
                         if s.frame is not None else s for s in program.stages))


@torch.library.custom_op(OP, mutates_args=())
def attention_op(program: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 table_cos: torch.Tensor | None, table_sin: torch.Tensor | None,
                 prefix_keys: torch.Tensor | None, prefix_values: torch.Tensor | None, scaling: float, dropout: float, tile: int,
                 reference: bool) -> torch.Tensor:
    """The program's attention output [B, Tq, H, Dv], as the eager attention implementation gives it."""
    from surgery.attention import implementation

    run = decode(program)
    if table_cos is not None:
        run = _with_table(run, table_cos, table_sin)
    call = implementation.Call(run, None if cos is None else (cos, sin), None, implementation._pads(mask),
                               reference, tile, mask=mask,
                               prefix=None if prefix_keys is None else (prefix_keys, prefix_values))
    out, _ = implementation.attention(_Module(dropout > 0, scaling), query, key, value, mask, scaling=scaling,
                                      dropout=dropout, surgery_call=call)
    return out.to(value.dtype)


@attention_op.register_fake
def _(program, query, key, value, mask, cos, sin, table_cos, table_sin, prefix_keys, prefix_values, scaling, dropout,
      tile, reference):
    b, h, t, _ = query.shape
    return value.new_empty(b, h, t, value.shape[-1]).transpose(1, 2)


# ------------------------------------------------------------------------------ the call site


def carried(call, mask) -> str | None:
    """The program's text if this attention call can be the one op, else None (see the module docstring)."""
    program = call.program
    if (not program.stages or call.layer is not None or call.record or isinstance(program.frame, ConsistentFrame)
            or (program.frame is not None and call.position_embeddings is None)
            or not (mask is None or isinstance(mask, torch.Tensor))):
        return None
    try:
        return encode(program)
    except Unwritable:
        return None


# The frame tables of the forward being exported, by the identity of its cos: the model hands every
# layer the same (cos, sin), so the layers share one table (computed in the first attention that
# needs it) instead of each tracing the rotary again. An entry is dropped when that cos dies.
_TABLES: dict[int, tuple[weakref.ref, dict]] = {}


def _table(frame, cos: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _TABLES.get(id(cos))
    if entry is None or entry[0]() is not cos:
        entry = _TABLES[id(cos)] = (weakref.ref(cos), {})
        weakref.finalize(cos, _TABLES.pop, id(cos), None)
    rotary, held = frame.rotary(), entry[1]
    key = (id(rotary), frame.size, query.device)
    if key not in held or held[key][0] is not rotary:
        # Not under no_grad (as eager does): torch.export turns every grad-mode block into a region it
        # splits the whole graph at, a pass whose cost grows with regions × graph size; the op needs
        # no gradient of the table.
        held[key] = (rotary, table_rotation(rotary, frame.size, query, grad=True))
    return held[key][1]


def attend(text: str, call, query, key, value, mask, scaling: float, dropout: float) -> torch.Tensor:
    """The one node: the frame's table and the prefix computed here (traced), the rest inside the op."""
    frame = call.program.frame
    cos, sin = call.position_embeddings if frame is not None else (None, None)
    table_cos, table_sin = _table(frame, cos, query) if frame is not None else (None, None)
    keys, values = call.prefix if call.prefix is not None else (None, None)
    return attention_op(text, query, key, value, mask, cos, sin, table_cos, table_sin, keys, values,
                        float(scaling), float(dropout), int(call.tile), bool(call.reference))
