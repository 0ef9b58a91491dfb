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
* At the anchor kinds that wrap (:mod:`surgery.anchors`; today linear layers) the steps compose
  per target into a tree of :mod:`surgery.compose` nodes (``Seq``, ``Par``, ``Leaf(step)``): the
  rule's projection onto that kind, pruned to the steps that attach there; rules on the same target
  compose in rule order. The same transform twice on one anchor is a conflict reported with both
  spans. A transform that replaces the base (quantize) must be innermost.
* ``gate(…)`` and ``fuse(…)`` are combinators (:mod:`surgery.compose`): they parse and become
  nodes, and a combinator not yet supported is an error at its call (its operands are not checked).
  A gate scales contributions at linear, sublayer and attention (K/V prefix) anchors only
  (:func:`surgery.gating.rule_errors`).
  A combinator reads its own operands (``fuse``: a path string is ``trained("path")``) and refuses
  those it cannot combine; the trained adapters one block's fusions name do not conflict.
* A path argument resolves against the directory of the spec's file (the validation context
  carries it; a spec given as text has none, and its paths resolve against the working directory).
* :func:`check` holds every rule check that needs no model (names, arguments, composition, an
  empty spec); :func:`build_plan` runs the same function, so ``surgery check`` and planning agree.
* Planning works on a meta-device model: no weights are read, so it takes seconds for any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import ValidationError
from torch import nn

from surgery import anchors, gating
from surgery.arch import Architecture, detect, no_role_map
from surgery.arch.select import Region, RoleIndex, Site, resolve
from surgery.attention.program import plan_clashes
from surgery.compose import Fuse, Group, Leaf, Node, Par, Seq, called
from surgery.errors import ModelError, Span, SpecError, SpecErrors, SurgeryError, did_you_mean
from surgery.syntax import ast
from surgery.transforms.registry import Accepts, Anchor, Params, ReplacesBase, Target, TransformSpec, lookup


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
    trees: dict[Anchor, dict[str, Node]]  # at each wrapping anchor kind: target path → composition
    counts: Counts = field(default_factory=Counts)
    base_counts: Counts = field(default_factory=Counts)

    def restricted(self, keep: set[int]) -> "Plan":
        """The same plan with only the steps in `keep` (indices unchanged, so seeds match)."""
        trees: dict[Anchor, dict[str, Node]] = {}
        for anchor, by_path in self.trees.items():
            for path, tree in by_path.items():
                pruned = tree.prune(keep)
                if pruned is not None:
                    trees.setdefault(anchor, {})[path] = pruned
        return Plan(self.spec, self.arch, [s for s in self.steps if s.index in keep], trees)

    def described_steps(self) -> list[str]:
        """Each step as the plan applies it: its transform and parameters, inside ``gate(…)`` when a
        gate scales it (:func:`surgery.gating.described`)."""
        branches = gating.gated_branches(self)
        return [gating.described(step, branches) for step in self.steps]

    @property
    def linear(self) -> dict[str, Node]:
        """The composition at each wrapped linear layer."""
        return self.trees.get(Anchor.LINEAR, {})

    @property
    def freezes_base(self) -> bool:
        return any(s.spec.freezes_base for s in self.steps)

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
    return _validated(spec.name, spec.params, spec.positional, call.args, call.span)


def _validated(name: str, model: type[Params], positional: tuple[str, ...], args: tuple[ast.Arg, ...],
               span: Span) -> Params:
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    fields = list(model.model_fields)
    positional_seen = 0
    for arg in args:
        if arg.key is None:
            if positional_seen >= len(positional):
                allowed = ", ".join(positional) or "none"
                raise SpecError(
                    f"{name}() takes {len(positional)} positional argument(s) ({allowed}); "
                    f"name this one, e.g. {next((f for f in fields if f not in values), 'key')}=…",
                    arg.span,
                )
            key = positional[positional_seen]
            positional_seen += 1
        else:
            key = arg.key
            if key not in fields:
                raise SpecError(f"{name}() has no argument {key!r}{did_you_mean(key, fields)}", arg.span)
        if key in values:
            raise SpecError(f"argument {key!r} is given twice", arg.span)
        values[key] = _value(arg.value)
        spans[key] = arg.span
    try:
        # Strict: a spec's values are typed, so "16" is not an int and true is not a float. The
        # context names the spec's file, against whose directory a path argument resolves.
        return model.model_validate(values, strict=True, context={"spec_file": span.file})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = f"{name}() needs argument {key!r}"
        elif key is not None:
            message = f"{name}() argument {key!r}: {message}"
            if err["type"] == "literal_error" and isinstance(err.get("input"), str):  # a misspelt choice
                choices = [str(c) for c in get_args(model.model_fields[key].annotation)]
                near = did_you_mean(err["input"], choices)
                message += near if near.startswith(" (did you mean") else ""
        raise SpecError(message, spans.get(key, span)) from None


