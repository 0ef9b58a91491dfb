"""Before/after view of a surgered model, for code review: the module tree and the computation graph.

Two cheap snapshots are compared:

* :func:`snapshot_tree` records, per module path, the class, the module's identity (``id``), its own
  parameters (name, shape, dtype, trainable) and its subtree's parameter counts. It reads no
  weights, so it works on meta-device models of any size.
* :func:`capture_graph` exports the model with ``torch.export.export(..., strict=False)``
  (transformers 5 models are not ``symbolic_trace``-able) and records, for every
  ``call_function``/``call_method`` node, its op and the innermost module that ran it, read from
  ``node.meta["nn_module_stack"]``. In torch 2.13 that is an ordered dict from an export key
  (``'L__self__model.layers.0.self_attn'``) to ``(dotted module path, qualified class name)``; the
  path is taken from the value, so the export prefix never reaches the diff.

:class:`Diff` classifies the tree change:

* **wrapped** — the module object that lived at ``p`` now lives below ``p`` (``q_proj`` →
  ``q_proj.base``) and ``p`` holds its wrapper. Detected by object identity, confirmed by class and
  parameter shapes (an ``id`` can be reused once an object is freed). The original's own
  descendants, carried along, are not reported again.
* **replaced** — same path, different class, the old object is gone from there.
* **changed** — same path, same class, different parameter names/shapes/dtypes.
* **moved** — the same object at an unrelated path.
* **added** / **removed** — paths only after / only before (relocation targets excluded).
* **frozen** / **unfrozen** — modules whose own parameters lost / gained ``requires_grad``.

The graph diff groups nodes by module so that a change reads where the review reads it: a node is
charged to its innermost module, translated back through relocations (``q_proj.base`` → ``q_proj``),
and, when that module is not a stable one (present on both sides, same class), rolled up to its
shallowest changed ancestor. So LoRA on ``q_proj`` shows as ``q_proj: linear 1 → 3, +1 mul, +1 add``
rather than as ops scattered over ``q_proj.base`` and ``q_proj.adapter.lora_A``.
"""

from __future__ import annotations

import html
import inspect
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

# ------------------------------------------------------------------------------------ snapshots


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
        modules[path] = ModuleInfo(path, type(module).__name__, id(module), own, total, trainable, hooks, settings)
    total, trainable = _count(model.parameters())
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return TreeSnapshot(type(model).__name__, modules, total, trainable, attention)


def _hook_name(hook) -> str:
    return getattr(hook, "__name__", type(hook).__name__).lstrip("_")


