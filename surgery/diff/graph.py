"""The structural graph diff: which nodes and edges surgery added, removed or rewired, per module.

Every call node of each exported graph is charged to a *unit*, the module whose computation the
review reads (chosen by :class:`surgery.diff.Diff`: the innermost stable module, or the shallowest
changed one, so that ``down_proj.base`` and ``down_proj.adapter.0.lora_A`` both count as
``down_proj``). Nodes are then matched before ↔ after by provenance, never by printed text:

* **exact**: same unit, same module path (after relocation: ``down_proj.base`` → ``down_proj``),
  same op, same literal arguments, and every input the same — a node inside the unit is the same
  when it is *matched* (so matching runs in graph order, which is topological); a parameter when it
  is the same tensor path (translated likewise); a value from another unit when it is the same
  *output slot* of that unit (the k-th value the unit hands out). The slot rule keeps a change local:
  when LoRA makes ``down_proj`` return ``base + lora`` instead of ``base``, the residual add after
  it still reads "output 0 of down_proj" and is not reported as changed.
* **rewired**: what is left is paired with an unmatched node of the same unit, path and op that
  shares at least one input at the same argument position (its data-flow position); among several
  the one sharing most, then the earliest. Such a node is *rewired* (an input changed) or
  *changed* (only literal arguments changed, e.g. a window size).
* the rest is **added** (after only) or **removed** (before only).

Edges are (source, node, argument position) with sources named as in the rendered code; the edge
sets before and after are compared as sets.

A unit's computation renders as Python, one line per node: ``linear_1 = aten.linear(x, self.weight)``.
Names are stable: a node is named after its op, numbered within its unit in merged order, and a
matched pair shares its name, so the unified diff shows only what changed. Values from other units
are named after the unit (``mlp``, ``rotary_emb_1`` for its second output); parameters by their path
relative to the unit (``self.base.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from surgery.diff.snapshot import GraphNode, GraphSnapshot, Ref

CONTEXT = 3   # lines of unchanged code around a hunk, as in ``diff -u``


@dataclass
class _Side:
    """One graph, indexed for matching."""

    nodes: dict[str, GraphNode]
    unit: dict[str, str]             # call node → unit
    via: dict[str, str]              # call node → a foreign module it ran in ("" if none)
    owner: dict[str, str]            # call node → the surgery transform whose module ran it ("" if none)
    units: dict[str, list[str]]      # unit → its call nodes, in graph order
    slot: dict[str, int]             # node read outside its unit (or by the graph output) → slot
    reads: dict[tuple[str, str], list[str]]  # (consumer unit, unit) → what the one reads of the other, in order
    outputs: dict[str, list[str]]    # unit → the nodes it hands out, in slot order
    tpath: dict[str, str]            # call node → module path as before surgery
    ttarget: dict[str, str]          # tensor placeholder → tensor path as before surgery
    refs: dict[str, list[tuple[str, str]]]   # call node → its inputs (``GraphNode.refs``), walked once
    literals: dict[str, tuple]       # call node → its arguments with inputs blanked (args, kwargs)


def _side(graph: GraphSnapshot, provenance: Callable[[GraphNode], tuple[str, str, str]],
          translate: Callable[[str], str]) -> _Side:
    nodes = {n.name: n for n in graph.nodes}
    unit, via, owner, units, tpath = {}, {}, {}, {}, {}
    for n in graph.calls:
        u, via[n.name], owner[n.name] = provenance(n)
        unit[n.name] = u
        units.setdefault(u, []).append(n.name)
        tpath[n.name] = translate(n.path)
    handed: dict[str, None] = {}
    reads: dict[tuple[str, str], dict[str, None]] = {}
    refs = {n.name: n.refs() for n in graph.calls}
    for n in graph.calls:
        for _, src in refs[n.name]:
            if src in unit and unit[src] != unit[n.name]:
                handed[src] = None
                reads.setdefault((unit[n.name], unit[src]), {})[src] = None
    for name in graph.outputs:
        if name in unit:
            handed[name] = None
    outputs: dict[str, list[str]] = {}
    order = {name: i for i, name in enumerate(nodes)}
    for name in sorted(handed, key=order.__getitem__):
        outputs.setdefault(unit[name], []).append(name)
    slot = {name: k for names in outputs.values() for k, name in enumerate(names)}
    ordered = {key: sorted(srcs, key=order.__getitem__) for key, srcs in reads.items()}
    ttarget = {n.name: translate(n.target) for n in graph.nodes if n.kind != "call"}
    literals = {n.name: (_literals(n.args), _literals(n.kwargs)) for n in graph.calls}
    return _Side(nodes, unit, via, owner, units, slot, ordered, outputs, tpath, ttarget, refs, literals)


def _literals(value):
    """The argument structure with every node reference blanked: what an op is called with, besides data."""
    if isinstance(value, Ref):
        return "·"
    if isinstance(value, tuple):
        return tuple(_literals(v) for v in value)
    return value


@dataclass
class Entry:
    """One line of a unit's rendered computation: a matched pair, or a node of one side only."""

    name: str
    before: GraphNode | None
    after: GraphNode | None
    status: str                       # same | changed | rewired | added | removed
    before_line: str = ""
    after_line: str = ""
    rules: tuple[str, ...] = ()       # the plan steps that explain a changed line


