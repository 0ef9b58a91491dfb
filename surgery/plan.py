"""AST + model → :class:`Plan`: concrete steps (transform, validated parameters, module paths).

Resolution rules:

* Each call in a rule's expression is one :class:`Step`; it attaches to every anchor of its kind
  inside the regions the rule's selectors name. A step with no anchor there is an error that names
  the nearest candidates; all semantic errors of a spec are collected and raised together.
* Linear-anchored steps are composed per layer into a tree (``("seq", …)``, ``("par", …)``, step
  index) that mirrors the expression; rules on the same layer compose in rule order. The same
  transform twice on one anchor is a conflict reported with both spans.
* Planning works on a meta-device model: no weights are read, so it takes seconds for any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union, get_args

from pydantic import ValidationError
from torch import nn

from surgery.arch import Architecture, detect
from surgery.attention.program import plan_clashes
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
        heads = {p for role in index.arch.head for p in index.model_roles.get(role, [])}
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
    if not roles:
        return f"; this {index.arch.name} model has no {spec.anchor.value} anchor for {spec.name} anywhere"
    return f"; it attaches to {spec.anchor.value} anchors, e.g. " + ", ".join(roles[:6])


# ---------------------------------------------------------------------------------------- plan


def leaves(expr: ast.Expr):
    if isinstance(expr, ast.Call):
        yield expr
    elif isinstance(expr, (ast.Seq, ast.Par)):
        for item in expr.items:
            yield from leaves(item)
    else:
        raise SpecError("expected a transform, e.g. lora(r=16), not a value", expr.span)


def _tree(expr: ast.Expr, step_of: dict[int, int], path: str, targets_of: dict[int, set[str]]) -> Tree | None:
    if isinstance(expr, ast.Call):
        step = step_of.get(id(expr))
        return step if step is not None and path in targets_of[step] else None
    items = [t for t in (_tree(e, step_of, path, targets_of) for e in expr.items) if t is not None]
    if not items:
        return None
    return items[0] if len(items) == 1 else ("seq" if isinstance(expr, ast.Seq) else "par", items)


def _is_innermost(tree: Tree, i: int) -> bool:
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


def build_plan(spec: ast.Spec, model: nn.Module, arch: Architecture | None = None) -> Plan:
    """Resolve `spec` against `model` (meta-device is fine). Raises :class:`SpecErrors`."""
    arch = arch or detect(model)
    _refuse_surgered(model)
    index = RoleIndex(model, arch)
    errors: list[SurgeryError] = []
    steps: list[Step] = []
    step_of: dict[int, int] = {}
    rule_steps: list[tuple[ast.Rule, list[int]]] = []
    if not spec.rules:
        raise SpecError("the spec has no rules", Span(spec.file, 1, 1, 1, 2, spec.source))
    for r, rule in enumerate(spec.rules):
        regions = []
        for selector in rule.selectors:
            try:
                regions.append(resolve(selector, index))
            except SurgeryError as e:
                errors.append(e)
        try:
            calls = list(leaves(rule.expr))
        except SurgeryError as e:
            errors.append(e)
            continue
        ids = []
        for call in calls:
            try:
                tspec = lookup(call.name, call.span)
                params = validate_params(tspec, call)
                if not regions:
                    continue
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
            step_of[id(call)] = step.index
            steps.append(step)
            ids.append(step.index)
        rule_steps.append((rule, ids))
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
    errors += plan_clashes(steps)  # attention stages claiming one slot (cache policy, frame) of a module
    # Linear composition trees.
    linear: dict[str, Tree] = {}
    targets_of = {s.index: {t.path for t in s.targets} for s in steps if s.spec.anchor is Anchor.LINEAR}
    for rule, ids in rule_steps:
        paths = sorted({p for i in ids if i in targets_of for p in targets_of[i]})
        for path in paths:
            tree = _tree(rule.expr, step_of, path, targets_of)
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
