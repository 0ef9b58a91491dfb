"""Sublayers: each layer's attention block and MLP block as wholes, with their input and output.

A sublayer is where bottleneck adapters sit: on its output before the residual connection adds it
back (Houlsby, Pfeiffer), or beside it, reading its input (the parallel adapter of He et al.).
Where each sublayer's input enters and its output leaves is data, the role map's ``sublayers``
(``surgery/arch/data/*.json``): in Llama-like models and GPT-2 one module is both (``self_attn``,
``mlp``: its first argument, its output); in BERT the attention's input is that of
``attention.self`` and its output, before the residual LayerNorm, that of
``attention.output.dropout`` (the FFN's: ``intermediate`` and ``output.dropout``). A sublayer is
selected through its role (``attn``, ``mlp``, or any region holding the layer).

Steps compose per sublayer into a tree of :mod:`surgery.compose` nodes, realised by modules with
``forward(x, h) -> h'``, x the sublayer's input and h its output so far:

* a leaf: the transform's module (:class:`SublayerAdapter`);
* ``a + b``: h' = b(x, a(x, h));
* ``a | b``: h' = h + Σᵢ (branchᵢ(x, h) − h), a branch's ``delta(x, h)`` where it has one;
* a :class:`DropsAdapters` leaf (``adapter_drop``) in a sequence discards everything before it at
  that sublayer (nested sequences count as one), or, where it offers :class:`GuardsAdapters` and
  does not drop them outright (``adapter_drop(p=…)``), wraps them in its module; before the adapters
  or in a ``|`` group it is an error when planning.

Installing never replaces a module of the model, so linear and attention anchors inside a
sublayer keep their paths and compose with it. The composition becomes the output module's
``surgery_sublayer`` (its tensors are part of the state dict, so they save and load with the
model); a forward pre-hook on the input module keeps the call's input (in ``surgery_sublayer_input``,
an object the composition shares, so a deep copy of the model shares its own copy), and a forward
hook on the output module replaces the output, or the first element of a tuple (attention modules
return (output, weights)).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from surgery import gating
from surgery.anchors import AnchorKind, anchor_kind, covered
from surgery.arch import backbone_prefix, detect
from surgery.arch.select import Region, RoleIndex
from surgery.compose import Gate, Group, Leaf, Par, Seq
from surgery.errors import ApplyError, SpecError
from surgery.transforms.registry import Anchor, ModelPeftTensors, Target

if TYPE_CHECKING:
    from surgery.apply import Edit
    from surgery.compose import Node
    from surgery.planner import Step

ATTR = "surgery_sublayer"           # on the output module: the composition (a registered submodule)
INPUT = "surgery_sublayer_input"    # on the input module: the slot its pre-hook fills


@runtime_checkable
class SublayerAdapter(Protocol):
    """A module ``forward(x, h) -> h'`` (x the sublayer's input, h its output) for `target`, for a
    model of width `hidden` whose parameters are like `like` (dtype, device); optionally with
    ``delta(x, h) = forward(x, h) − h``."""

    def sublayer_adapter(self, p: Any, target: Target, hidden: int, like: torch.Tensor) -> nn.Module: ...


@runtime_checkable
class DropsAdapters(Protocol):
    """Whether the step drops, at `target`, what comes before it in the sublayer's sequence."""

    def drops(self, p: Any, target: Target) -> bool: ...


@runtime_checkable
class GuardsAdapters(Protocol):
    """A drop decided while the model runs: at `target`, the module realising `inner` (what comes
    before the step in the sublayer's sequence) under the step, e.g. skipped in some training steps."""

    def guard(self, p: Any, target: Target, inner: nn.Module) -> nn.Module: ...


def locate(model: nn.Module, target: Target) -> tuple[nn.Module, nn.Module]:
    """(input module, output module) of the sublayer `target` in `model`, from its role map."""
    arch = detect(model)
    paths = arch.sublayers[target.role or ""]
    layer = f"{backbone_prefix(model)}{arch.layers}.{target.layer}."
    return model.get_submodule(layer + paths.input), model.get_submodule(layer + paths.output)


