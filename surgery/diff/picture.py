"""A unit's data flow before and after as inline SVG: a layered DAG laid out here, no script, no network.

Layout (Sugiyama-style, one sweep, good enough for a module's few hundred nodes):

* rank: a node's inputs (values from other units, parameters) are rank 0; a node is one below its
  deepest input; ``return`` is below everything.
* order within a rank: by the mean position of a node's inputs in the ranks above (barycentre), ties
  in code order, so that branches (LoRA next to the base projection) sit side by side.
* edges are cubic curves from the bottom of the source to the top of the target.

Marking: added nodes and edges green, removed ones red, dashed and struck through, rewired or changed
nodes amber; unchanged ones grey. Each node carries its code line as an SVG ``<title>`` (a tooltip).
"""

from __future__ import annotations

import html
import itertools

from surgery.diff.graph import UnitDiff

ROW = 46          # vertical distance between ranks
BOX = 24          # node height
GAP = 14          # horizontal gap between nodes
CHAR = 7.0        # width of one character of the 12px monospace label
MAX_LABEL = 30

_ids = itertools.count()


def _label(entry_name: str, node) -> str:
    """``lt_1(·, 4)``: the node's name and its literal arguments (inputs as ·); just the name when all
    arguments are inputs."""
    from surgery.diff.graph import _literals, _short

    lits = [_short(_literals(a)) for a in node.args] + [f"{k}={_short(_literals(v))}" for k, v in node.kwargs]
    if all(x == "·" or set(x) <= set("[·, ]") for x in lits):
        return entry_name
    text = f"{entry_name}({', '.join(lits)})".replace("'", "")
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL - 1] + "…"


