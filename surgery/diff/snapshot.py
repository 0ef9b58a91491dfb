"""Snapshots of a model for the diff: the module tree (no weights read) and the exported graph.

* :func:`snapshot_tree` records, per module path, the class, the module's identity (``id``), its own
  parameters (name, shape, dtype, trainable) and its subtree's parameter counts. It reads no
  weights, so it works on meta-device models of any size.
* :func:`capture_graph` exports the model with ``torch.export.export(..., strict=False)``
  (transformers 5 models are not ``symbolic_trace``-able) and keeps, for every node, what the
  structural diff needs: its op, its arguments (other nodes by name, literals as they are), and its
  provenance — the module that ran it, read from ``node.meta["nn_module_stack"]``. In torch 2.13 that
  is an ordered dict from an export key (``'L__self__model.layers.0.self_attn'``) to ``(dotted module
  path, qualified class name)``; the path is taken from the value, so the export prefix never
  reaches the diff. Parameters and buffers enter the graph as placeholders; they are kept under
  their module path (``graph_signature.inputs_to_parameters``), not the export's mangled name.

Each call node keeps its whole module stack (outermost first, with the surgery transform whose class
each module is, if any), so that the diff can decide which module's computation it belongs to: a
module called from inside a module that does not contain it (``model.rotary_emb`` called by a
``self_attn``, as a window re-rotating keys does) belongs to the caller's computation.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def describe(self) -> str:
        return f"{self.name} [{', '.join(map(str, self.shape))}] {self.dtype}"


@dataclass(frozen=True)
class ModuleInfo:
    path: str
    cls: str
    ident: int                      # id(module) when snapshotted
    params: tuple[ParamInfo, ...]   # the module's own parameters (not its children's)
    total: int                      # parameters in the subtree (shared tensors once)
    trainable: int                  # trainable parameters in the subtree
    hooks: tuple[str, ...] = ()     # forward (pre-)hooks, as "pre-hook NAME" / "hook NAME"
    settings: tuple[str, ...] = ()  # surgery_* attributes a transform attached (e.g. surgery_window)
    transform: str = ""             # the surgery transform whose module this is (``lora`` for a LoraAdapter)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def own(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def own_trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def signature(self) -> tuple:
        return self.cls, tuple((p.name, p.shape, p.dtype) for p in self.params)


@dataclass(frozen=True)
class TreeSnapshot:
    model: str
    modules: Mapping[str, ModuleInfo]   # in ``named_modules`` (pre-)order; the root is ""
    total: int
    trainable: int
    attention: str | None = None        # config._attn_implementation

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def _count(params) -> tuple[int, int]:
    seen: dict[int, torch.Tensor] = {id(p): p for p in params}
    return sum(p.numel() for p in seen.values()), sum(p.numel() for p in seen.values() if p.requires_grad)


def snapshot_tree(model: nn.Module) -> TreeSnapshot:
    """Module path → class, identity, own parameters and subtree counts. Reads no weight values."""
    modules = {}
    for path, module in model.named_modules():
        own = tuple(
            ParamInfo(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad)
            for name, p in module._parameters.items() if p is not None
        )
        total, trainable = _count(module.parameters())
        hooks = tuple([f"pre-hook {_hook_name(h)}" for h in module._forward_pre_hooks.values()]
                      + [f"hook {_hook_name(h)}" for h in module._forward_hooks.values()])
        settings = tuple(sorted(k for k in vars(module) if k.startswith("surgery_")))
        where = type(module).__module__.split(".")
        transform = where[2] if where[:2] == ["surgery", "transforms"] and len(where) > 2 else ""
        modules[path] = ModuleInfo(path, type(module).__name__, id(module), own, total, trainable, hooks, settings,
                                   transform)
    total, trainable = _count(model.parameters())
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return TreeSnapshot(type(model).__name__, modules, total, trainable, attention)


def _hook_name(hook) -> str:
    return getattr(hook, "__name__", type(hook).__name__).lstrip("_")



@dataclass(frozen=True)
class Ref:
    """An argument that is another node of the same graph."""

    name: str


@dataclass(frozen=True)
class GraphNode:
    """One node of an exported graph.

    ``kind`` is ``call`` (an op), ``param`` / ``buffer`` / ``constant`` (``target`` is then the
    dotted path of the tensor in the model) or ``input`` (a user input). For a call, ``path`` is
    the innermost module that ran it and ``stack`` the module call stack, outermost first, as
    (module path, surgery transform of the module's class or "") — ``lora`` for ``…adapter.0``.
    """

    name: str
    kind: str
    op: str = ""
    target: str = ""
    path: str = ""
    args: tuple = ()
    kwargs: tuple = ()
    stack: tuple[tuple[str, str], ...] = ()

    def refs(self) -> list[tuple[str, str]]:
        """(argument position, node name) for every node this one reads, in argument order."""
        out: list[tuple[str, str]] = []

        def walk(value, where: str) -> None:
            if isinstance(value, Ref):
                out.append((where, value.name))
            elif isinstance(value, tuple):
                for i, item in enumerate(value):
                    walk(item, f"{where}.{i}")

        for i, arg in enumerate(self.args):
            walk(arg, str(i))
        for key, value in self.kwargs:
            walk(value, key)
        return out


@dataclass(frozen=True)
class GraphSnapshot:
    """The exported graph: placeholders, then call nodes in graph (topological) order, and the
    names of the graph's outputs."""

    nodes: tuple[GraphNode, ...]
    outputs: tuple[str, ...]
    seconds: float

    @property
    def calls(self) -> list[GraphNode]:
        return [n for n in self.nodes if n.kind == "call"]

    def ops(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for node in self.calls:
            out.setdefault(node.path, Counter())[node.op] += 1
        return out


_GETATTR = re.compile(r"getattr\((.*?), '([^']*)'\)")


@functools.lru_cache(maxsize=4096)   # a graph repeats a few hundred module paths on thousands of nodes
def _module_path(raw: str) -> str:
    """A dotted module path from an ``nn_module_stack`` path (plain in torch 2.13; older releases
    spelled it ``L['self'].model.layers[0]`` or ``getattr(L['self'].model.layers, '0')``)."""
    path = raw
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"@\d+$", "", path)  # a module called more than once
    for prefix in ("L['self']", "L__self__", "self"):
        if path == prefix:
            return ""
        if path.startswith(prefix + "."):
            path = path[len(prefix) + 1:]
    return path


def _stack(stack: Mapping) -> tuple[tuple[str, str], ...]:
    """``nn_module_stack`` as ((module path, surgery transform of its class or ""), …), outermost first."""
    return tuple((_module_path(raw), cls.split(".")[2] if cls.startswith("surgery.transforms.") else "")
                 for raw, cls in stack.values())


# Nodes torch.export adds to check its own assumptions (dtype/device of a tensor, a symbolic size),
# not computation of the model: counting them would make every ``.to(dtype)`` look like two ops.
_BOOKKEEPING = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                "_assert_async", "_set_grad_enabled"}