def composition(model: nn.Module, target: Target) -> nn.Module | None:
    """The module realising the composition at sublayer `target` (None where nothing is installed)."""
    found = getattr(locate(model, target)[1], ATTR, None)
    return None if found is None else found.adapter


@anchor_kind
class SublayerKind(AnchorKind):
    anchor = Anchor.SUBLAYER
    required = (SublayerAdapter, DropsAdapters)
    optional = (ModelPeftTensors, GuardsAdapters)
    wraps = True

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        """Each layer's sublayers whose role (or input or output module) lies in the regions."""
        targets = []
        for i in range(index.num_layers):
            layer = f"{index.layers_path}.{i}."
            for role, paths in index.arch.sublayers.items():
                where = [layer + paths.input, layer + paths.output]
                if not all(p in index.modules for p in where):
                    continue
                if any(covered(p, regions) for p in [*index.layer_role_paths(role, i), *where]):
                    targets.append(Target(layer + paths.output, role, i))
        return targets

    def installer(self, model: nn.Module, edit: Edit) -> SublayerInstaller:
        return SublayerInstaller(model, edit)

    def tree_errors(self, tree: Node, steps: Sequence[Step]) -> list[SpecError]:
        """A drop must follow what it drops in a sequence: before the adapters, or a branch of a group
        that is not a sequence, it is refused at its call (alone at a block it drops nothing there)."""
        drops = {i for i in tree.leaves() if steps[i].spec.offers(DropsAdapters) is not None}
        errors = []
        for group in tree.groups():
            if isinstance(group, Seq):
                continue
            for i in drops & set(group.leaves()):
                errors.append(SpecError(f"{steps[i].transform} drops the adapters before it in a sequence, so it "
                                        f"cannot be a branch of '{group.combinator.spelling}'; write "
                                        f"adapter(…) + {steps[i].transform}(…)", steps[i].span))
        sequence = _sequence(tree)
        first = sequence[0]
        if not errors and isinstance(first, Leaf) and first.index in drops and len(sequence) > 1:
            name = steps[first.index].transform
            errors.append(SpecError(f"{name} drops the adapters before it at a block, and the adapters come after "
                                    f"it; write adapter(…) + {name}(…), or drop in a later rule",
                                    steps[first.index].span))
        return errors


class InputSlot:
    """The sublayer's input during one call: the input module's pre-hook puts it, the output
    module's hook takes it (and lets go of it, so no activation outlives its call)."""

    def __init__(self, name: str):
        self.name = name  # the input module's first parameter, for calls that pass it by keyword
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


class Sublayer(nn.Module):
    """What a sublayer's output module carries: the composition, and the slot holding its input."""

    def __init__(self, adapter: nn.Module, slot: InputSlot):
        super().__init__()
        self.adapter = adapter
        self.slot = slot

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.adapter(x, h)
        return out


def keep_sublayer_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    slot = getattr(module, INPUT)
    slot.value = args[0] if args else kwargs.get(slot.name)


def adapt_sublayer_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    sublayer = getattr(module, ATTR)
    x = sublayer.slot.take()
    if isinstance(output, tuple):  # attention: (output, weights)
        return (sublayer(x, output[0]), *output[1:])
    return sublayer(x, output)


class SublayerSeq(nn.ModuleList):
    """``a + b`` at one sublayer: each item adapts the output of the one before it."""

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        for module in self:
            h = module(x, h)
        return h


class SublayerPar(nn.ModuleList):
    """``a | b`` at one sublayer: every branch sees the same (x, h); their contributions add up."""

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        out = h
        for module in self:
            delta = getattr(module, "delta", None)
            out = out + (delta(x, h) if delta is not None else module(x, h) - h)
        return out


# The module realising each combinator at a sublayer (a combinator missing here is refused); a
# combinator's technique may add its own (``fuse``: :mod:`surgery.transforms.fuse`).
MODULES: dict[type[Group], Callable[[list[nn.Module]], nn.Module]] = {Seq: SublayerSeq, Par: SublayerPar}