def unit_svg(unit: UnitDiff, side: str) -> str:
    """The unit's data flow on one side (``before`` or ``after``), changes marked against the other."""
    mine, theirs = (unit.edges_before, unit.edges_after) if side == "before" else (unit.edges_after, unit.edges_before)
    entries = [e for e in unit.entries if (e.before if side == "before" else e.after) is not None]
    status = {e.name: e.status for e in entries}
    label = {e.name: _label(e.name, e.before if side == "before" else e.after) for e in entries}
    title = {e.name: e.before_line if side == "before" else e.after_line for e in entries}
    returned = unit.returns[0 if side == "before" else 1]
    status["return"] = "same" if unit.returns[0] == unit.returns[1] else "rewired"
    label["return"] = title["return"] = "return"

    # Sources: whatever an edge reads that is not a node of this unit.
    # Edges are sets: every walk over them goes in sorted order, so the picture does not depend on the
    # process's string hashes (PYTHONHASHSEED) and the same diff renders the same page every run.
    edges = sorted(mine)
    sources = list(dict.fromkeys(s for s, _, _ in sorted(edges, key=lambda e: _pos(entries, e[1])) if s not in status))
    inputs = unit.inputs_before if side == "before" else unit.inputs_after
    shown = unit.shown[0 if side == "before" else 1]
    for s in sources:
        status[s] = "source"
        name = shown.get(s, s)
        # A parameter by its last two path segments (``lora_A.weight``): the tooltip has the rest.
        short = ".".join(name.removeprefix("self.").split(".")[-2:])
        label[s] = short if len(short) <= MAX_LABEL else "…" + short[-(MAX_LABEL - 1):]
        title[s] = f"{name} = {inputs[s]}" if s in inputs else name
    names = sources + [e.name for e in entries] + (["return"] if returned or unit.returns != ([], []) else [])
    parents: dict[str, list[str]] = {n: [] for n in names}
    for s, d, _ in edges:
        if d in parents and s in parents:
            parents[d].append(s)

    rank: dict[str, int] = {s: 0 for s in sources}

    def depth(n: str) -> int:
        # The merged code order need not be topological for the before side: resolve by walking up.
        todo = [n]
        while todo:
            top = todo[-1]
            missing = [p for p in parents[top] if p not in rank]
            if missing:
                todo += missing
                continue
            todo.pop()
            rank[top] = 1 + max((rank[p] for p in parents[top]), default=0)
        return rank[n]

    for n in names:
        if n not in rank:
            depth(n)
    # An input, or a node that reads nothing (``arange``, ``zeros``), sits just above its first reader,
    # not at the top: short edges, branches side by side. Later ones first, so chains of them settle.
    for s in reversed([n for n in names if n != "return" and not parents[n]]):
        readers = [rank[d] for src, d, _ in edges if src == s and d in rank and d != s]
        rank[s] = max(0, min(readers, default=1) - 1)
    if "return" in rank:
        rank["return"] = max((r for n, r in rank.items() if n != "return"), default=-1) + 1
    ranks: dict[int, list[str]] = {}
    for n in names:
        ranks.setdefault(rank[n], []).append(n)
    # Rank by rank: order by the mean centre of a node's inputs (code order for ties), then place each
    # node under that centre, pushed right only as far as its left neighbour needs.
    width = {n: max(48.0, CHAR * len(label[n]) + 16) for n in names}
    x: dict[str, float] = {}
    code = {n: i for i, n in enumerate(names)}
    widest = 0.0
    for r in sorted(ranks):
        row = ranks[r]
        want = {n: (sum(x[p] + width[p] / 2 for p in parents[n] if p in x) / max(1, sum(p in x for p in parents[n]))
                    if any(p in x for p in parents[n]) else None) for n in row}
        # Sources (no placed input) go left to right in code order, ahead of their readers.
        row.sort(key=lambda n: (want[n] is not None, want[n] or 0.0, code[n]))
        cursor = GAP
        for n in row:
            target = want[n] - width[n] / 2 if want[n] is not None else cursor
            x[n] = max(cursor, target)
            cursor = x[n] + width[n] + GAP
        widest = max(widest, cursor)
    height = (max(ranks) + 1) * ROW + GAP if ranks else ROW
    uid = f"g{next(_ids)}"

    out = [f"<svg class='flow' data-side='{side}' data-unit='{html.escape(unit.path)}' "
           f"width='{widest:.0f}' height='{height:.0f}' viewBox='0 0 {widest:.0f} {height:.0f}'>",
           "<defs>" + "".join(
               f"<marker id='{uid}-{k}' viewBox='0 0 8 8' refX='7' refY='4' markerWidth='7' markerHeight='7' orient='auto'>"
               f"<path d='M0,0 L8,4 L0,8 z' fill='{c}'/></marker>" for k, c in _EDGE_COLOURS.items()) + "</defs>"]
    y = {n: GAP / 2 + rank[n] * ROW for n in names}
    for s, d, where in edges:
        if s not in x or d not in x:
            continue
        kind = "same" if (s, d, where) in theirs else ("removed" if side == "before" else "added")
        x1, y1 = x[s] + width[s] / 2, y[s] + BOX
        x2, y2 = x[d] + width[d] / 2, y[d]
        bend = max(12.0, (y2 - y1) / 2)
        dash = " stroke-dasharray='5 3'" if kind == "removed" else ""
        out.append(f"<path class='edge {kind}' d='M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} "
                   f"{x2:.1f},{y2:.1f}' fill='none' stroke='{_EDGE_COLOURS[kind]}' stroke-width='{1 if kind == 'same' else 2}'"
                   f"{dash} marker-end='url(#{uid}-{kind})'><title>{html.escape(f'{s} → {d} (argument {where})')}</title></path>")
    for n in names:
        kind = status[n]
        fill, stroke = _NODE_COLOURS[kind]
        strike = " text-decoration='line-through'" if kind == "removed" else ""
        rx = 12 if kind == "source" else 4
        out.append(f"<g class='node {kind}' data-name='{html.escape(n)}'><title>{html.escape(title[n])}</title>"
                   f"<rect x='{x[n]:.1f}' y='{y[n]:.1f}' width='{width[n]:.1f}' height='{BOX}' rx='{rx}' "
                   f"fill='{fill}' stroke='{stroke}' stroke-width='{1 if kind in ('same', 'source') else 2}'/>"
                   f"<text x='{x[n] + width[n] / 2:.1f}' y='{y[n] + BOX / 2 + 4:.1f}' text-anchor='middle'{strike}>"
                   f"{html.escape(label[n])}</text></g>")
    out.append("</svg>")
    return "".join(out)


def _pos(entries, name: str) -> int:
    for i, e in enumerate(entries):
        if e.name == name:
            return i
    return len(entries)


_EDGE_COLOURS = {"same": "#8c959f", "added": "#1a7f37", "removed": "#d1242f"}
_NODE_COLOURS = {"same": ("#f6f8fa", "#afb8c1"), "source": ("#ddf4ff", "#54aeff"),
                 "added": ("#dafbe1", "#1a7f37"), "removed": ("#ffebe9", "#d1242f"),
                 "rewired": ("#fff8c5", "#9a6700"), "changed": ("#fff8c5", "#9a6700")}


def pictures_html(groups: list[dict]) -> str:
    """One before | after picture per distinct change (a group of units that changed alike)."""
    if not groups:
        return ""
    parts = ["<h3>Data flow</h3><p class='note'>one picture per distinct change; "
             "<span class='k added'>added</span> <span class='k removed'>removed</span> "
             "<span class='k rewired'>rewired / changed</span> <span class='k source'>input</span></p>"]
    for g in groups:
        unit = g["unit"]
        parts.append(f"<section class='picture' data-unit='{html.escape(g['label'])}'>"
                     f"<h4>{html.escape(g['label'])} <span class='num'>{html.escape(unit.describe())}</span></h4>"
                     "<div class='sides'>"
                     f"<figure><figcaption>before</figcaption>{unit_svg(unit, 'before')}</figure>"
                     f"<figure><figcaption>after</figcaption>{unit_svg(unit, 'after')}</figure>"
                     "</div></section>")
    return "".join(parts)
