"""AST + model → :class:`Plan`: concrete steps (transform, validated parameters, module paths).

Resolution rules:

* Each call in a rule's expression is one :class:`Step`; it attaches to every anchor of its kind
  inside the regions the rule's selectors name. A step with no anchor there is an error that names
  the nearest candidates; all semantic errors of a spec are collected and raised together.
* A call is identified by its position in its rule (the n-th call, see :func:`shape`), never by
  its AST node: a ``let`` constant used twice is one node but two calls, as if written out.
* Anchor kinds in one expression: each kind's composition is the expression *projected* onto that
  kind's calls. ``a + b`` across kinds applies each at its own anchors, in written order (as
  ``rope(…) + window(…)`` does); ``a | b`` sums contributions at one anchor, so a ``|`` group whose
  calls have different anchor kinds is a :class:`SpecError` at the group naming the kinds.
* Linear-anchored steps are composed per layer into a tree (``("seq", …)``, ``("par", …)``, step
  index): the rule's linear projection pruned to the steps that attach there; rules on the same
  layer compose in rule order. The same transform twice on one anchor is a conflict reported
  with both spans. A transform that replaces the layer (quantize) must be innermost.
* :func:`check` holds every rule check that needs no model (names, arguments, composition, an
  empty spec); :func:`build_plan` runs the same function, so ``surgery check`` and planning agree.
* Planning works on a meta-device model: no weights are read, so it takes seconds for any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union, get_args

from pydantic import ValidationError
from torch import nn

from surgery.arch import Architecture, detect, no_role_map
from surgery.arch.select import Region, RoleIndex, Site, resolve
from surgery.errors import ModelError, SpecError, SpecErrors, Span, SurgeryError, did_you_mean
from surgery.layers import is_linear
from surgery.syntax import ast
from surgery.transforms.registry import Anchor, Params, Target, TransformSpec, lookup

Tree = Union[int, tuple]  # step index | ("seq", [Tree…]) | ("par", [Tree…])


@dataclass(frozen=True)
class Step:
    index: int
    rule: int
    transform: str
    params: Params
    targets: tuple[Target, ...]
    span: Span

    @property
    def spec(self) -> TransformSpec:
        return lookup(self.transform)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return f"{self.transform}({args})"


@dataclass
class Counts:
    total: int = 0
    trainable: int = 0
    added: int = 0


@dataclass
class Plan:
    spec: ast.Spec
    arch: str
    steps: list[Step]
    linear: dict[str, Tree]
    counts: Counts = field(default_factory=Counts)
    base_counts: Counts = field(default_factory=Counts)

    def restricted(self, keep: set[int]) -> "Plan":
        """The same plan with only the steps in `keep` (indices unchanged, so seeds match)."""
        linear = {}
        for path, tree in self.linear.items():
            pruned = prune_tree(tree, keep)
            if pruned is not None:
                linear[path] = pruned
        return Plan(self.spec, self.arch, [s for s in self.steps if s.index in keep], linear)

    @property
    def freezes_base(self) -> bool:
        return any(getattr(s.spec.cls, "freezes_base", False) for s in self.steps)

    def to_json(self) -> dict:
        return {
            "arch": self.arch,
            "steps": [
                {"index": s.index, "transform": s.transform, "params": s.params.model_dump(mode="json"),
                 "targets": [t.path for t in s.targets],
                 "at": f"{s.span.file}:{s.span.line}:{s.span.column}"}
                for s in self.steps
            ],
            "counts": vars(self.counts),
            "base_counts": vars(self.base_counts),
        }


def prune_tree(tree: Tree, keep: set[int]) -> Tree | None:
    if isinstance(tree, int):
        return tree if tree in keep else None
    kind, items = tree
    items = [p for p in (prune_tree(t, keep) for t in items) if p is not None]
    if not items:
        return None
    return items[0] if len(items) == 1 else (kind, items)


# ----------------------------------------------------------------------------------- arguments


def _value(expr: ast.Expr) -> Any:
    if isinstance(expr, ast.Literal):
        return expr.value
    if isinstance(expr, ast.ListValue):
        return tuple(_value(e) for e in expr.items)  # a tuple: strict validation takes no list for it
    if isinstance(expr, ast.Call) and not expr.has_parens and not expr.args:
        return expr.name  # a bare word: an enum choice
    raise SpecError("expected a value (a number, string, word or list), not an expression", expr.span)


def validate_params(spec: TransformSpec, call: ast.Call) -> Params:
    """The call's arguments as the transform's parameter model; errors point at the argument."""
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    fields = list(spec.params.model_fields)
    positional_seen = 0
    for arg in call.args:
        if arg.key is None:
            if positional_seen >= len(spec.positional):
                allowed = ", ".join(spec.positional) or "none"
                raise SpecError(
                    f"{spec.name}() takes {len(spec.positional)} positional argument(s) ({allowed}); "
                    f"name this one, e.g. {next((f for f in fields if f not in values), 'key')}=…",
                    arg.span,
                )
            key = spec.positional[positional_seen]
            positional_seen += 1
        else:
            key = arg.key
            if key not in fields:
                raise SpecError(f"{spec.name}() has no argument {key!r}{did_you_mean(key, fields)}", arg.span)
        if key in values:
            raise SpecError(f"argument {key!r} is given twice", arg.span)
        values[key] = _value(arg.value)
        spans[key] = arg.span
    try:
        # Strict: a spec's values are typed, so "16" is not an int and true is not a float.
        return spec.params.model_validate(values, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = f"{spec.name}() needs argument {key!r}"
        elif key is not None:
            message = f"{spec.name}() argument {key!r}: {message}"
            if err["type"] == "literal_error" and isinstance(err.get("input"), str):  # a misspelt choice
                choices = [str(c) for c in get_args(spec.params.model_fields[key].annotation)]
                near = did_you_mean(err["input"], choices)
                message += near if near.startswith(" (did you mean") else ""
        raise SpecError(message, spans.get(key, call.span)) from None


# ------------------------------------------------------------------------------------- anchors


def _within(path: str, region_path: str) -> bool:
    return region_path == "" or path == region_path or path.startswith(region_path + ".")


def find_targets(spec: TransformSpec, params: Params, regions: list[Region], index: RoleIndex) -> list[Target]:
    sites = [s for r in regions for s in r.sites]
    impl = spec.instance()
    targets: list[Target] = []
    if spec.anchor is Anchor.LINEAR:
        heads = index.head_paths
        for path, module in index.modules.items():
            if not is_linear(module):
                continue
            if not any(_within(path, s.path) for s in sites):
                continue
            if path in heads and path not in {s.path for s in sites}:
                continue  # "all linear layers" never includes the output head unless named
            site = index.site(path)
            targets.append(Target(path, site.role, site.layer))
    elif spec.anchor is Anchor.ATTENTION:
        for i in range(index.num_layers):
            for path in index.layer_role_paths("attn", i):
                if any(_within(path, s.path) for s in sites):
                    targets.append(Target(path, "attn", i))
    elif spec.anchor is Anchor.ROTARY:
        rotary = index.model_roles.get("rotary")
        attn = {p for i in range(index.num_layers) for p in index.layer_role_paths("attn", i)}
        covered = {p for p in attn if any(_within(p, s.path) for s in sites)}
        if rotary and (covered or any(_within(rotary[0], s.path) for s in sites)):
            if covered and covered != attn:
                raise SpecError(
                    f"{spec.name} rewrites the rotary embedding that all {index.num_layers} layers share; "
                    "select every layer's attention (e.g. 'attn'), not a subset",
                    regions[0].selector.span,
                )
            targets.append(Target(rotary[0], "rotary"))
    elif spec.anchor is Anchor.EMBEDDINGS:
        embed = index.model_roles.get("embed", [])
        targets += [Target(p, "embed") for p in embed if any(_within(p, s.path) for s in sites)]
    elif spec.anchor is Anchor.PARAMETERS:
        targets += [Target(s.path, s.role, s.layer) for s in sites]
    if hasattr(impl, "accepts"):
        kept = []
        for target in targets:
            option = impl.accepts(params, target, index.modules[target.path])
            if isinstance(option, str):
                kept.append(Target(target.path, target.role, target.layer, option))
            elif option:
                kept.append(target)
        targets = kept
    return targets


def _candidates(spec: TransformSpec, params: Params, index: RoleIndex) -> str:
    """Where in this model the transform *would* attach (its anchors over the whole model)."""
    try:
        anywhere = find_targets(spec, params, [Region(None, (Site("", "model"),))], index)
    except SurgeryError:
        anywhere = []
    roles = sorted({t.role for t in anywhere if t.role})
    if roles:
        return f"; it attaches to {spec.anchor.value} anchors, e.g. " + ", ".join(roles[:6])
    if anywhere:  # anchors without roles: a model without a role map
        return f"; it attaches to {spec.anchor.value} anchors, e.g. " + ", ".join(repr(t.path) for t in anywhere[:3])
    if not index.arch.mapped:
        # Attention blocks, the rotary embedding, the input embeddings, IA3's k/v/down: all found by role.
        return f"; {spec.name} finds its {spec.anchor.value} anchors by role, and {no_role_map(index.arch)}"
    return f"; this {index.arch.name} model has no {spec.anchor.value} anchor for {spec.name} anywhere"


# ------------------------------------------------------------------------- model-free checks


def shape(expr: ast.Expr, calls: list[ast.Call]) -> Tree:
    """`expr` as a composition tree over call *positions*, appending its calls to `calls` in order.

    Identity is positional (the n-th call of the rule), never the node object: a `let` constant
    used twice is one shared node, but two calls, exactly as if it had been written out twice.
    """
    if isinstance(expr, ast.Call):
        calls.append(expr)
        return len(calls) - 1
    if isinstance(expr, (ast.Seq, ast.Par)):
        return ("seq" if isinstance(expr, ast.Seq) else "par", [shape(e, calls) for e in expr.items])
    raise SpecError("expected a transform, e.g. lora(r=16), not a value", expr.span)


@dataclass(frozen=True)
class Leaf:
    """One call of a rule with its transform and validated parameters."""

    call: ast.Call
    spec: TransformSpec
    params: Params


@dataclass
class CheckedRule:
    """What a rule says without a model: its calls in written order, validated, and its tree.

    ``tree`` is over call positions (see :func:`shape`), None when the expression is not a
    transform; ``leaves`` maps a position to its validated call (calls with an error are absent).
    """

    rule: ast.Rule
    calls: list[ast.Call] = field(default_factory=list)
    tree: Tree | None = None
    leaves: dict[int, Leaf] = field(default_factory=dict)
    errors: list[SurgeryError] = field(default_factory=list)


def _mixed_parallel(expr: ast.Expr, tree: Tree, leaves: dict[int, Leaf]) -> tuple[set[Anchor], list[SpecError]]:
    """The anchor kinds under `expr`, and an error for each innermost ``|`` whose calls mix kinds."""
    if isinstance(tree, int):
        leaf = leaves.get(tree)
        return ({leaf.spec.anchor} if leaf else set()), []
    kinds: set[Anchor] = set()
    errors: list[SpecError] = []
    by_kind: dict[Anchor, list[str]] = {}
    for item, sub in zip(expr.items, tree[1]):
        item_kinds, item_errors = _mixed_parallel(item, sub, leaves)
        kinds |= item_kinds
        errors += item_errors
    if tree[0] == "par" and len(kinds) > 1 and not errors:
        for position in _leaves_of(tree):
            if position in leaves:
                by_kind.setdefault(leaves[position].spec.anchor, []).append(leaves[position].call.name)
        which = "; ".join(f"{kind.value}: {', '.join(dict.fromkeys(names))}" for kind, names in by_kind.items())
        errors.append(SpecError(
            f"'|' sums its branches' contributions at one anchor, but these branches attach to "
            f"different anchor kinds ({which}); use '+' to apply each at its own anchors",
            expr.span,
        ))
    return kinds, errors


def check_rule(rule: ast.Rule) -> CheckedRule:
    """Every check of `rule` that needs no model: transform names, arguments, composition."""
    checked = CheckedRule(rule)
    try:
        checked.tree = shape(rule.expr, checked.calls)
    except SurgeryError as e:
        checked.errors.append(e)
        return checked
    for position, call in enumerate(checked.calls):
        try:
            tspec = lookup(call.name, call.span)
            checked.leaves[position] = Leaf(call, tspec, validate_params(tspec, call))
        except SurgeryError as e:
            checked.errors.append(e)
    # `|` runs at one anchor: its calls must share an anchor kind. `+` across kinds applies each
    # at its own anchors, in order; each kind's tree is the expression projected onto its calls.
    checked.errors += _mixed_parallel(rule.expr, checked.tree, checked.leaves)[1]
    # A transform that replaces the layer must be innermost in the rule's linear tree.
    linear = prune_tree(checked.tree, {i for i, leaf in checked.leaves.items() if leaf.spec.anchor is Anchor.LINEAR})
    for position, leaf in checked.leaves.items():
        if hasattr(leaf.spec.cls, "replace_base") and not _is_innermost(linear, position):
            checked.errors.append(SpecError(
                f"{leaf.call.name} replaces the layer itself, so it must come first in a sequence "
                f"and not be a branch of '|' (e.g. {leaf.call.name}(…) + lora(…))",
                leaf.call.span,
            ))
    return checked


def _require_rules(spec: ast.Spec) -> None:
    if not spec.rules:
        raise SpecError("the spec has no rules", Span(spec.file, 1, 1, 1, 2, spec.source))


def check(spec: ast.Spec) -> list[CheckedRule]:
    """Every check :func:`build_plan` makes that needs no model; raises :class:`SpecErrors`.

    ``surgery check`` runs exactly this, so a spec it accepts fails planning only for reasons
    that depend on the model (selectors, anchors, conflicts between rules).
    """
    _require_rules(spec)
    checked = [check_rule(rule) for rule in spec.rules]
    errors = [e for c in checked for e in c.errors]
    if errors:
        raise SpecErrors(errors)
    return checked


# ---------------------------------------------------------------------------------------- plan


def _relabel(tree: Tree, step_at: list[int | None]) -> Tree | None:
    """A position tree as a tree of step indices, without the calls that became no step."""
    if isinstance(tree, int):
        return step_at[tree]
    kind, items = tree
    items = [t for t in (_relabel(t, step_at) for t in items) if t is not None]
    if not items:
        return None
    return items[0] if len(items) == 1 else (kind, items)


def _is_innermost(tree: Tree | None, i: int) -> bool:
    """Whether step `i` is applied first and alone: the head of (nested) sequences, never a branch."""
    while isinstance(tree, tuple):
        kind, items = tree
        if kind != "seq":
            return False
        tree = items[0]
    return tree == i


def _leaves_of(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else [i for t in tree[1] for i in _leaves_of(t)]


def _refuse_surgered(model: nn.Module) -> None:
    """A spec applies to a base model: planning over a surgered one would adapt the adapters."""
    for path, module in model.named_modules():
        # Our own module classes (wrappers, rotary, prompts) or settings a transform attached.
        if type(module).__module__.startswith("surgery.") or any(k.startswith("surgery_") for k in vars(module)):
            raise ModelError(
                f"this model has already been surgered ({path or 'the model'} is changed); apply one "
                "spec to the base model (rules compose), or load the base again"
            )


# Modules that wrap the model a spec is written for, and what to do instead.
WRAPPERS = {
    "PeftModel": "it carries PEFT adapters: plan on model.get_base_model() (or merge them first with "
                 "merge_and_unload())",
    "OptimizedModule": "it was compiled by torch.compile: plan on the original module (model._orig_mod), "
                       "then compile the result",
}


def _refuse_wrapped(model: nn.Module, index: RoleIndex) -> None:
    """A mapped model whose layers are not where its role map says is usually wrapped: say so."""
    if not index.arch.mapped or index.num_layers:
        return
    inner = next((path for path, module in model.named_modules()
                  if path and getattr(getattr(module, "config", None), "model_type", None) in index.arch.model_types
                  and RoleIndex(module, index.arch).num_layers), None)
    if inner is None:
        return
    why = next((WRAPPERS[c.__name__] for c in type(model).__mro__ if c.__name__ in WRAPPERS),
               "plan on that module")
    raise ModelError(f"this {index.arch.name} model is wrapped in {type(model).__name__} (the model itself is at "
                     f"{inner!r}, so its roles are not where the role map says); {why}")


def build_plan(spec: ast.Spec, model: nn.Module, arch: Architecture | None = None) -> Plan:
    """Resolve `spec` against `model` (meta-device is fine). Raises :class:`SpecErrors`."""
    arch = arch or detect(model)
    _refuse_surgered(model)
    index = RoleIndex(model, arch)
    _refuse_wrapped(model, index)
    errors: list[SurgeryError] = []
    steps: list[Step] = []
    rule_trees: list[tuple[Tree | None, list[int]]] = []  # each rule's tree over step indices, its steps
    _require_rules(spec)
    for r, checked in enumerate(check_rule(rule) for rule in spec.rules):
        regions = []
        for selector in checked.rule.selectors:
            try:
                regions.append(resolve(selector, index))
            except SurgeryError as e:
                errors.append(e)
        errors += checked.errors
        if checked.tree is None:
            continue
        ids = []
        step_at: list[int | None] = [None] * len(checked.calls)
        for position, leaf in checked.leaves.items():
            call, tspec, params = leaf.call, leaf.spec, leaf.params
            if not regions:
                continue
            try:
                targets = find_targets(tspec, params, regions, index)
                if not targets:
                    where = ", ".join(str(r.selector) for r in regions)
                    raise SpecError(f"{call.name} finds no anchor in {where}{_candidates(tspec, params, index)}", call.span)
            except SurgeryError as e:
                if e.span is None:  # e.g. raised by a transform's accepts(): point at the call
                    e.span = call.span
                errors.append(e)
                continue
            step = Step(len(steps), r, call.name, params, tuple(targets), call.span)
            step_at[position] = step.index
            steps.append(step)
            ids.append(step.index)
        rule_trees.append((_relabel(checked.tree, step_at), ids))
    if errors:
        raise SpecErrors(errors)

    # Conflicts: the same transform twice on one anchor.
    seen: dict[tuple[str, str], Step] = {}
    for step in steps:
        for t in step.targets:
            other = seen.setdefault((step.transform, t.path), step)
            if other is not step:
                errors.append(SpecError(
                    f"{step.transform} is applied twice to {t.path}; the other is at "
                    f"{other.span.file}:{other.span.line}:{other.span.column}\n{other.span.render()}",
                    step.span,
                ))
                break
    # Linear composition trees.
    linear: dict[str, Tree] = {}
    targets_of = {s.index: {t.path for t in s.targets} for s in steps if s.spec.anchor is Anchor.LINEAR}
    for rule_tree, ids in rule_trees:
        paths = sorted({p for i in ids if i in targets_of for p in targets_of[i]})
        projected: dict[frozenset[int], Tree | None] = {}  # layers with the same steps share a tree
        for path in paths:
            keep = frozenset(i for i in ids if path in targets_of.get(i, ()))
            if keep not in projected:
                projected[keep] = prune_tree(rule_tree, set(keep))
            tree = projected[keep]
            if tree is None:
                continue
            if path in linear:
                prev = linear[path]
                prev_items = prev[1] if isinstance(prev, tuple) and prev[0] == "seq" else [prev]
                linear[path] = ("seq", [*prev_items, tree])
            else:
                linear[path] = tree
    misplaced: set[int] = set()  # report each misplaced step once, not once per layer
    for path, tree in linear.items():
        for i in _leaves_of(tree):
            if i in misplaced:
                break
            if hasattr(steps[i].spec.cls, "replace_base") and not _is_innermost(tree, i):
                errors.append(SpecError(
                    f"{steps[i].transform} replaces the layer itself, so it must come first in a sequence "
                    f"(e.g. {steps[i].transform}(…) + lora(…)); at {path}",
                    steps[i].span,
                ))
                misplaced.add(i)
                break
    if errors:
        raise SpecErrors(list({str(e): e for e in errors}.values()))
    return Plan(spec, arch.name, steps, linear)