class SublayerInstaller:
    """Builds each step's modules per sublayer; installs each sublayer's composition once at the end."""

    def __init__(self, model: nn.Module, edit: Edit):
        self.model, self.edit = model, edit
        self.targets: dict[str, Target] = {}
        self.modules: dict[str, dict[int, nn.Module]] = {}
        self.drops: dict[str, set[int]] = {}
        self.guards: dict[str, dict[int, Callable[[nn.Module], nn.Module]]] = {}

    def add(self, step: Step) -> None:
        adapter = step.spec.offers(SublayerAdapter)
        drop = step.spec.offers(DropsAdapters)
        guard = step.spec.offers(GuardsAdapters)
        hidden: int = cast(Any, self.model).config.get_text_config().hidden_size
        for target in step.targets:
            self.targets[target.path] = target
            if adapter is not None:
                like = _like(locate(self.model, target)[0])
                self.modules.setdefault(target.path, {})[step.index] = adapter.sublayer_adapter(
                    step.params, target, hidden, like)
            elif drop is not None and drop.drops(step.params, target):
                self.drops.setdefault(target.path, set()).add(step.index)
            elif guard is not None:
                self.guards.setdefault(target.path, {})[step.index] = functools.partial(
                    guard.guard, step.params, target)

    def finish(self, trees: Mapping[str, Node]) -> None:
        for path, tree in trees.items():
            modules, drops, guards = self.modules.get(path, {}), self.drops.get(path, set()), self.guards.get(path, {})
            built = _assemble(tree.prune(set(modules) | drops | set(guards)), modules, drops, guards)
            if built is None:  # everything there was dropped
                continue
            source, sink = locate(self.model, self.targets[path])
            slot = InputSlot(next(iter(inspect.signature(source.forward).parameters)))
            # New modules start in training mode: the composition takes the model's mode (a random
            # drop in a model that is evaluating must not drop).
            self.edit.set_attr(sink, ATTR, Sublayer(built, slot).train(sink.training))
            self.edit.set_attr(source, INPUT, slot)
            self.edit.hook(source.register_forward_pre_hook(keep_sublayer_input, with_kwargs=True))
            self.edit.hook(sink.register_forward_hook(adapt_sublayer_output))


def _like(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter of the sublayer (its dtype and device are the adapter's)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param
    raise ApplyError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")


def _sequence(tree: Node) -> list[Node]:
    """The items of nested sequences as one sequence (``+`` is associative)."""
    if isinstance(tree, Seq):
        return [leaf for item in tree.items for leaf in _sequence(item)]
    return [tree]


def _assemble(tree: Node | None, modules: Mapping[int, nn.Module], drops: set[int],
              guards: Mapping[int, Callable[[nn.Module], nn.Module]]) -> nn.Module | None:
    """The module realising `tree`; a drop discards the items before it in its sequence, a guard
    wraps them (where a drop may stand is checked when planning, :meth:`SublayerKind.tree_errors`)."""
    if tree is None:
        return None
    if isinstance(tree, Leaf):
        return None if tree.index in drops or tree.index in guards else modules[tree.index]
    if isinstance(tree, Seq):
        items: list[nn.Module] = []
        for item in _sequence(tree):
            if isinstance(item, Leaf) and item.index in drops:
                items = []
            elif isinstance(item, Leaf) and item.index in guards:
                items = [guards[item.index](_one(items))] if items else []
            else:
                built = _assemble(item, modules, drops, guards)
                items += [built] if built is not None else []
        return _one(items) if items else None
    if isinstance(tree, Gate):  # each branch with its own gate on what it reads
        gated = [m for m in (_assemble(t, modules, drops, guards) for t in gating.branches(tree)) if m is not None]
        hidden = gating.width(gated[0]) if gated else 0
        return gating.sublayer_gate(gated, hidden, SublayerPar) if gated else None
    build = MODULES.get(type(tree))
    if build is None:
        raise ApplyError(f"{tree.combinator.spelling} is not supported at sublayer anchors")
    branches = [m for m in (_assemble(t, modules, drops, guards) for t in tree.items) if m is not None]
    if not branches:
        return None
    return branches[0] if len(branches) == 1 and tree.combinator.collapses else build(branches)


def _one(items: list[nn.Module]) -> nn.Module:
    return items[0] if len(items) == 1 else SublayerSeq(items)