@dataclass(frozen=True)
class GraphSnapshot:
    """The exported graph as (innermost module path, op name) per call node, in graph order."""

    nodes: tuple[tuple[str, str], ...]
    seconds: float

    def ops(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for path, op in self.nodes:
            out.setdefault(path, Counter())[op] += 1
        return out


_GETATTR = re.compile(r"getattr\((.*?), '([^']*)'\)")


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


def _reason(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def capture_graph(model: nn.Module, input_ids: torch.Tensor) -> GraphSnapshot | str:
    """The model's computation graph on `input_ids` via ``torch.export`` (non-strict), or the
    reason it could not be captured. Never raises for a model that does not export."""
    kwargs = {"input_ids": input_ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # no cache objects in the graph
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
        nodes = []
        for node in exported.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            op = _op_name(node)
            if op in _BOOKKEEPING:
                continue
            stack = node.meta.get("nn_module_stack") or {}
            path = _module_path(list(stack.values())[-1][0]) if stack else ""
            nodes.append((path, op))
    except Exception as e:  # export fails in many model-specific ways; the diff reports the reason
        return _reason(e)
    return GraphSnapshot(tuple(nodes), time.perf_counter() - start)


# ------------------------------------------------------------------------------------ the diff


@dataclass(frozen=True)
class OpDelta:
    """The ops charged to one module before and after."""

    path: str
    before: Mapping[str, int]
    after: Mapping[str, int]

    @property
    def changes(self) -> dict[str, int]:
        ops = list(dict.fromkeys([*self.before, *self.after]))
        return {op: self.after.get(op, 0) - self.before.get(op, 0)
                for op in ops if self.after.get(op, 0) != self.before.get(op, 0)}

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def describe(self) -> str:
        n_before, n_after = sum(self.before.values()), sum(self.after.values())
        changes = ", ".join(f"{d:+d} {op}" for op, d in sorted(self.changes.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"ops {n_before} → {n_after}: {changes}"


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` → ``["a", "a.b", "a.b.c"]`` (shallowest first)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


class Diff:
    """What surgery changed: the module tree (always) and the exported graph (when both captured)."""

    def __init__(self, before_tree: TreeSnapshot, after_tree: TreeSnapshot,
                 before_graph: GraphSnapshot | str | None = None, after_graph: GraphSnapshot | str | None = None):
        self.before_tree, self.after_tree = before_tree, after_tree
        self.before_graph, self.after_graph = before_graph, after_graph
        self.wrapped_at: dict[str, str] = {}     # path → where the original object lives now
        self.moved_to: dict[str, str] = {}
        # Ordered sets (dicts), so that membership tests stay cheap on large models.
        self._replaced: dict[str, None] = {}
        self._changed: dict[str, None] = {}
        self._removed: dict[str, None] = {}
        self._added: dict[str, None] = {}
        self.frozen: list[str] = []               # before paths whose own parameters were frozen
        self.unfrozen: list[str] = []
        self._classify()
        self._order, self._children = self._union_tree()
        self._statuses = {p: st for p in self._order if (st := self._status(p))}
        self.runtime = self._runtime()
        self.graph: list[OpDelta] | None = None
        self.graph_error: str | None = None   # why there is no graph diff
        self.graph_failed = False             # True when an export failed (not merely not requested)
        self._diff_graph()

    # ----------------------------------------------------------------- classification

    def _classify(self) -> None:
        before, after = self.before_tree.modules, self.after_tree.modules
        by_id = {info.ident: info for info in after.values()}
        relocated: dict[str, str] = {}  # before path → after path, for every relocated object
        for path, old in before.items():
            same = by_id.get(old.ident)
            if same is not None and same.signature != old.signature:
                same = None  # an id reused by a different object
            now = same.path if same is not None else None
            counterpart = same or (after.get(path) if path in after and after[path].cls == old.cls else None)
            if counterpart is not None and old.own:
                # Per parameter name, so that a resized parameter is not mistaken for a thawed one.
                was = {p.name: p.trainable for p in old.params}
                flips = {(was[p.name], p.trainable) for p in counterpart.params if p.name in was}
                if (True, False) in flips:
                    self.frozen.append(path)
                if (False, True) in flips:
                    self.unfrozen.append(path)
            if now is not None and now != path:
                relocated[path] = now
                if self._carried(path, now, relocated):
                    continue
                if path in after and now.startswith(path + "."):
                    self.wrapped_at[path] = now
                    continue
                self.moved_to[path] = now
            if path not in after:
                if now is None:
                    self._removed[path] = None
            elif now == path:
                continue
            elif after[path].cls != old.cls:
                self._replaced[path] = None
            elif after[path].signature != old.signature:
                self._changed[path] = None
        targets = set(relocated.values())
        self._added = {p: None for p in after if p not in before and p not in targets}
        self._relocated = relocated

    def _carried(self, path: str, now: str, relocated: dict[str, str]) -> bool:
        """Whether `path` merely moved along with a relocated ancestor (``a.x`` → ``a.base.x``)."""
        for ancestor in reversed(_ancestors(path)[:-1]):
            if ancestor in relocated:
                return now == relocated[ancestor] + path[len(ancestor):]
        return False

    @property
    def added(self) -> list[str]:
        return list(self._added)

    @property
    def removed(self) -> list[str]:
        return list(self._removed)

    @property
    def replaced(self) -> list[str]:
        return list(self._replaced)

    @property
    def wrapped(self) -> list[str]:
        return list(self.wrapped_at)

    @property
    def moved(self) -> list[str]:
        return list(self.moved_to)

    @property
    def changed(self) -> list[str]:
        return list(self._changed)

    @property
    def added_params(self) -> int:
        return sum(self.after_tree.modules[p].own for p in self._added)

    @property
    def removed_params(self) -> int:
        return sum(self.before_tree.modules[p].own for p in self._removed)

    # ----------------------------------------------------------------- graph

    def _graph_key(self, path: str, side: str, back: dict[str, str], anchors: set[str]) -> str:
        if side == "after":
            # Translate through relocations, longest prefix first: q_proj.base → q_proj.
            for prefix in reversed(_ancestors(path)):
                if prefix in back:
                    path = back[prefix] + path[len(prefix):]
                    break
        stable = path in self.before_tree.modules and path in self.after_tree.modules and path not in anchors
        if not stable:
            for ancestor in _ancestors(path):
                if ancestor in anchors:
                    return ancestor
        return path

    def _graph_message(self) -> str:
        if self.graph_failed:
            return f"the computation graph could not be captured ({self.graph_error}); only the module tree is compared"
        return f"the computation graph was not captured ({self.graph_error})"

    def _diff_graph(self) -> None:
        sides = (("before", self.before_graph), ("after", self.after_graph))
        reasons = [f"{side}: {g}" for side, g in sides if isinstance(g, str)]
        if reasons:
            self.graph_failed = True
            self.graph_error = "; ".join(reasons)
            return
        if self.before_graph is None or self.after_graph is None:
            self.graph_error = "no graph given for " + " and ".join(side for side, g in sides if g is None)
            return
        back = {now: old for old, now in self._relocated.items()}
        anchors = set(self._added) | set(self._removed) | set(self._replaced) | set(self.wrapped_at)
        counts: dict[str, tuple[Counter, Counter]] = {}
        for i, (side, graph) in enumerate(sides):
            for path, op in graph.nodes:
                key = self._graph_key(path, side, back, anchors)
                counts.setdefault(key, (Counter(), Counter()))[i][op] += 1
        order = {p: i for i, p in enumerate(self._order)}
        self.graph = [OpDelta(path, dict(b), dict(a))
                      for path, (b, a) in sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))]

    def graph_changes(self) -> dict[str, dict[str, int]]:
        """Module path → {op: after − before} for every module whose ops changed."""
        return {d.path: d.changes for d in self.graph or [] if d.changed}

    # ----------------------------------------------------------------- rows shared by the views

    def _union_tree(self) -> tuple[list[str], dict[str, list[str]]]:
        """Every path of the after tree plus the removed ones, depth first, and each path's children."""
        paths = [*self.after_tree.modules, *self._removed]
        children: dict[str, list[str]] = {}
        for path in paths:
            if path:
                parent = path.rpartition(".")[0]
                while parent and parent not in self.after_tree.modules and parent not in self._removed:
                    parent = parent.rpartition(".")[0]
                children.setdefault(parent, []).append(path)
        out: list[str] = []

        def walk(path: str) -> None:
            out.append(path)
            for child in children.get(path, []):
                walk(child)

        walk("")
        return out, children

    def _status(self, path: str) -> tuple[str, str, str] | None:
        """(sign, kind, description) for a changed path, None for an unchanged one."""
        b, a = self.before_tree.modules.get(path), self.after_tree.modules.get(path)
        if path in self.wrapped_at:
            inner = self.wrapped_at[path][len(path):]  # relative, so that layers group in text()
            return "~", "wrapped", (f"{b.cls} → {a.cls} (original now at {inner}); "
                                    f"{_counts(b.total, b.trainable)} → {_counts(a.total, a.trainable)}")
        if path in self._replaced:
            return "~", "replaced", (f"{b.cls} → {a.cls}; "
                                     f"{_counts(b.total, b.trainable)} → {_counts(a.total, a.trainable)}")
        if path in self._changed:
            diff = sorted(set(p.describe() for p in b.params) ^ set(p.describe() for p in a.params))
            return "~", "changed", f"{a.cls} parameters changed: {', '.join(diff)}"
        if path in self._added:
            return "+", "added", f"{a.cls}; {_counts(a.own, a.own_trainable)}"
        if path in self._removed:
            return "-", "removed", f"{b.cls}; {_counts(b.own, b.own_trainable)}"
        if path in self.moved_to:
            return "~", "moved", f"{b.cls} moved to {self.moved_to[path]}"
        return None

    def _runtime(self) -> list[tuple[str, str]]:
        """(where, what) for behaviour that lives outside the module tree: hooks, transform settings
        on modules, and the attention implementation (how window-style transforms take effect)."""
        out = []
        b, a = self.before_tree, self.after_tree
        if b.attention != a.attention:
            out.append(("config", f"_attn_implementation: {b.attention} → {a.attention}"))
        for path, after in a.modules.items():
            before = b.modules.get(path)
            was_hooks, was_settings = (before.hooks, before.settings) if before else ((), ())
            parts = [f"+{h}" for h in after.hooks if h not in was_hooks]
            parts += [f"-{h}" for h in was_hooks if h not in after.hooks]
            parts += [f"+{k}" for k in after.settings if k not in was_settings]
            parts += [f"-{k}" for k in was_settings if k not in after.settings]
            if parts:
                out.append((path or "(model)", ", ".join(parts)))
        return out

    def summary(self) -> dict:
        b, a = self.before_tree, self.after_tree
        return {
            "model": a.model,
            "params": {"total": [b.total, a.total], "trainable": [b.trainable, a.trainable],
                       "frozen": [b.frozen, a.frozen]},
            "modules": {"added": len(self._added), "replaced": len(self._replaced), "wrapped": len(self.wrapped_at),
                        "removed": len(self._removed), "moved": len(self.moved_to), "changed": len(self._changed),
                        "frozen": len(self.frozen), "unfrozen": len(self.unfrozen)},
            "added_params": self.added_params,
            "removed_params": self.removed_params,
        }

    # ----------------------------------------------------------------- outputs

    def to_json(self) -> dict:
        before, after = self.before_tree.modules, self.after_tree.modules

        def info(m: ModuleInfo) -> dict:
            return {"class": m.cls, "total": m.total, "trainable": m.trainable, "own": m.own}

        graph: dict = {"error": self.graph_error, "failed": self.graph_failed}
        if self.graph is not None:
            graph["modules"] = [{"path": d.path, "before": dict(d.before), "after": dict(d.after), "changes": d.changes}
                                for d in self.graph if d.changed]
            graph["unchanged_modules"] = sum(1 for d in self.graph if not d.changed)
        return {
            "summary": self.summary(),
            "added": [{"path": p, **info(after[p])} for p in self._added],
            "removed": [{"path": p, **info(before[p])} for p in self._removed],
            "replaced": [{"path": p, "before": info(before[p]), "after": info(after[p])} for p in self._replaced],
            "wrapped": [{"path": p, "inner": q, "before": info(before[p]), "after": info(after[p])}
                        for p, q in self.wrapped_at.items()],
            "moved": [{"path": p, "to": q} for p, q in self.moved_to.items()],
            "changed": [{"path": p, "before": [x.describe() for x in before[p].params],
                         "after": [x.describe() for x in after[p].params]} for p in self._changed],
            "frozen": list(self.frozen),
            "unfrozen": list(self.unfrozen),
            "runtime": [{"where": w, "change": c} for w, c in self.runtime],
            "graph": graph,
        }

    def text(self, group: bool = True) -> str:
        """Plain text for a terminal or a PR comment. With `group`, rows that differ only in a
        layer index are merged (``model.layers.{0-31}.self_attn.q_proj``)."""
        s = self.summary()
        p = s["params"]
        m = s["modules"]
        out = [f"surgery diff: {s['model']}",
               f"  parameters  total {_delta(*p['total'])}   trainable {_delta(*p['trainable'])}   "
               f"frozen {_delta(*p['frozen'])}",
               f"  modules     {m['added']} added, {m['wrapped']} wrapped, {m['replaced']} replaced, "
               f"{m['removed']} removed" + "".join(f", {m[k]} {k}" for k in ("moved", "changed") if m[k]),
               "", "module tree"]
        rows = [(sign, path, f"{kind}: {desc}") for path, (sign, kind, desc) in self._statuses.items()]
        out += ([f"{sign} {label}  {desc}" for sign, label, desc in _grouped(rows, group)]
                or ["  (no structural change)"])
        for word, paths in (("frozen", self.frozen), ("unfrozen", self.unfrozen)):
            if paths:
                out.append(f"~ {word}: {self._trainability(paths, word)}")
        if self.runtime:
            out += ["", "runtime (hooks, transform settings, attention implementation)"]
            out += [f"~ {label}  {desc}" for _, label, desc in _grouped([("~", w, c) for w, c in self.runtime], group)]
        if self.graph is None:
            out += ["", "computation graph (torch.export)"]
            out.append(f"  {self._graph_message()}")
        else:
            out += ["", f"computation graph (torch.export, {len(self.before_graph.nodes)} → "
                        f"{len(self.after_graph.nodes)} op nodes)"]
            rows = [("~", d.path or "(model)", d.describe()) for d in self.graph if d.changed]
            out += [f"{sign} {label}  {desc}" for sign, label, desc in _grouped(rows, group)] or ["  (no op changed)"]
            unchanged = sum(1 for d in self.graph if not d.changed)
            out.append(f"  {unchanged} module(s) with unchanged ops")
        return "\n".join(out) + "\n"

    def _trainability(self, paths: list[str], word: str) -> str:
        before = self.before_tree.modules
        if word == "frozen" and set(paths) == {p for p, info in before.items() if info.own_trainable}:
            return f"all {len(paths)} modules of the original model that had trainable parameters"
        # A long list helps no reviewer: show the first few (layer-grouped) and the count.
        labels = [label for _, label, _ in _grouped([("~", p, "") for p in paths], True)]
        return f"{len(paths)} module(s): " + ", ".join(labels[:8]) + (", …" if len(labels) > 8 else "")

    def __str__(self) -> str:
        return self.text()

    def html(self) -> str:
        """A self-contained page (inline CSS, no script, no network) for a reviewer."""
        s = self.summary()
        e = html.escape
        p = s["params"]
        summary_rows = "".join(
            f"<tr><th>{k}</th><td>{b:,}</td><td>{a:,}</td><td class='{_sign_class(a - b)}'>{a - b:+,}</td></tr>"
            for k, (b, a) in p.items())
        badges = "".join(f"<span class='badge {k}'>{n} {k}</span>" for k, n in s["modules"].items() if n)
        frozen = set(self.frozen)
        relocated_here = {now: old for old, now in self._relocated.items()}
        # Open the nodes on the way to a structural change; the rest of the tree starts collapsed.
        opened = {""} | {a for p in self._statuses for a in _ancestors(p)}

        def node(path: str) -> str:
            b, a = self.before_tree.modules.get(path), self.after_tree.modules.get(path)
            info = a or b
            status = self._statuses.get(path)
            kind = status[1] if status else ""
            name = path.rpartition(".")[2] if path else "(model)"
            cls = f"{b.cls} → {a.cls}" if kind in ("wrapped", "replaced") else info.cls
            notes = []
            if path in relocated_here:
                notes.append(f"was {relocated_here[path]}")
            if path in self.wrapped_at:
                notes.append(f"original at {self.wrapped_at[path]}")
            original = relocated_here.get(path, None if kind in ("wrapped", "replaced") else path)
            if original in frozen:
                notes.append("frozen")
            count = (f"{b.total:,} → {a.total:,}" if kind in ("wrapped", "replaced") else f"{info.total:,}")
            label = (f"<span class='name'>{e(name)}</span> <span class='cls'>{e(cls)}</span> "
                     f"<span class='num'>{count} params, {info.trainable:,} trainable</span>"
                     + "".join(f" <span class='note'>{e(n)}</span>" for n in notes))
            title = f" title='{e(path or '(model)')}'"
            css = f" class='{kind}'" if kind else (" class='moved'" if path in relocated_here else "")
            kids = self._children.get(path, [])
            if not kids:
                return f"<li{css}><span class='leaf'{title}>{label}</span></li>"
            inner = "".join(node(k) for k in kids)
            is_open = " open" if path in opened else ""
            return f"<li{css}><details{is_open}><summary{title}>{label}</summary><ul>{inner}</ul></details></li>"

        graph = self._graph_html()
        runtime = "".join(f"<li><span class='name'>{e(w)}</span> <span class='note'>{e(c)}</span></li>"
                          for w, c in self.runtime)
        runtime = f"<h2>Runtime</h2><ul class='tree'>{runtime}</ul>" if runtime else ""
        return _PAGE.format(
            title=e(f"surgery diff: {s['model']}"), model=e(s["model"]), summary=summary_rows, badges=badges,
            tree=node(""), runtime=runtime, graph=graph)

    def _graph_html(self) -> str:
        e = html.escape
        if self.graph is None:
            return f"<p class='{'error' if self.graph_failed else 'note'}'>{e(self._graph_message())}</p>"
        changed = [d for d in self.graph if d.changed]
        body = []
        for d in changed:
            ops = list(dict.fromkeys([*d.before, *d.after]))
            body.append(f"<tbody><tr class='mod'><th colspan='4'>{e(d.path or '(model)')}"
                        f" <span class='num'>{e(d.describe())}</span></th></tr>")
            for op in ops:
                nb, na = d.before.get(op, 0), d.after.get(op, 0)
                body.append(f"<tr class='{_sign_class(na - nb)}'><td>{e(op)}</td><td>{nb}</td><td>{na}</td>"
                            f"<td>{na - nb:+d}</td></tr>")
            body.append("</tbody>")
        table = ("<table class='graph'><thead><tr><th>op</th><th>before</th><th>after</th><th>Δ</th></tr></thead>"
                 + "".join(body) + "</table>") if changed else "<p>No op changed.</p>"
        unchanged = [d for d in self.graph if not d.changed]
        rows = "".join(f"<tr><td>{e(d.path or '(model)')}</td>"
                       f"<td>{e(', '.join(f'{n} {op}' for op, n in d.after.items()))}</td></tr>" for d in unchanged)
        return (table + f"<details><summary>{len(unchanged)} module(s) with unchanged ops</summary>"
                f"<table class='graph'><tbody>{rows}</tbody></table></details>")


# ------------------------------------------------------------------------------------ formatting


def _counts(total: int, trainable: int) -> str:
    return f"{total:,} params ({trainable:,} trainable)"


def _delta(before: int, after: int) -> str:
    return f"{before:,} → {after:,} ({after - before:+,})"


def _sign_class(d: int) -> str:
    return "add" if d > 0 else "rem" if d < 0 else "same"


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _grouped(rows: list[tuple[str, str, str]], group: bool) -> list[tuple[str, str, str]]:
    """Merge rows whose paths differ only in numeric segments and whose descriptions are equal."""
    if not group:
        return rows
    groups: dict[tuple, list[list[str]]] = {}
    for sign, path, desc in rows:
        parts = path.split(".")
        shape = tuple(None if part.isdigit() else part for part in parts)
        groups.setdefault((sign, shape, desc), []).append(parts)
    out = []
    for (sign, shape, desc), members in groups.items():
        label = []
        for i, part in enumerate(shape):
            if part is not None:
                label.append(part)
            else:
                values = [int(m[i]) for m in members]
                text = _ranges(values)
                label.append(text if len(set(values)) == 1 else "{" + text + "}")
        out.append((sign, ".".join(label), desc))
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #1f2328; }}
h1 span {{ font-weight: normal; color: #59636e; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
th, td {{ border: 1px solid #d1d9e0; padding: .25em .6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.badge {{ display: inline-block; padding: .1em .6em; margin-right: .4em; border-radius: 1em; background: #eee; }}
.badge.added {{ background: #dafbe1; }} .badge.removed {{ background: #ffebe9; }}
.badge.replaced {{ background: #fff1d6; }} .badge.wrapped {{ background: #ddf4ff; }}
.badge.changed, .badge.moved {{ background: #fbefff; }}
ul.tree, ul.tree ul {{ list-style: none; padding-left: 1.2em; margin: 0; }}
ul.tree {{ padding-left: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }}
summary {{ cursor: pointer; }}
.leaf {{ padding-left: 1.1em; }}
.cls {{ color: #6639ba; }} .num {{ color: #59636e; font-size: 12px; }}
.note {{ font-size: 11px; padding: 0 .4em; border-radius: .6em; background: #eaeef2; color: #59636e; }}
li.added > span, li.added > details > summary {{ background: #dafbe1; }}
li.removed > span, li.removed > details > summary {{ background: #ffebe9; text-decoration: line-through; }}
li.replaced > span, li.replaced > details > summary {{ background: #fff1d6; }}
li.wrapped > span, li.wrapped > details > summary {{ background: #ddf4ff; }}
li.changed > span, li.changed > details > summary,
li.moved > span, li.moved > details > summary {{ background: #fbefff; }}
table.graph {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }}
tr.mod th {{ background: #f6f8fa; text-align: left; }}
tr.add td {{ background: #dafbe1; }} tr.rem td {{ background: #ffebe9; }} tr.same td {{ color: #59636e; }}
td.add {{ color: #1a7f37; }} td.rem {{ color: #d1242f; }}
.error {{ padding: .6em 1em; background: #ffebe9; border: 1px solid #ff8182; border-radius: 6px; }}
</style>
</head>
<body>
<h1>surgery diff <span>{model}</span></h1>
<h2>Summary</h2>
<table><thead><tr><th>parameters</th><th>before</th><th>after</th><th>Δ</th></tr></thead>
<tbody>{summary}</tbody></table>
<p>{badges}</p>
<h2>Module tree</h2>
<p><span class="badge added">added</span><span class="badge wrapped">wrapped</span>
<span class="badge replaced">replaced</span><span class="badge removed">removed</span>
<span class="badge moved">moved / changed</span></p>
<ul class="tree">{tree}</ul>
{runtime}
<h2>Computation graph</h2>
{graph}
</body>
</html>
"""