# ------------------------------------------------------------------------------------- anchors


def find_targets(spec: TransformSpec, params: Params, regions: list[Region], index: RoleIndex) -> list[Target]:
    """The anchors of `spec`'s kind inside `regions`, kept or dropped by the transform's ``accepts``."""
    targets = anchors.kind(spec.anchor).find(spec.name, regions, index)
    accepts = spec.offers(Accepts)
    if accepts is None:
        return targets
    kept = []
    for target in targets:
        option = accepts.accepts(params, target, index.modules[target.path])
        if isinstance(option, str):
            kept.append(Target(target.path, target.role, target.layer, option))
        elif option:
            kept.append(target)
    return kept


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


def shape(expr: ast.Expr, calls: list[ast.Call]) -> Node:
    """`expr` as a composition tree over call *positions*, appending its calls to `calls` in order.

    Identity is positional (the n-th call of the rule), never the node object: a `let` constant
    used twice is one shared node, but two calls, exactly as if it had been written out twice.
    A call of a combinator (``gate(…)``) is a node over its positional arguments; its keyword
    arguments are its parameters, validated here by its parameter model.
    """
    if isinstance(expr, ast.Call):
        combinator = called(expr.name)
        if combinator is None:
            calls.append(expr)
            return Leaf(len(calls) - 1)
        if not combinator.supported:  # refused as a whole by check_rule, whatever its arguments are
            n = len(calls)
            try:
                return combinator.node(tuple(shape(a.value, calls) for a in expr.args if a.key is None), expr.span)
            except SpecError:  # operands that are not transforms (values)
                del calls[n:]
                return combinator.node((), expr.span)
        operands = tuple(shape(combinator.node.operand(a.value), calls) for a in expr.args if a.key is None)
        keywords = tuple(a for a in expr.args if a.key is not None)
        return combinator.node(operands, expr.span, _validated(expr.name, combinator.params, (), keywords, expr.span))
    if isinstance(expr, ast.Seq):
        return Seq(tuple(shape(e, calls) for e in expr.items), expr.span)
    if isinstance(expr, ast.Par):
        return Par(tuple(shape(e, calls) for e in expr.items), expr.span)
    raise SpecError("expected a transform, e.g. lora(r=16), not a value", expr.span)


@dataclass(frozen=True)
class CheckedCall:
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
    tree: Node | None = None
    leaves: dict[int, CheckedCall] = field(default_factory=dict)
    errors: list[SurgeryError] = field(default_factory=list)