@dataclass
class UnitDiff:
    """The structural diff of one unit (a module's own computation)."""

    path: str
    entries: list[Entry]
    inputs_before: dict[str, str]       # rendered input name → where it comes from
    inputs_after: dict[str, str]
    returns: tuple[list[str], list[str]]  # names handed out before / after
    shown: tuple[dict[str, str], dict[str, str]]  # edge source name → name in that side's code
    edges_before: set[tuple[str, str, str]]
    edges_after: set[tuple[str, str, str]]
    rules: tuple[str, ...] = ()
    hunks: list[dict] = field(default_factory=list)

    @property
    def added(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "added"]

    @property
    def removed(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "removed"]

    @property
    def rewired(self) -> list[Entry]:
        return [e for e in self.entries if e.status in ("rewired", "changed")]

    @property
    def added_edges(self) -> list[tuple[str, str, str]]:
        return sorted(self.edges_after - self.edges_before)

    @property
    def removed_edges(self) -> list[tuple[str, str, str]]:
        return sorted(self.edges_before - self.edges_after)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired or self.edges_before != self.edges_after)

    def describe(self) -> str:
        n_before = sum(1 for e in self.entries if e.before is not None)
        n_after = sum(1 for e in self.entries if e.after is not None)
        parts = [f"nodes {n_before} → {n_after}"]
        for word, items in (("added", self.added), ("removed", self.removed), ("rewired", self.rewired)):
            if items:
                ops = {}
                for e in items:
                    op = (e.after or e.before).op
                    ops[op] = ops.get(op, 0) + 1
                shown = ", ".join(f"{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:6])
                parts.append(f"{word} {len(items)} ({shown}{', …' if len(ops) > 6 else ''})")
        parts.append(f"edges +{len(self.added_edges)} −{len(self.removed_edges)}")
        return "; ".join(parts)

    def code(self, side: str) -> str:
        """The unit's computation on one side, as Python."""
        inputs = self.inputs_before if side == "before" else self.inputs_after
        lines = [f"# {name} = {src}" for name, src in inputs.items()]
        lines += [e.before_line if side == "before" else e.after_line
                  for e in self.entries if (e.before if side == "before" else e.after) is not None]
        returned = self.returns[0 if side == "before" else 1]
        lines.append(f"return {', '.join(returned)}" if returned else "return")
        return "\n".join(lines)

    def unified(self) -> str:
        """The before → after code as a unified diff; each hunk header names the rules behind it."""
        out = [f"--- {self.path or '(model)'} (before)", f"+++ {self.path or '(model)'} (after)"]
        for hunk in self.hunks:
            rules = f"  {'; '.join(hunk['rules'])}" if hunk["rules"] else ""
            out.append(f"@@ -{hunk['before'][0]},{hunk['before'][1]} +{hunk['after'][0]},{hunk['after'][1]} @@{rules}")
            out += [sign + text for sign, text in hunk["lines"]]
        return "\n".join(out)


# ------------------------------------------------------------------------------------ matching


class _Matcher:
    """Matches after call nodes to before ones (see the module docstring); ``ref`` then names any
    input the same way on both sides."""

    def __init__(self, before: _Side, after: _Side):
        self.before, self.after = before, after
        self.matched: dict[str, str] = {}   # after → before
        self.back: dict[str, str] = {}      # before → after
        self._pairing = False               # whether unpaired reads may stand for each other yet
        self._match()
        self.local: dict[str, dict[str, str]] = {}   # unit → its matched pairs (after → before)
        for a, b in self.matched.items():
            self.local.setdefault(after.unit[a], {})[a] = b

    def ref(self, after_side: bool, src: str, consumer: str) -> tuple:
        """How input `src` of a node of unit `consumer` is identified across the graphs: a tensor by
        its path, a node of the same unit by its match, a value from another unit by the before node
        it stands for — itself when matched and read before too, else the before value it replaces
        (the k-th unpaired read of that unit by this one, before and after)."""
        side = self.after if after_side else self.before
        node = side.nodes[src]
        if node.kind != "call":
            return "tensor", node.kind, side.ttarget[src]
        unit = side.unit[src]
        if unit == consumer:
            return "node", (self.matched.get(src) if after_side else src)
        if not after_side:
            return "out", unit, src
        was = self.before.reads.get((consumer, unit), [])
        b = self.matched.get(src)
        if b is not None and b in was:
            return "out", unit, b
        if not self._pairing:
            return "out", unit, None
        now = self.after.reads[consumer, unit]
        mine = [x for x in now if self.matched.get(x) not in was]
        theirs = [x for x in was if self.back.get(x) not in now]
        k = mine.index(src)
        return ("out", unit, theirs[k]) if k < len(theirs) else ("out", unit, None)

    def _key(self, after_side: bool, name: str) -> tuple:
        side = self.after if after_side else self.before
        n = side.nodes[name]
        unit = side.unit[name]
        refs = tuple((pos, self.ref(after_side, src, unit)) for pos, src in side.refs[name])
        return unit, side.tpath[name], n.target, *side.literals[name], refs

    def _pair(self, a: str, b: str) -> None:
        self.matched[a] = b
        self.back[b] = a

    def _match(self) -> None:
        exact: dict[tuple, list[str]] = {}
        loose: dict[tuple, list[str]] = {}
        keys_before = {}
        for name in self.before.unit:
            k = keys_before[name] = self._key(False, name)
            exact.setdefault(k, []).append(name)
            loose.setdefault(k[:3], []).append(name)

        def take(name: str, key: tuple) -> bool:
            for candidate in exact.get(key, ()):
                if candidate not in self.back:
                    self._pair(name, candidate)
                    return True
            return False

        pending = [name for name in self.after.unit if not take(name, self._key(True, name))]
        # Pairing the reads nobody matched is safe only once the first pass has matched what it can
        # (in the first pass a source's own match may still be ahead); the rest goes in graph order,
        # so a node's sources are settled before it.
        self._pairing = True
        for name in pending:
            key = self._key(True, name)
            if take(name, key):
                continue
            mine = dict(key[5])
            best, best_score = None, 0
            for candidate in loose.get(key[:3], ()):
                if candidate in self.back:
                    continue
                theirs = keys_before[candidate]
                shared = sum(1 for pos, ref in theirs[5] if mine.get(pos) == ref and ref[-1] is not None)
                if not shared:
                    continue
                score = shared + (theirs[3:5] == key[3:5])
                if score > best_score:
                    best, best_score = candidate, score
            if best is not None:
                self._pair(name, best)


# ------------------------------------------------------------------------------------ rendering


def _merge(before_names: list[str], after_names: list[str], matched: dict[str, str]) -> list[tuple[str | None, str | None]]:
    """Both sides in one order: after's order, with each removed node placed after the node that
    preceded it before (so a removed line sits where it used to be)."""
    back = {b: a for a, b in matched.items()}
    pos = {b: i for i, b in enumerate(before_names)}
    out: list[tuple[str | None, str | None]] = []
    i = 0
    done: set[str] = set()
    for a in after_names:
        b = matched.get(a)
        if b is not None:
            while i < pos[b]:
                x = before_names[i]
                if x not in back and x not in done:
                    out.append((x, None))
                    done.add(x)
                i += 1
            out.append((b, a))
        else:
            out.append((None, a))
    out += [(x, None) for x in before_names if x not in back and x not in done]
    return out


def _short(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if value == 9223372036854775807:
        return "END"   # torch's "to the end" for slices
    return str(value) if not isinstance(value, str) or value.startswith("torch.") else repr(value)


class _Namer:
    def __init__(self):
        self.used: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        base = base.replace(".", "_") or "x"
        n = self.used.get(base, 0)
        self.used[base] = n + 1
        return base if n == 0 else f"{base}_{n}"


def unit_diff(path: str, m: _Matcher,
              rules_of: Callable[[GraphNode, str, str], tuple[str, ...]]) -> UnitDiff:
    """One unit's entries, code lines, edges and hunks."""
    before, after = m.before, m.after
    b_names, a_names = before.units.get(path, []), after.units.get(path, [])
    local = m.local.get(path, {})
    namer = _Namer()
    entries: list[Entry] = []
    name_b: dict[str, str] = {}
    name_a: dict[str, str] = {}
    for b, a in _merge(b_names, a_names, local):
        node = after.nodes[a] if a else before.nodes[b]
        name = namer(node.op)
        if b:
            name_b[b] = name
        if a:
            name_a[a] = name
        entries.append(Entry(name, before.nodes[b] if b else None, after.nodes[a] if a else None, ""))

    inputs: list[dict[str, str]] = [{}, {}]
    names_shown: list[dict[str, str]] = [{}, {}]
    input_names: dict[tuple, str] = {}

    def display(side: _Side, names: dict[str, str], i: int, src: str) -> tuple[str, str]:
        """(name in the code, name in edge sets) for input `src` of a node of this unit."""
        node = side.nodes[src]
        if node.kind == "call" and side.unit[src] == path:
            return names[src], names[src]
        if node.kind == "input":
            inputs[i][src] = "model input"
            return src, src
        if node.kind != "call":
            shown = _relative(node.target, path)
            edge_name = _relative(side.ttarget[src], path)
            names_shown[i][edge_name] = shown
            return shown, edge_name
        key = m.ref(i == 1, src, path)
        if key[-1] is None:
            key = (*key, src)   # a new value: its own input
        if key not in input_names:
            unit = side.unit[src]
            input_names[key] = namer(unit.rpartition(".")[2] if unit else "model")
        shown = input_names[key]
        inputs[i][shown] = f"{side.unit[src] or '(model)'}: {node.op}"
        return shown, shown

    def line(side: _Side, names: dict[str, str], i: int, node: GraphNode, edges: set) -> str:
        def render(value, where: str) -> str:
            if isinstance(value, Ref):
                shown, edge_name = display(side, names, i, value.name)
                edges.add((edge_name, names[node.name], where))
                return shown
            if isinstance(value, tuple):
                return "[" + ", ".join(render(v, f"{where}.{k}") for k, v in enumerate(value)) + "]"
            return _short(value)

        args = [render(v, str(k)) for k, v in enumerate(node.args)]
        args += [f"{k}={render(v, k)}" for k, v in node.kwargs]
        via = f"  # in {side.via[node.name]}" if side.via[node.name] else ""
        return f"{names[node.name]} = {node.target}({', '.join(args)}){via}"

    edges: list[set] = [set(), set()]
    for e in entries:
        if e.before is not None:
            e.before_line = line(before, name_b, 0, e.before, edges[0])
        if e.after is not None:
            e.after_line = line(after, name_a, 1, e.after, edges[1])
    returns = ([name_b[n] for n in before.outputs.get(path, [])], [name_a[n] for n in after.outputs.get(path, [])])
    for i, names in enumerate(returns):
        edges[i].update((n, "return", str(k)) for k, n in enumerate(names))

    into: list[dict[str, set]] = [{}, {}]
    for i in (0, 1):
        for edge in edges[i]:
            into[i].setdefault(edge[1], set()).add(edge)
    for e in entries:
        if e.before is None:
            e.status = "added"
        elif e.after is None:
            e.status = "removed"
        else:
            if into[0].get(e.name) != into[1].get(e.name):
                e.status = "rewired"
            elif before.literals[e.before.name] != after.literals[e.after.name]:
                e.status = "changed"
            else:
                e.status = "same"
        if e.status != "same":
            side, node = (after, e.after) if e.after is not None else (before, e.before)
            e.rules = rules_of(node, side.via[node.name], side.owner[node.name])
    unit = UnitDiff(path, entries, inputs[0], inputs[1], returns, (names_shown[0], names_shown[1]), edges[0], edges[1])
    unit.hunks = _hunks(unit)
    unit.rules = tuple(dict.fromkeys(r for h in unit.hunks for r in h["rules"]))
    return unit


def _relative(target: str, path: str) -> str:
    if not path:
        return f"self.{target}"
    return f"self.{target[len(path) + 1:]}" if target.startswith(path + ".") else target


def _hunks(unit: UnitDiff) -> list[dict]:
    """``diff -u`` hunks over the rendered body (inputs as comments, nodes, return)."""
    rows: list[tuple[str, str, tuple[str, ...]]] = []   # (sign, text, rules)
    for name, src in unit.inputs_before.items():
        if unit.inputs_after.get(name) != src:
            rows.append(("-", f"# {name} = {src}", ()))
    for name, src in unit.inputs_after.items():
        rows.append((" " if unit.inputs_before.get(name) == src else "+", f"# {name} = {src}", ()))
    for e in unit.entries:
        if e.status == "same":
            rows.append((" ", e.after_line, ()))
        else:
            if e.before is not None:
                rows.append(("-", e.before_line, e.rules))
            if e.after is not None:
                rows.append(("+", e.after_line, e.rules))
    ret_b, ret_a = (f"return {', '.join(r)}" if r else "return" for r in unit.returns)
    rows += [(" ", ret_a, ())] if ret_b == ret_a else [("-", ret_b, ()), ("+", ret_a, ())]

    changed = [i for i, (sign, _, _) in enumerate(rows) if sign != " "]
    hunks: list[dict] = []
    spans: list[list[int]] = []
    for i in changed:
        if spans and i - spans[-1][1] <= 2 * CONTEXT + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    line_b = line_a = 0
    numbers = []   # (before line number, after line number) at each row, 1-based, before the row
    for sign, _, _ in rows:
        numbers.append((line_b + 1, line_a + 1))
        line_b += sign != "+"
        line_a += sign != "-"
    for start, end in spans:
        lo, hi = max(0, start - CONTEXT), min(len(rows), end + CONTEXT + 1)
        chunk = rows[lo:hi]
        rules = tuple(dict.fromkeys(r for _, _, rs in chunk for r in rs))
        hunks.append({"before": (numbers[lo][0], sum(1 for s, _, _ in chunk if s != "+")),
                      "after": (numbers[lo][1], sum(1 for s, _, _ in chunk if s != "-")),
                      "rules": rules, "lines": [(s, t) for s, t, _ in chunk]})
    return hunks


def structural_diff(before: GraphSnapshot, after: GraphSnapshot,
                    unit_before: Callable[[GraphNode], tuple[str, str, str]],
                    unit_after: Callable[[GraphNode], tuple[str, str, str]],
                    translate: Callable[[str], str], rules_of: Callable[[GraphNode, str, str], tuple[str, ...]],
                    order: Callable[[str], tuple]) -> list[UnitDiff]:
    """Every unit's :class:`UnitDiff` (changed or not), in `order`."""
    m = _Matcher(_side(before, unit_before, lambda p: p), _side(after, unit_after, translate))
    units = sorted(set(m.before.units) | set(m.after.units), key=order)
    return [unit_diff(u, m, rules_of) for u in units]
