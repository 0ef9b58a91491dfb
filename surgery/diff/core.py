""":class:`Diff`: what surgery changed, for code review — the module tree, the runtime, the graph.

The snapshots it compares come from :mod:`surgery.diff.snapshot`. The tree change is classified:

* **wrapped** — the module object that lived at ``p`` now lives below ``p`` (``q_proj`` →
  ``q_proj.base``) and ``p`` holds its wrapper. Detected by object identity, confirmed by class and
  parameter shapes (an ``id`` can be reused once an object is freed). The original's own
  descendants, carried along, are not reported again.
* **replaced** — same path, different class, the old object is gone from there.
* **changed** — same path, same class, different parameter names/shapes/dtypes.
* **moved** — the same object at an unrelated path.
* **added** / **removed** — paths only after / only before (relocation targets excluded).
* **frozen** / **unfrozen** — modules whose own parameters lost / gained ``requires_grad``.

The graph diff (:mod:`surgery.diff.graph`) is read per *unit*, where the review reads it: a node is
charged to the module that ran it, translated back through relocations (``q_proj.base`` →
``q_proj``), and, when that module is not a stable one (present on both sides, same class), rolled
up to its shallowest changed ancestor; a module called from outside its parent counts as part of its
caller (:meth:`Diff._provenance`). So LoRA on ``q_proj`` is one unit, ``q_proj``, whose code gains
the ``lora_A``/``lora_B`` branch, rather than ops scattered over ``q_proj.base`` and
``q_proj.adapter.lora_A``. Units whose change reads the same once layer indices are written ``{i}``
are one entry (``model.layers.{0-29}.mlp.down_proj``): in the text, the code (``--code``), the
pictures and the JSON. With the plan, each change names the spec rule behind it
(``lora(r=16) at spec.surg:4:71``): the steps whose target module contains the changed node's module,
narrowed to the transform whose module ran it when the tree says so.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from surgery.diff.graph import UnitDiff, structural_diff
from surgery.diff.grouping import _grouped, group_label, layer_free
from surgery.diff.picture import pictures_html
from surgery.diff.snapshot import GraphNode, GraphSnapshot, ModuleInfo, TreeSnapshot

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


def _rule_label(step) -> str:
    """``lora(r=16) at spec.surg:4:71``: the call as written, where it is written."""
    span = step.span
    lines = span.source.split("\n")
    text = step.transform
    if span.line == span.end_line and 0 < span.line <= len(lines):
        text = lines[span.line - 1][span.column - 1:span.end_column - 1] or text
    return f"{text} at {span.file}:{span.line}:{span.column}"


class Diff:
    """What surgery changed: the module tree (always) and the exported graph (when both captured)."""

    def __init__(self, before_tree: TreeSnapshot, after_tree: TreeSnapshot,
                 before_graph: GraphSnapshot | str | None = None, after_graph: GraphSnapshot | str | None = None,
                 plan=None):
        self.before_tree, self.after_tree = before_tree, after_tree
        self.plan = plan                          # the Plan applied, to name the rule behind a change
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
        self._back = {now: old for old, now in self._relocated.items()}
        self._anchors: set[str] = set()
        # Memos: many nodes share a module stack (a layer's ops) or a module (a changed unit's lines).
        self._provenances: dict[tuple, tuple[str, str, str]] = {}
        self._rules: dict[tuple[str, str, str], tuple[str, ...]] = {}
        self._groups: dict[bool, list[dict]] = {}
        self._step_targets: list[set[str]] | None = None   # each plan step's target paths
        self._order, self._children = self._union_tree()
        self._statuses = {p: st for p in self._order if (st := self._status(p))}
        self.runtime = self._runtime()
        self.graph: list[OpDelta] | None = None
        self.units: list[UnitDiff] | None = None  # the structural diff of every unit (module computation)
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

    def _translate(self, path: str) -> str:
        """An after path in before terms, through relocations, longest prefix first: ``q_proj.base`` → ``q_proj``."""
        for prefix in reversed(_ancestors(path)):
            if prefix in self._back:
                return self._back[prefix] + path[len(prefix):]
        return path

    def _graph_key(self, path: str, side: str) -> str:
        """The unit a node of `path` is charged to: its module in before terms if that module is stable
        (present on both sides, same class, not wrapped), else the shallowest changed ancestor."""
        if side == "after":
            path = self._translate(path)
        anchors = self._anchors
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

    def _provenance(self, node: GraphNode, side: str) -> tuple[str, str, str]:
        """(unit, foreign module it ran in or "", surgery transform whose module ran it or "").

        Down the node's module stack, each callee is the new place of the node, unless it is
        *foreign*: neither inside its caller nor charged to the caller's unit (``model.rotary_emb``
        called by a ``self_attn``). A foreign call is part of its caller's computation, so the node
        stays with the caller (``down_proj.base`` called by ``down_proj.adapter.1`` is not foreign:
        both count as ``down_proj``)."""
        memo = (node.stack, side)
        if memo not in self._provenances:
            self._provenances[memo] = self._provenance_of(node.stack, side)
        return self._provenances[memo]

    def _provenance_of(self, stack: tuple, side: str) -> tuple[str, str, str]:
        stack = stack or (("", ""),)
        here, owner = stack[0][0], stack[0][1]
        unit = self._graph_key(here, side)
        via = ""
        for path, transform in stack[1:]:
            key = self._graph_key(path, side)
            if not (here == "" or path.startswith(here + ".") or key == unit or key.startswith(unit + ".")):
                via = path
                break
            here, unit, owner = path, key, transform or owner
        # A transform's module may run its children without being called itself (no stack entry):
        # its place in the tree still says whose node this is.
        tree = (self.after_tree if side == "after" else self.before_tree).modules
        for path in reversed(_ancestors(here)):
            if path in tree and tree[path].transform:
                owner = tree[path].transform
                break
        return unit, via, owner

    def _rules_of(self, node: GraphNode, via: str, owner: str) -> tuple[str, ...]:
        """The plan steps behind a changed node: those whose target module contains the node's module
        (or the foreign module it ran in), narrowed to the transform whose module ran it when one did."""
        if self.plan is None:
            return ()
        memo = (node.path, via, owner)
        if memo not in self._rules:
            self._rules[memo] = self._rules_at(*memo)
        return self._rules[memo]

    def _rules_at(self, path: str, via: str, owner: str) -> tuple[str, ...]:
        paths = [p for p in (path, via) if p]
        paths = [self._translate(p) for p in paths] + paths
        # A target contains a path when it is the path or one of its ancestors.
        within = {a for p in paths for a in _ancestors(p)}
        if self._step_targets is None:
            self._step_targets = [{t.path for t in s.targets} for s in self.plan.steps]
        steps = [s for s, targets in zip(self.plan.steps, self._step_targets) if not within.isdisjoint(targets)]
        if owner and not via and any(s.transform == owner for s in steps):
            steps = [s for s in steps if s.transform == owner]
        return tuple(_rule_label(s) for s in steps)

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
        self._back = {now: old for old, now in self._relocated.items()}
        self._anchors = set(self._added) | set(self._removed) | set(self._replaced) | set(self.wrapped_at)
        self._provenances.clear()   # units depend on the anchors
        counts: dict[str, tuple[Counter, Counter]] = {}
        for i, (side, graph) in enumerate(sides):
            for node in graph.calls:
                key = self._provenance(node, side)[0]
                counts.setdefault(key, (Counter(), Counter()))[i][node.op] += 1
        order = {p: i for i, p in enumerate(self._order)}

        def rank(path: str) -> tuple:
            return order.get(path, len(order)), path

        self.graph = [OpDelta(path, dict(b), dict(a)) for path, (b, a) in sorted(counts.items(), key=lambda kv: rank(kv[0]))]
        self.units = structural_diff(self.before_graph, self.after_graph,
                                     lambda n: self._provenance(n, "before"), lambda n: self._provenance(n, "after"),
                                     self._translate, self._rules_of, rank)

    def graph_groups(self, group: bool = True) -> list[dict]:
        """The changed units, those whose change reads the same (layer index aside) merged:
        ``{"label": "model.layers.{0-29}.mlp.down_proj", "paths": [...], "unit": UnitDiff, "code": str}``
        where ``code`` is the unified diff with layer indices written ``{i}``. Computed once per
        `group` (text, code, HTML and JSON all read it); callers get a fresh list of the same dicts."""
        if group not in self._groups:
            self._groups[group] = self._graph_groups(group)
        return list(self._groups[group])

    def _graph_groups(self, group: bool) -> list[dict]:
        groups: dict[tuple, dict] = {}
        for unit in self.units or []:
            if not unit.changed:
                continue
            code = layer_free(unit.unified(), unit.path) if group else unit.unified()
            shape = tuple(None if part.isdigit() else part for part in unit.path.split(".")) if group else unit.path
            entry = groups.setdefault((shape, code), {"paths": [], "unit": unit, "code": code})
            entry["paths"].append(unit.path)
        for entry in groups.values():
            entry["label"] = group_label(entry["paths"]) if entry["paths"][0] else "(model)"
        return list(groups.values())

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
            graph["changes"] = [_unit_json(g) for g in self.graph_groups()]
            graph["changed_paths"] = [u.path for u in self.units if u.changed]
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
            out += ["", f"computation graph (torch.export, {len(self.before_graph.calls)} → "
                        f"{len(self.after_graph.calls)} op nodes; matched by module, op and data flow)"]
            groups = self.graph_groups(group)
            for g in groups:
                unit = g["unit"]
                out.append(f"~ {g['label']}  {unit.describe()}")
                if unit.rules:
                    out.append(f"    from {'; '.join(unit.rules)}")
            if not groups:
                out.append("  (no node or edge changed)")
            unchanged = sum(1 for u in self.units if not u.changed)
            out.append(f"  {unchanged} module(s) with unchanged computation" + ("; --code shows the changed code" if groups else ""))
        return "\n".join(out) + "\n"

    def code(self, group: bool = True) -> str:
        """Each distinct changed module's computation, before → after, as a unified diff of Python
        (one line per graph node); each hunk names the spec rule behind it."""
        if self.graph is None:
            return f"{self._graph_message()}\n"
        blocks = []
        for g in self.graph_groups(group):
            head = f"# {g['label']}" + (f"  ({len(g['paths'])} modules changed alike)" if len(g["paths"]) > 1 else "")
            blocks.append(head + "\n" + g["code"] + "\n")
        return "\n".join(blocks) if blocks else "no module's computation changed\n"

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
        groups = self.graph_groups()
        if not groups:
            return "<p>No module's computation changed.</p>"
        rows = "".join(f"<tr><td><a href='#code-{i}'>{e(g['label'])}</a></td><td>{e(g['unit'].describe())}</td>"
                       f"<td>{e('; '.join(g['unit'].rules))}</td></tr>" for i, g in enumerate(groups))
        code = []
        for i, g in enumerate(groups):
            lines = []
            for line in g["code"].split("\n"):
                css = ("hunk" if line.startswith("@@") else "file" if line.startswith(("---", "+++"))
                       else "add" if line.startswith("+") else "rem" if line.startswith("-") else "ctx")
                lines.append(f"<span class='{css}'>{e(line)}</span>")
            code.append(f"<h4 id='code-{i}'>{e(g['label'])}</h4><pre class='code'>" + "\n".join(lines) + "</pre>")
        unchanged = sum(1 for u in self.units if not u.changed)
        return (f"<table class='graph'><thead><tr><th>module</th><th>change</th><th>rule</th></tr></thead>"
                f"<tbody>{rows}</tbody></table><p class='note'>{unchanged} module(s) with unchanged computation</p>"
                + pictures_html(groups) + "<h3>Code</h3>" + "".join(code))


def _unit_json(g: dict) -> dict:
    unit: UnitDiff = g["unit"]

    def nodes(entries, side):
        return [{"name": x.name, "op": (x.after or x.before).target,
                 "code": x.after_line if side == "after" else x.before_line, "rules": list(x.rules)} for x in entries]

    return {"label": g["label"], "paths": g["paths"], "rules": list(unit.rules),
            "added_nodes": nodes(unit.added, "after"), "removed_nodes": nodes(unit.removed, "before"),
            "rewired_nodes": [{"name": x.name, "op": x.after.target, "status": x.status, "before": x.before_line,
                               "after": x.after_line, "rules": list(x.rules)} for x in unit.rewired],
            "added_edges": [list(edge) for edge in unit.added_edges],
            "removed_edges": [list(edge) for edge in unit.removed_edges],
            "code": g["code"]}


# ------------------------------------------------------------------------------------ formatting


def _counts(total: int, trainable: int) -> str:
    return f"{total:,} params ({trainable:,} trainable)"


def _delta(before: int, after: int) -> str:
    return f"{before:,} → {after:,} ({after - before:+,})"


def _sign_class(d: int) -> str:
    return "add" if d > 0 else "rem" if d < 0 else "same"


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
table.graph td, table.graph th {{ text-align: left; }}
table.graph {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }}
tr.mod th {{ background: #f6f8fa; text-align: left; }}
tr.add td {{ background: #dafbe1; }} tr.rem td {{ background: #ffebe9; }} tr.same td {{ color: #59636e; }}
td.add {{ color: #1a7f37; }} td.rem {{ color: #d1242f; }}
.error {{ padding: .6em 1em; background: #ffebe9; border: 1px solid #ff8182; border-radius: 6px; }}
pre.code {{ font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; background: #f6f8fa; padding: .6em;
  overflow-x: auto; border: 1px solid #d1d9e0; border-radius: 6px; }}
pre.code .add {{ background: #dafbe1; display: inline-block; min-width: 100%; }}
pre.code .rem {{ background: #ffebe9; display: inline-block; min-width: 100%; }}
pre.code .hunk {{ color: #0550ae; }} pre.code .file {{ color: #59636e; font-weight: bold; }}
section.picture {{ margin: 1em 0 2em; }}
div.sides {{ display: flex; gap: 1em; align-items: flex-start; overflow-x: auto; }}
div.sides figure {{ flex: 1 1 0; min-width: 0; margin: 0; border: 1px solid #d1d9e0; border-radius: 6px; padding: .4em; overflow: auto; max-height: 2400px; }}
figcaption {{ font-weight: bold; color: #59636e; }}
svg.flow text {{ font: 12px ui-monospace, Menlo, Consolas, monospace; fill: #1f2328; }}
.k {{ padding: 0 .4em; border-radius: .4em; border: 1px solid; }}
.k.added {{ background: #dafbe1; border-color: #1a7f37; }} .k.removed {{ background: #ffebe9; border-color: #d1242f; text-decoration: line-through; }}
.k.rewired {{ background: #fff8c5; border-color: #9a6700; }} .k.source {{ background: #ddf4ff; border-color: #54aeff; }}
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