def _op_name(node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__   # aten.linear.default → linear
    if isinstance(target, str):
        return target                           # call_method
    return getattr(target, "__name__", str(target))


def _target_name(node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target.overloadpacket.__name__}"   # aten.linear
    return _op_name(node)


def _value(value, kept: Mapping[str, str]):
    """An argument as plain data: nodes become :class:`Ref` to what they stand for (`kept`: node →
    itself, or the input of a cast that changes nothing); dropped bookkeeping nodes become None."""
    if isinstance(value, torch.fx.Node):
        return Ref(kept[value.name]) if value.name in kept else None
    if isinstance(value, (list, tuple)):
        return tuple(_value(v, kept) for v in value)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return f"torch.{value}".replace("torch.torch.", "torch.") if isinstance(value, torch.dtype) else str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _is_noop_cast(node) -> bool:
    """``x.to(dtype)`` where x already has that dtype (and device): torch returns x itself, so export
    records a node that computes nothing, and later reads of x go through it. Kept, it would show a
    LoRA branch's ``to(x, float32)`` in a float32 model as rewiring ``k_proj`` and ``v_proj`` too."""
    if node.op != "call_function" or _op_name(node) != "to" or not node.args:
        return False
    source = node.args[0]
    out, into = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(into, torch.Tensor) or node.kwargs.get("copy"):
        return False
    return (out.dtype, out.device, tuple(out.shape), out.layout) == (into.dtype, into.device, tuple(into.shape), into.layout)


def _passthrough(node, module) -> torch.fx.Node | None:
    """For ``getitem(hop, k)`` where `hop` runs a subgraph (``wrap_with_set_grad_enabled`` around a
    ``no_grad`` block, ``wrap_with_autocast``…) whose k-th output is one of its inputs unchanged: that
    input (possibly through casts that change nothing). torch.export threads values a block does not touch through it (a rotary's lifted
    ``inv_freq`` passes through every layer's ``no_grad`` call), which would make each layer read
    "the previous layer's output" and the same change in 30 layers look like 30 changes."""
    if node.op != "call_function" or _op_name(node) != "getitem" or len(node.args) != 2:
        return None
    hop, k = node.args
    if not isinstance(hop, torch.fx.Node) or not isinstance(hop.target, torch._ops.HigherOrderOperator):
        return None
    at = next((i for i, a in enumerate(hop.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr"), None)
    sub = getattr(module, hop.args[at].target, None) if at is not None else None
    if not isinstance(sub, torch.fx.GraphModule) or not isinstance(k, int):
        return None
    inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    result = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    result = result if isinstance(result, (list, tuple)) else (result,)
    operands = hop.args[at + 1:]
    if k >= len(result):
        return None
    out = result[k]
    while isinstance(out, torch.fx.Node) and _is_noop_cast(out):  # a cast that changes nothing is the input
        out = out.args[0]
    result = (*result[:k], out)
    if k < len(result) and result[k] in inputs and inputs.index(result[k]) < len(operands):
        source = operands[inputs.index(result[k])]
        return source if isinstance(source, torch.fx.Node) else None
    return None


def _reason(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _snapshot(exported, seconds: float) -> GraphSnapshot:
    sig = exported.graph_signature
    tensors = {**{k: ("param", v) for k, v in sig.inputs_to_parameters.items()},
               **{k: ("buffer", v) for k, v in sig.inputs_to_buffers.items()},
               **{k: ("constant", v) for k, v in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items()}}
    graph_nodes = list(exported.graph.nodes)
    kept = {n.name: n.name for n in graph_nodes
            if n.op == "placeholder" or (n.op in ("call_function", "call_method") and _op_name(n) not in _BOOKKEEPING)}
    for n in graph_nodes:
        if n.name in kept and _is_noop_cast(n):
            kept[n.name] = kept.get(n.args[0].name, n.args[0].name)
        elif n.name in kept and (source := _passthrough(n, exported.graph_module)) is not None:
            kept[n.name] = kept.get(source.name, source.name)
    nodes, outputs = [], ()
    for node in graph_nodes:
        if kept.get(node.name, node.name) != node.name:
            continue
        if node.op == "placeholder":
            kind, fqn = tensors.get(node.name, ("input", node.name))
            owner_path = fqn.rpartition(".")[0] if kind != "input" else ""
            nodes.append(GraphNode(node.name, kind, kind, fqn, owner_path))
        elif node.name in kept:
            stack = _stack(node.meta.get("nn_module_stack") or {})
            nodes.append(GraphNode(node.name, "call", _op_name(node), _target_name(node), stack[-1][0] if stack else "",
                                   _value(tuple(node.args), kept),
                                   tuple((k, _value(v, kept)) for k, v in node.kwargs.items()), stack))
        elif node.op == "output":
            outputs = tuple(r.name for r in _flat_refs(_value(tuple(node.args), kept)))
    return GraphSnapshot(tuple(nodes), outputs, seconds)


def _flat_refs(value) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, tuple):
        return [r for v in value for r in _flat_refs(v)]
    return []


def capture_graph(model: nn.Module, input_ids: torch.Tensor) -> GraphSnapshot | str:
    """The model's computation graph on `input_ids` via ``torch.export`` (non-strict), or the
    reason it could not be captured. Never raises for a model that does not export."""
    kwargs = {"input_ids": input_ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # no cache objects in the graph
    start = time.perf_counter()
    # Two things an export makes that the diff never reads, each about a fifth of an export's Python
    # calls on SmolLM2, are skipped through torch's own switches (nothing else about the export changes):
    # * a Python stack trace per node (``node.meta["stack_trace"]``: capturing and symbolizing the
    #   interpreter stack), off with ``torch.fx.config.do_not_emit_stack_traces``;
    # * the Python source of every intermediate GraphModule (export regenerates and execs it 6 times),
    #   generated only when run with lazy graph modules, as torch.compile builds them.
    emit = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings(), _lazy_graph_modules():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
        return _snapshot(exported, time.perf_counter() - start)
    except Exception as e:  # export fails in many model-specific ways; the diff reports the reason
        return _reason(e)
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit


def _lazy_graph_modules():
    """torch's lazy-GraphModule context (private to torch.fx; a plain export where a release lacks it)."""
    use = getattr(getattr(torch.fx, "_lazy_graph_module", None), "_use_lazy_graph_module", None)
    return use(True) if use is not None else contextlib.nullcontext()