def _mixed_kinds(tree: Node, leaves: dict[int, CheckedCall]) -> tuple[set[Anchor], list[SpecError]]:
    """The anchor kinds under `tree`, and an error for each innermost one-anchor group (``|``) whose
    calls mix kinds."""
    if isinstance(tree, Leaf):
        leaf = leaves.get(tree.index)
        return ({leaf.spec.anchor} if leaf else set()), []
    kinds: set[Anchor] = set()
    errors: list[SpecError] = []
    for item in tree.items:
        item_kinds, item_errors = _mixed_kinds(item, leaves)
        kinds |= item_kinds
        errors += item_errors
    combinator = tree.combinator
    if combinator.one_anchor and len(kinds) > 1 and not errors:
        by_kind: dict[Anchor, list[str]] = {}
        for position in tree.leaves():
            if position in leaves:
                by_kind.setdefault(leaves[position].spec.anchor, []).append(leaves[position].call.name)
        which = "; ".join(f"{kind.value}: {', '.join(dict.fromkeys(names))}" for kind, names in by_kind.items())
        errors.append(SpecError(
            f"'{combinator.spelling}' {combinator.summary}, but these branches attach to "
            f"different anchor kinds ({which}); use '+' to apply each at its own anchors",
            tree.span,
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
    unchecked: set[int] = set()  # the operands of a combinator that is refused (as a whole, or its operands)
    for group in checked.tree.groups():
        error = _check_combinator(group)
        if error is not None:
            checked.errors.append(error)
            unchecked.update(group.leaves())
        else:
            refused = group.operand_errors(checked.calls)
            checked.errors += refused
            unchecked.update(group.leaves() if refused else ())  # one error per operand, not two
    fused = {i for group in checked.tree.groups() if isinstance(group, Fuse) for i in group.leaves()}
    for position, call in enumerate(checked.calls):
        if call.name == Fuse.OPERAND and position not in fused:
            checked.errors.append(SpecError(f"{call.name}(…) names a trained adapter for fuse(…): write it "
                                            f"inside fuse(…), e.g. fuse({call.name}(…), …)", call.span))
    for position, call in enumerate(checked.calls):
        if position in unchecked:
            continue
        try:
            tspec = lookup(call.name, call.span)
            checked.leaves[position] = CheckedCall(call, tspec, validate_params(tspec, call))
        except SurgeryError as e:
            checked.errors.append(e)
    # `|` runs at one anchor: its calls must share an anchor kind. `+` across kinds applies each
    # at its own anchors, in order; each kind's tree is the expression projected onto its calls.
    checked.errors += _mixed_kinds(checked.tree, checked.leaves)[1]
    checked.errors += gating.rule_errors(checked.tree, checked.leaves)  # where a gate has nothing to scale
    # A transform that replaces the base must be innermost in the rule's tree at its anchor kind.
    for position, leaf in checked.leaves.items():
        if leaf.spec.offers(ReplacesBase) is None:
            continue
        same_kind = {i for i, other in checked.leaves.items() if other.spec.anchor is leaf.spec.anchor}
        projected = checked.tree.prune(same_kind)
        if projected is None or projected.head() != position:
            checked.errors.append(SpecError(
                f"{leaf.call.name} replaces the layer itself, so it must come first in a sequence "
                f"and not be a branch of '|' (e.g. {leaf.call.name}(…) + lora(…))",
                leaf.call.span,
            ))
    return checked


def _check_combinator(group: Group) -> SpecError | None:
    """The error of a combinator the language has but the pipeline cannot build yet (e.g. gate)."""
    combinator = group.combinator
    if combinator.supported:
        return None
    return SpecError(f"'{combinator.name}' ({combinator.summary}) is part of the language but not yet supported",
                     group.span)


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
    rule_trees: list[tuple[Node | None, list[int]]] = []  # each rule's tree over step indices, its steps
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
        rule_trees.append((checked.tree.relabel(step_at), ids))
    if errors:
        raise SpecErrors(errors)

    # Conflicts: the same transform twice on one anchor (except the trained adapters fusions name).
    fused = {i for tree, _ in rule_trees if tree is not None
             for group in tree.groups() if isinstance(group, Fuse) for i in group.leaves()}
    seen: dict[tuple[str, str], Step] = {}
    for step in steps:
        if step.index in fused:
            continue
        for t in step.targets:
            other = seen.setdefault((step.transform, t.path), step)
            if other is not step:
                errors.append(SpecError(
                    f"{step.transform} is applied twice to {t.path}; the other is at "
                    f"{other.span.file}:{other.span.line}:{other.span.column}\n{other.span.render()}",
                    step.span,
                ))
                break
    errors += plan_clashes(steps)  # attention stages claiming one slot (cache policy, frame) of a module
    for kind in anchors.KINDS.values():  # e.g. two generation strategies for one model
        errors += kind.clashes([s for s in steps if s.spec.anchor is kind.anchor])
    trees = {kind.anchor: _compose(kind.anchor, steps, rule_trees, errors)
             for kind in anchors.KINDS.values() if kind.wraps}
    for anchor, by_path in trees.items():  # what the kind itself refuses in a composition
        errors += [e for path, tree in by_path.items() for e in anchors.kind(anchor).tree_errors(tree, steps)]
    if errors:
        raise SpecErrors(list({str(e): e for e in errors}.values()))
    return Plan(spec, arch.name, steps, {anchor: by_path for anchor, by_path in trees.items() if by_path})


def _compose(anchor: Anchor, steps: list[Step], rule_trees: list[tuple[Node | None, list[int]]],
             errors: list[SurgeryError]) -> dict[str, Node]:
    """The composition at each target of the wrapping kind `anchor`: each rule's tree projected onto
    the steps attached there, rules on one target in sequence; base replacements checked innermost."""
    trees: dict[str, Node] = {}
    targets_of = {s.index: {t.path for t in s.targets} for s in steps if s.spec.anchor is anchor}
    for rule_tree, ids in rule_trees:
        if rule_tree is None:
            continue
        paths = sorted({p for i in ids if i in targets_of for p in targets_of[i]})
        projected: dict[frozenset[int], Node | None] = {}  # targets with the same steps share a tree
        for path in paths:
            keep = frozenset(i for i in ids if path in targets_of.get(i, ()))
            if keep not in projected:
                projected[keep] = rule_tree.prune(keep)
            tree = projected[keep]
            if tree is None:
                continue
            prev = trees.get(path)
            if prev is None:
                trees[path] = tree
            else:
                trees[path] = Seq((*(prev.items if isinstance(prev, Seq) else (prev,)), tree))
    misplaced: set[int] = set()  # report each misplaced step once, not once per target
    for path, tree in trees.items():
        for i in tree.leaves():
            if i in misplaced:
                break
            if steps[i].spec.offers(ReplacesBase) is not None and tree.head() != i:
                errors.append(SpecError(
                    f"{steps[i].transform} replaces the layer itself, so it must come first in a sequence "
                    f"(e.g. {steps[i].transform}(…) + lora(…)); at {path}",
                    steps[i].span,
                ))
                misplaced.add(i)
                break
    return trees
