"""``nn.Linear`` / GPT-2 ``Conv1D`` modules: every linear step of a layer composes in one wrapper.

Each selected layer is replaced once by a :class:`~surgery.layers.SurgeryLinear` holding its base
(the original layer, or what a :class:`ReplacesBase` transform made of it) and the composition of
the adapters there: the plan's tree for that layer, with ``+`` as :class:`~surgery.layers.Sequential`
and ``|`` as :class:`~surgery.layers.Parallel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from surgery import gating
from surgery.anchors import AnchorKind, anchor_kind, sites, within
from surgery.arch.select import Region, RoleIndex
from surgery.compose import Gate, Group, Leaf, Par, Seq
from surgery.errors import ApplyError
from surgery.layers import Parallel, Sequential, SurgeryLinear, features, is_linear, linear_weight
from surgery.transforms.registry import Adapter, AdapterPeftTensors, Anchor, ReplacesBase, Target

if TYPE_CHECKING:
    from surgery.apply import Edit
    from surgery.compose import Node
    from surgery.planner import Step

# The module realising each combinator at a linear layer (a combinator missing here is refused).
MODULES: dict[type[Group], Callable[[list[nn.Module]], nn.Module]] = {Seq: Sequential, Par: Parallel}


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


@anchor_kind
class Linear(AnchorKind):
    anchor = Anchor.LINEAR
    required = (Adapter, ReplacesBase)
    optional = (AdapterPeftTensors,)
    wraps = True

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        """Linear layers inside the regions; the output head only where a selector names it."""
        named = {s.path for s in sites(regions)}
        targets = []
        for path, module in index.modules.items():
            if not is_linear(module) or not any(within(path, p) for p in named):
                continue
            if path in index.head_paths and path not in named:
                continue  # "all linear layers" never includes the output head unless named
            site = index.site(path)
            targets.append(Target(path, site.role, site.layer))
        return targets

    def installer(self, model: nn.Module, edit: Edit) -> LinearInstaller:
        return LinearInstaller(model, edit)

    def mergeable(self, step: Step, model: nn.Module) -> bool:
        layers = wrappers(model)
        return all(t.path in layers and layers[t.path].mergeable for t in step.targets)

    def peft_tensors(self, steps: Sequence[Step], model: nn.Module, config: dict[str, object]) -> (
            dict[str, torch.Tensor] | str):
        layers = wrappers(model)
        for path, layer in layers.items():
            if isinstance(layer.adapter, nn.ModuleList):
                return f"not written: {path} composes several transforms, which PEFT cannot express"
        targets = sorted({t.path for s in steps for t in s.targets})
        config.setdefault("target_modules", targets)
        if any(type(layers[t].base).__name__ == "Conv1D" for t in targets):
            config["fan_in_fan_out"] = True
        own = steps[0].spec.offers(AdapterPeftTensors)
        tensors = {}
        for step in steps:
            for target in step.targets:
                adapter = layers[target.path].adapter
                assert adapter is not None, "a step with PEFT fields has an adapter at each target"
                named = own.peft_tensors(step.params, target, adapter) if own else adapter.state_dict()
                tensors.update({f"base_model.model.{target.path}.{k}": v for k, v in named.items()})
        return tensors


def wrappers(model: nn.Module) -> dict[str, SurgeryLinear]:
    """Every wrapped linear layer of `model`, by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SurgeryLinear)}


class LinearInstaller:
    """Collects each layer's base and adapters step by step; wraps each layer once at the end."""

    def __init__(self, model: nn.Module, edit: Edit):
        self.model, self.edit = model, edit
        self.bases: dict[str, nn.Module] = {}
        self.adapters: dict[str, dict[int, nn.Module]] = {}

    def add(self, step: Step) -> None:
        replace = step.spec.offers(ReplacesBase)
        adapter = step.spec.offers(Adapter)
        for target in step.targets:
            base = self.bases.setdefault(target.path, _get(self.model, target.path))
            if replace is not None:
                self.bases[target.path] = replace.replace_base(step.params, base, target)
            elif adapter is not None:
                self.adapters.setdefault(target.path, {})[step.index] = adapter.adapter(step.params, base, target)

    def finish(self, trees: Mapping[str, Node]) -> None:
        for path, tree in trees.items():
            modules = self.adapters.get(path, {})
            base = self.bases[path]
            self.edit.replace(path, SurgeryLinear(base, _assemble(tree.prune(set(modules)), modules, base)))


def _assemble(tree: Node | None, modules: Mapping[int, nn.Module], base: nn.Module) -> nn.Module | None:
    """The module realising `tree` (pruned to the steps with an adapter: base replacements have none)."""
    if tree is None:
        return None
    if isinstance(tree, Leaf):
        return modules[tree.index]
    if isinstance(tree, Gate):  # each branch with its own gate on the layer's input
        built = [m for m in (_assemble(t, modules, base) for t in gating.branches(tree)) if m is not None]
        return gating.linear_gate(built, features(base)[0], linear_weight(base)[0], Parallel) if built else None
    build = MODULES.get(type(tree))
    if build is None:
        raise ApplyError(f"{tree.combinator.spelling} is not supported at linear anchors")
    return build([m for m in (_assemble(t, modules, base) for t in tree.items) if m is not None])
