"""UniPELT's gates: the ``gate(…)`` combinator realised at the linear, sublayer and attention anchors.

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
https://arxiv.org/abs/2110.07577. Each sub-method's contribution is scaled by a learned gate
G = σ(W_G·z + b_G) ∈ (0, 1), one small linear layer W_G ∈ ℝ^{1×d} per gated method and per place
it acts (each LoRA'd projection of each layer has its own; so does each layer's adapter and each
layer's prefix), reading the input of what it gates:

* ``gate(lora(…))`` at a linear layer: y = W₀x + G(x)·ΔW x — z = x, the layer's input (the
  reference gates LoRA on W_Q, W_V with the attention block's input, which is x there).
* ``gate(adapter(…))`` at a sublayer: h' = h + G(z)·s·f(z) — z the adapter's own input: h, the
  sublayer's output, for a serial adapter (UniPELT's, after the FFN), x, its input, for a parallel one.
* ``gate(prefix_tuning(…))`` at attention: query i's softmax mass on the prefix is weighted by
  G(x_i), x_i the attention block's input at i (:class:`surgery.attention.KVPrefix`'s ``gate``):
  out_i = (G·Σ_p e^{s_ip} v_p + Σ_j e^{s_ij} v_j) / (G·Σ_p e^{s_ip} + Σ_j e^{s_ij}), i.e. log G
  added to the prefix's scores, merged exactly on the fast path like any other score.

``gate(a | b)`` (or ``gate(a, b)``) gates each branch separately: it is ``gate(a) | gate(b)``.
``gate(a + b)`` has one gate over the sequence's whole contribution. A gate inside a gate, and a
gate at an anchor kind without one (rotary, embeddings, parameters, decoding, attention stages
other than a K/V prefix) are errors at the gate when planning.

Two departures from the reference code, both deliberate:

* The gate is per token. The reference averages σ(W_G·z) over the sequence, padding included, so
  in a causal decoder every token would depend on later tokens and on padding; per token, a left-
  padded row equals the row alone and prefill + decoding equals the full forward.
* Prefix gating weighs the prefix's part of the softmax. The reference multiplies the prefix keys
  and values by G, which at G = 0 leaves P zero keys taking softmax mass (scores 0, values 0)
  rather than removing the prefix; weighting the mass makes G = 0 exactly "no prefix" and G = 1
  exactly the ungated prefix, which is He et al.'s view of prefix tuning as a gated mix of
  attention over the prefix and over the stream.

The gate starts at W_G = 0, b_G = 0, i.e. G = ½ for every token (the reference draws W_G from
N(0, 0.02²): ½ up to a few hundredths); a fixed start needs no random draw, so building it after
the steps keeps a plan's modules deterministic. A gated linear layer does not merge (G depends on
the input) and PEFT has no gates, so a gated plan saves in surgery's own format only.

Obligations (checked once per gate by :func:`surgery.verify.verify`, beside each gated step's own
obligations, which are checked on the step ungated):

* a gate fixed at 1 equals the ungated composition (its methods' tensors perturbed);
* a gate fixed at 0 equals the model without the gated methods (a prefix's stream still numbered
  after it, as prefix tuning numbers it);
* learned (W_G, b_G perturbed): each gated place equals its formula by hand — base + σ(W_G·z + b_G)
  times the ungated contribution at linear and sublayer anchors, and at attention the untouched
  layer given the prefix as its KV cache with log G on the prefix's mask columns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.compose import Gate, Group, Leaf, Node, Par
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, AttentionStage

if TYPE_CHECKING:
    from surgery.planner import CheckedCall, Plan, Step
    from surgery.verify import Check

GATED = (Anchor.LINEAR, Anchor.SUBLAYER, Anchor.ATTENTION)  # where a gate has a contribution to scale
ATTR = "surgery_prefix_gate"  # on an attention module: the gate of its K/V prefix


class GateNet(nn.Module):
    """G(z) = σ(W_G·z + b_G) per token, [..., 1]; ``fixed`` (not saved) pins it, for obligations."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        self.proj = nn.Linear(width, 1, dtype=dtype, device=device)
        if self.proj.weight.device.type != "meta":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.fixed: float | None = None

    def logit(self, z: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.proj(z.to(self.proj.weight.dtype))
        return logit

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return torch.full((*z.shape[:-1], 1), self.fixed, dtype=z.dtype, device=z.device)
        return torch.sigmoid(self.logit(z)).to(z.dtype)

    def log(self, z: torch.Tensor) -> torch.Tensor:
        """log G(z), [...] float32 (exact at a fixed 0: −inf)."""
        if self.fixed is not None:
            return torch.full(z.shape[:-1], math.log(self.fixed) if self.fixed > 0 else -math.inf,
                              dtype=torch.float32, device=z.device)
        return F.logsigmoid(self.logit(z).float())[..., 0]


# ------------------------------------------------------------------------------------ trees


def branches(gate: Group) -> list[Node]:
    """What one gate scales separately: its operands, a ``|`` operand split into its branches."""
    found: list[Node] = []
    for item in gate.items:
        found += list(item.items) if isinstance(item, Par) else [item]
    return found


def ungated(tree: Node | None) -> Node | None:
    """`tree` with every gate replaced by what it gates (``gate(a | b)`` → ``a | b``)."""
    if tree is None or isinstance(tree, Leaf):
        return tree
    items = [ungated(item) for item in tree.items]
    kept = [item for item in items if item is not None]
    if isinstance(tree, Gate):
        parts = [b for item in kept for b in (item.items if isinstance(item, Par) else (item,))]
        return None if not parts else parts[0] if len(parts) == 1 else Par(tuple(parts))
    return tree.rebuilt(kept)


def ungated_plan(plan: Plan) -> Plan:
    """`plan` with its gates removed (each gated step as it would be ungated)."""
    trees = {anchor: {path: t for path, t in ((p, ungated(tree)) for p, tree in by_path.items()) if t is not None}
             for anchor, by_path in plan.trees.items()}
    return dataclasses.replace(plan, trees={a: by_path for a, by_path in trees.items() if by_path})


def rule_errors(tree: Node, leaves: Mapping[int, CheckedCall]) -> list[SpecError]:
    """Model-free checks of the gates in a rule's `tree` (positions → validated calls)."""
    errors: list[SpecError] = []
    for group in tree.groups():
        if not isinstance(group, Gate):
            continue
        if any(isinstance(inner, Gate) for item in group.items for inner in item.groups()):
            errors.append(SpecError("a gate inside a gate: gate(…) already scales each branch it holds", group.span))
            continue
        for position in group.leaves():
            leaf = leaves.get(position)
            if leaf is None:
                continue
            anchor = leaf.spec.anchor
            if anchor not in GATED:
                errors.append(SpecError(
                    f"gate(…) scales a contribution at linear, sublayer or attention anchors; {leaf.call.name} "
                    f"attaches to {anchor.value} anchors, where there is none to scale", leaf.call.span))
            elif anchor is Anchor.ATTENTION:
                stage = leaf.spec.offers(AttentionStage)
                built = None if stage is None else stage.stage(leaf.params)
                if built is None or built.prefix is None:
                    errors.append(SpecError(
                        f"gate(…) at attention weighs a K/V prefix (prefix_tuning, p_tuning_v2); {leaf.call.name} "
                        "adds no prefix to weigh", leaf.call.span))
                elif len(group.leaves()) > 1:
                    errors.append(SpecError(
                        "gate(…) over a K/V prefix holds that prefix alone: write gate(prefix_tuning(…))",
                        group.span))
                    break
    return errors


# ------------------------------------------------------------------------------------ linear


class GatedLinear(nn.Module):
    """``gate(a)`` at a linear layer: y = inner(x) + G(x)·(a(x, inner) − inner(x))."""

    mergeable = False  # G depends on x: no single weight computes it

    def __init__(self, module: nn.Module, width: int, like: torch.Tensor):
        super().__init__()
        self.module = module
        self.gate = GateNet(width, like.dtype, like.device)

    def delta(self, x: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        own = getattr(self.module, "delta", None)
        contribution: torch.Tensor = own(x, inner) if own is not None else self.module(x, inner) - inner(x)
        gate: torch.Tensor = self.gate(x)
        return gate * contribution

    def forward(self, x: torch.Tensor, inner: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        base = inner(x)
        return base + self.delta(x, lambda z: base if z is x else inner(z))


def linear_gate(built: Sequence[nn.Module], width: int, like: torch.Tensor,
                parallel: Callable[[Sequence[nn.Module]], nn.Module]) -> nn.Module:
    """Each built branch gated at a layer of input width `width`; several branches side by side."""
    gated = [GatedLinear(module, width, like) for module in built]
    return gated[0] if len(gated) == 1 else parallel(gated)


# ------------------------------------------------------------------------------------ sublayer


def reads_input(module: nn.Module) -> bool:
    """Whether a sublayer module reads the sublayer's input x (a parallel adapter) rather than its output h."""
    if isinstance(module, nn.ModuleList):
        return len(module) > 0 and all(reads_input(m) for m in module)
    return bool(getattr(module, "parallel", False))


class GatedSublayer(nn.Module):
    """``gate(a)`` at a sublayer: h' = h + G(z)·(a(x, h) − h), z = x if `a` reads x (parallel) else h."""

    def __init__(self, module: nn.Module, width: int, like: torch.Tensor):
        super().__init__()
        self.module = module
        self.reads_input = reads_input(module)
        self.gate = GateNet(width, like.dtype, like.device)

    def delta(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        own = getattr(self.module, "delta", None)
        contribution: torch.Tensor = own(x, h) if own is not None else self.module(x, h) - h
        z = x if self.reads_input else h
        if z is None:
            raise RuntimeError("the gate's sublayer input was not captured")
        gate: torch.Tensor = self.gate(z)
        return gate * contribution

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(x, h)


def width(module: nn.Module) -> int:
    """The model width a sublayer module reads (x and h have it): its first linear layer's input."""
    return next(m.in_features for m in module.modules() if isinstance(m, nn.Linear))


def sublayer_gate(built: Sequence[nn.Module], width: int, parallel: Callable[[Sequence[nn.Module]], nn.Module]
                  ) -> nn.Module:
    gated = [GatedSublayer(module, width, _like(module)) for module in built]
    return gated[0] if len(gated) == 1 else parallel(gated)


def _like(module: nn.Module) -> torch.Tensor:
    return next(p for p in module.parameters() if p.is_floating_point())


# ------------------------------------------------------------------------------------ attention


def prefix_log_gate(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """[B, Tq] log G(x_i) of the call's queries, x the attention module's input hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    gate: GateNet = getattr(module, ATTR)
    return gate.log(hidden)


def gate_prefix(edit: Any, module: nn.Module, width: int) -> None:
    """Give `module`'s K/V prefix stage a gate (a :class:`GateNet` on the module), through `edit`."""
    from surgery.attention import ATTR as PROGRAM

    program = getattr(module, PROGRAM)
    like = next(p for p in module.parameters() if p.is_floating_point())
    edit.set_attr(module, ATTR, GateNet(width, like.dtype, like.device))
    stages = tuple(dataclasses.replace(s, prefix=dataclasses.replace(s.prefix, gate=prefix_log_gate))
                   if s.prefix is not None else s for s in program.stages)
    edit.set_attr(module, PROGRAM, dataclasses.replace(program, stages=stages))


# ------------------------------------------------------------------------------------ obligations


def gates(plan: Plan) -> list[tuple[Gate, list[int]]]:
    """Each gate written in the spec (however many targets share it; pruned differently at some, e.g.
    ``gate(lora | ia3)`` where only LoRA attaches), with every step it gates somewhere."""
    seen: dict[object, tuple[Gate, set[int]]] = {}
    for by_path in plan.trees.values():
        for tree in by_path.values():
            for group in tree.groups():
                if isinstance(group, Gate):
                    key = (group.span.file, group.span.line, group.span.column) if group.span else tuple(group.leaves())
                    seen.setdefault(key, (group, set()))[1].update(group.leaves())
    return [(group, sorted(steps)) for group, steps in seen.values()]


def gated_branches(plan: Plan) -> dict[int, Node]:
    """Each gated step → the branch of its gate that scales it: the step alone (``gate(lora(…))``, or
    a branch of ``gate(a | b)``), or a sequence under one gate (``gate(a + b)``); the widest seen
    where targets prune a branch differently."""
    found: dict[int, Node] = {}
    for by_path in plan.trees.values():
        for tree in by_path.values():
            for group in tree.groups():
                if not isinstance(group, Gate):
                    continue
                for branch in branches(group):
                    for i in branch.leaves():
                        if i not in found or len(branch.leaves()) > len(found[i].leaves()):
                            found[i] = branch
    return found


def described(step: Step, branches_of: Mapping[int, Node]) -> str:
    """`step` as its plan shows it: ``lora(r=8, …)``, inside ``gate(…)`` when a gate scales it, with the
    other steps its gate holds (``gate(a + b)``: one gate over both) named by number:
    ``gate(lora(r=2, …) + step 3)``. `branches_of`: :func:`gated_branches` of the plan."""
    branch = branches_of.get(step.index)
    own = step.describe()
    if branch is None:
        return own
    return f"gate({_text(branch, lambda i: own if i == step.index else f'step {i}')})"


def _text(node: Node, name: Callable[[int], str]) -> str:
    """`node` written as a spec writes it, each leaf as `name` gives it."""
    if isinstance(node, Leaf):
        return name(node.index)
    combinator = node.combinator
    items = [_text(item, name) for item in node.items]
    if combinator.called:
        return f"{combinator.name}({', '.join(items)})"
    nested = [f"({text})" if isinstance(item, Group) and not item.combinator.called else text
              for item, text in zip(node.items, items)]
    return f" {combinator.spelling} ".join(nested)


def gate_nets(model: nn.Module) -> Iterator[GateNet]:
    return (m for m in model.modules() if isinstance(m, GateNet))


def _perturb_methods(model: nn.Module, seed: int) -> list[nn.Parameter]:
    """Add seeded noise to every trainable tensor that is not a gate's (the gated methods' own),
    in module order; returns them (so two models built from the same steps get the same noise)."""
    gate_params = {id(p) for net in gate_nets(model) for p in net.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_params]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return params


def _fix(model: nn.Module, value: float | None) -> None:
    for net in gate_nets(model):
        net.fixed = value


def check_gates(plan: Plan, reference: nn.Module, seed: int, per_position: Callable[[nn.Module], list[Any]]
                ) -> list[tuple[int, str, str, float, float]]:
    """Every gate's obligations, as (step, label, obligation, error, tolerance) rows; `reference` is
    the untouched model (never modified)."""
    rows = []
    for _, steps in gates(plan):
        label = "gate(" + " | ".join(plan.steps[i].transform for i in steps) + ")"
        try:
            rows += [(steps[0], label, name, error, tol)
                     for name, error, tol in _gate_obligations(plan, set(steps), reference, seed, per_position)]
        except Exception as e:  # a crash is a failed obligation, with its reason
            rows.append((steps[0], label, f"gate obligations [crashed: {type(e).__name__}: {e}]", math.inf, 0.0))
    return rows


def _gate_obligations(plan: Plan, keep: set[int], reference: nn.Module, seed: int,
                      per_position: Callable[[nn.Module], list[Any]]) -> list[tuple[str, float, float]]:
    """The gate's obligations on two copies with only its steps (as a step's are checked alone):
    `gated`, and `plain`, the same steps ungated; both get the same noise on the methods' tensors."""
    from surgery.apply import apply_plan
    from surgery.verify import Check

    gated, plain = copy.deepcopy(reference), copy.deepcopy(reference)
    apply_plan(plan.restricted(keep), gated, seed=seed)
    apply_plan(ungated_plan(plan.restricted(keep)), plain, seed=seed)
    gated.eval()
    plain.eval()
    check = Check(reference, gated, plan.steps[min(keep)], seed, per_position, plan)
    methods = [_perturb_methods(gated, seed), _perturb_methods(plain, seed)]
    same = [a.shape for a in methods[0]] == [b.shape for b in methods[1]]
    ids = check.tokens(length=12, salt=5)
    original = check.logits(reference, ids, **_positions(gated, ids))
    ungated_logits = check.logits(plain, ids)
    _fix(gated, 1.0)
    at_one = check.logits(gated, ids)
    _fix(gated, 0.0)
    at_zero = check.logits(gated, ids)
    _fix(gated, None)
    moved = check.max_abs(ungated_logits, original) > 1e-3  # the perturbed methods change the model
    return [
        ("gate fixed at 1 == the ungated composition (rel.)",
         check.max_rel(at_one, ungated_logits) if same and moved else math.inf, 1e-5),
        ("gate fixed at 0 == the model without the gated steps (rel.)",
         check.max_rel(at_zero, original) if moved else math.inf, 1e-5),
        ("learned gate == its formula by hand at each gated place (rel.)", _by_hand(gated, plain, check), 1e-5),
    ]


def _positions(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A K/V prefix numbers the stream after itself; the model without it is given the same numbering."""
    from surgery.transforms.prefix_tuning import PrefixEncoder

    encoder = next((m for m in model.modules() if isinstance(m, PrefixEncoder)), None)
    if encoder is None:
        return {}
    return {"position_ids": torch.arange(encoder.length, encoder.length + ids.shape[1])[None].expand(ids.shape[0], -1)}


def _perturb_gates(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for net in gate_nets(model):
            for p in net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator).to(p.dtype))


@torch.no_grad()
def _by_hand(gated: nn.Module, plain: nn.Module, check: Check) -> float:
    """Every gated place of `gated` (gates perturbed) against its formula: base + σ(z·W_Gᵀ + b_G) times
    the contribution of the same place in `plain` (the ungated composition, the same tensors)."""
    from surgery.layers import SurgeryLinear

    _perturb_gates(gated, check.generator(9))
    errors, places = [0.0], 0
    plain_modules = dict(plain.named_modules())
    layer: SurgeryLinear | None = None
    for path, module in gated.named_modules():
        if isinstance(module, SurgeryLinear):
            layer = module  # the wrapper every gated linear module below it sits in
        if isinstance(module, GatedLinear) and layer is not None:
            x = check.randn(3, layer.in_features, salt=places)
            base = layer.base(x)
            want = base + _expected(module.gate, x) * (plain_modules[path](x, layer.base) - base)
            errors.append(check.max_rel(module(x, layer.base), want))
            places += 1
        elif isinstance(module, GatedSublayer):
            width = module.gate.proj.in_features
            x, h = check.randn(2, 5, width, salt=100 + places), check.randn(2, 5, width, salt=200 + places)
            z = x if module.reads_input else h
            want = h + _expected(module.gate, z) * (plain_modules[path](x, h) - h)
            errors.append(check.max_rel(module(x, h), want))
            places += 1
        elif isinstance(getattr(module, ATTR, None), GateNet):
            errors.append(_prefix_by_hand(gated, path, module, check, places))
            places += 1
    return max(errors) if places else math.inf


def _expected(net: GateNet, z: torch.Tensor) -> torch.Tensor:
    """σ(z·W_Gᵀ + b_G), written out."""
    return torch.sigmoid(z @ net.proj.weight.T + net.proj.bias)


def _prefix_by_hand(model: nn.Module, path: str, module: nn.Module, check: Check, salt: int) -> float:
    """The gated layer against the untouched layer given the prefix as its KV cache and, as its mask,
    the prefix columns at log G(x_i) for query i and the causal columns at 0 / −inf."""
    from transformers import DynamicCache

    from surgery.attention import ATTR as PROGRAM, rotary_ref
    from surgery.transforms.prefix_tuning import LayerPrefix, find_encoder

    encoder = find_encoder(model)
    layer = next(s.prefix.kv for s in getattr(module, PROGRAM).stages if s.prefix is not None)
    assert isinstance(layer, LayerPrefix)
    P, n = encoder.length, 9
    original = check.module(path, surgered=False)
    net: GateNet = getattr(module, ATTR)
    x = check.randn(2, n, net.proj.in_features, salt=300 + salt)  # the gate reads x: the model's width
    positions = torch.arange(P, P + n)[None].expand(2, -1)
    rotary = rotary_ref(model)
    kwargs = {"position_embeddings": rotary()(x, positions)} if rotary is not None else {}
    got = module(x, attention_mask=None, **kwargs)[0]
    log_gate = F.logsigmoid(x @ net.proj.weight.T + net.proj.bias)[..., 0]          # [B, n]
    causal = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    mask = torch.cat([log_gate[:, None, :, None].expand(-1, 1, -1, P), causal.expand(2, 1, n, n)], dim=-1)
    table = encoder.kv()
    cache = DynamicCache()
    keys, values = (table[layer.index, kv][None].expand(2, -1, -1, -1) for kv in (0, 1))
    cache.update(keys, values, cast(int, original.layer_idx))
    want = original(x, attention_mask=mask, cache=cache, **kwargs)[0]
    return check.max_rel(got, want)
