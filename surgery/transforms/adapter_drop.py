"""AdapterDrop: no adapters in the lowest layers (``layers=``), or in random layers per training step (``p=``).

Rücklé et al. 2021, https://arxiv.org/abs/2010.11918. It drops what comes *before* it at each
sublayer, so it follows the adapters: ``layers: adapter(houlsby) + adapter_drop(layers=3)``, or a
later rule ``attn, mlp: adapter_drop(layers=3)``.

* ``adapter_drop(layers=k)`` drops the adapters of layers 0 … k−1 at the sublayers it selects
  (``layers=[i, j, …]`` names the layers), in training and inference alike. A dropped adapter is
  not built at all: those layers compute exactly the base sublayer (the speed-up at inference that
  the paper measures, and no parameters that would never train).
* ``adapter_drop(p=q, seed=s)`` is the paper's "robust" training: at every optimizer step each
  selected layer's adapters are dropped with probability q, independently (all of one layer's
  selected sublayers together), and kept in the other layers; the model is then robust to dropping
  at inference. Every adapter is built; a dropped block outputs h, the base sublayer's output, as
  if nothing came before the drop there. In eval mode nothing is dropped: the model is the one with
  every adapter. The paper samples instead the number n of lowest layers to drop; independent
  layers are what ``p=`` says (the lowest-n variant is not here).

  The drops of step t are a function of (seed, t) alone: a generator seeded with
  ``seed·1,000,003 + t`` draws one uniform u_l per selected layer l (in increasing l), and l is
  dropped iff u_l < q, except that a step dropping every selected layer keeps the one of largest
  u_l (else a step might have no trainable parameter in its loss; probability q^L). The schedule (:mod:`surgery.train`: ``Schedules``, ``SurgeryCallback``,
  ``surgery train``) sets step t's drops before the step's forwards and step t+1's after its
  optimizer step, so gradient accumulation sees one set per step; its state is the step, saved
  with the result, so a resumed run drops exactly as an uninterrupted one. Without a schedule
  (a hand-written loop that does not use ``Schedules``) step 0's set stays in force.

Obligations: with every adapter's tensors perturbed, the model equals the plan's adapters built
without the dropped layers' ones (the same tensors everywhere else; ``p=``: the layers one
training step drops, with the drops in training mode), and the dropped adapters did change the
model, so something was dropped; with ``p=``, eval mode equals the model with every adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from surgery.anchors.sublayer import ATTR, DropsAdapters, composition
from surgery.train.schedules import BaseSchedule
from surgery.transforms.registry import Anchor, Params, Target, obligation, transform


class AdapterDropParams(Params):
    layers: int | tuple[int, ...] | None = Field(None, description="drop layers 0 … k−1, or the listed layers")
    p: float | None = Field(None, gt=0, lt=1, description="while training, drop each layer with probability p per step")
    seed: int = Field(0, ge=0, description="p=: the seed of the drops")

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("the number of lowest layers to drop is at least 1")
        if isinstance(value, tuple) and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("a list of distinct layer numbers (0 is the lowest) is needed")
        return value

    @model_validator(mode="after")
    def _layers_or_p(self) -> AdapterDropParams:
        if (self.layers is None) == (self.p is None):
            raise ValueError("adapter_drop() takes layers=… (always dropped) or p=… (at random while training), "
                             "one of them")
        if self.layers is not None and "seed" in self.model_fields_set:
            raise ValueError("adapter_drop(layers=…) drops the same layers always; seed= goes with p=…")
        return self

    @property
    def dropped(self) -> frozenset[int]:
        """The layers ``layers=`` drops (none for ``p=``)."""
        if self.layers is None:
            return frozenset()
        return frozenset(range(self.layers)) if isinstance(self.layers, int) else frozenset(self.layers)


class RandomDrop(nn.Module):
    """What comes before ``adapter_drop(p=…)`` at a block: skipped (h' = h) while training in the
    steps that drop its layer (``dropped``, set by the schedule), run otherwise."""

    def __init__(self, inner: nn.Module, layer: int):
        super().__init__()
        self.inner, self.layer = inner, layer
        self.dropped = False

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropped:
            return h
        out: torch.Tensor = self.inner(x, h)
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, dropped={self.dropped}"


class RandomDropSchedule(BaseSchedule):
    """Sets each optimizer step's drops (see the module docstring); state: the step whose drops are set."""

    def __init__(self, p: AdapterDropParams, targets: Sequence[Target], model: nn.Module):
        self.p = p
        self.modules: dict[int, list[RandomDrop]] = {}
        for target in targets:
            found = composition(model, target)
            guards = [m for m in found.modules() if isinstance(m, RandomDrop)] if found is not None else []
            self.modules.setdefault(target.layer or 0, []).extend(guards)
        self.layers = sorted(self.modules)
        self.step = 0
        self._set()

    def drops(self, step: int) -> set[int]:
        """The layers dropped in optimizer step `step`."""
        generator = torch.Generator().manual_seed(self.p.seed * 1_000_003 + step)
        draws = torch.rand(len(self.layers), generator=generator, dtype=torch.float64).tolist()
        assert self.p.p is not None
        dropped = {layer for layer, u in zip(self.layers, draws) if u < self.p.p}
        if len(dropped) == len(self.layers) > 0:  # keep one, or the step may have nothing to train
            dropped.discard(self.layers[max(range(len(draws)), key=draws.__getitem__)])
        return dropped

    def _set(self) -> None:
        dropped = self.drops(self.step)
        for layer, modules in self.modules.items():
            for module in modules:
                module.dropped = layer in dropped

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.step = step + 1
        self._set()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self._set()


@transform("adapter_drop", params=AdapterDropParams, anchor=Anchor.SUBLAYER, positional=("layers",),
           reference="https://arxiv.org/abs/2010.11918")
class AdapterDrop:
    """AdapterDrop: the adapters before it at a sublayer are dropped in the given (lowest) layers, or at random while training."""

    def accepts(self, p: AdapterDropParams, target: Target, module: nn.Module) -> bool:
        return p.p is not None or target.layer in p.dropped

    def drops(self, p: AdapterDropParams, target: Target) -> bool:
        return target.layer in p.dropped

    def guard(self, p: AdapterDropParams, target: Target, inner: nn.Module) -> nn.Module:
        return RandomDrop(inner, target.layer or 0)

    def schedule(self, p: AdapterDropParams, targets: Sequence[Target], model: nn.Module) -> RandomDropSchedule | None:
        return RandomDropSchedule(p, targets, model) if p.p is not None else None

    @obligation("perturbed: equals the model built without the dropped layers' adapters", tol=0.0)
    def without_dropped(self, p, check) -> float:
        models = _Models(check)
        dropped = models.built(models.others, extra={check.step.index})
        # Where the plan drops: its targets (layers=), or those of the layers one training step drops (p=).
        here = {t.path for t in check.targets}
        if p.p is not None:
            layers = _training_drops(p, check, dropped)
            here = {t.path for t in check.targets if t.layer in layers}
        # The reference: the same adapters, with the dropped layers' targets removed from their steps.
        reference = models.without(here)
        everywhere = models.perturbed()
        gone = {path for path in models.blocks(everywhere) if path in here}
        if not gone:
            raise ValueError(f"adapter_drop drops nothing at {', '.join(sorted(here))}: the plan has no adapter there")
        # The dropped model lacks the dropped adapters (layers=), or holds them and skips them (p=).
        for model, skip in ((dropped, gone if p.p is None else set()), (reference, gone)):
            if not models.copy_into(everywhere, model, skip=skip):
                return math.inf  # other adapters than the dropped layers' are missing (or left)
        ids = check.tokens()
        result = check.logits(dropped, ids)
        if check.max_abs(result, check.logits(everywhere, ids)) < 1e-3:
            return math.inf  # the dropped adapters did not matter: nothing was tested
        return check.max_abs(result, check.logits(reference, ids))

    @obligation("p=: in eval mode equals the model with every adapter", tol=0.0)
    def eval_keeps_all(self, p, check) -> float:
        if p.p is None:
            return 0.0  # layers= builds no adapter there at all, in either mode: the obligation above
        models = _Models(check)
        dropped = models.built(models.others, extra={check.step.index})
        _training_drops(p, check, dropped)
        everywhere = models.perturbed()
        if not models.copy_into(everywhere, dropped):
            return math.inf
        for module in dropped.modules():
            if isinstance(module, RandomDrop):
                module.eval()
        ids = check.tokens()
        return check.max_abs(check.logits(dropped, ids), check.logits(everywhere, ids))


class _Models:
    """The models the obligations compare, built from the plan's other sublayer steps."""

    def __init__(self, check):
        self.check, self.plan = check, check.plan
        self.others = [s for s in self.plan.steps
                       if s.spec.anchor is Anchor.SUBLAYER and s.spec.offers(DropsAdapters) is None]

    def built(self, steps, trees=None, extra=()) -> nn.Module:
        from surgery.apply import apply_plan
        from surgery.planner import Plan

        model = copy.deepcopy(self.check.original)
        restricted = self.plan.restricted({s.index for s in steps} | set(extra))
        if trees is not None:
            restricted = Plan(self.plan.spec, self.plan.arch, list(steps), trees)
        apply_plan(restricted, model, seed=self.check.seed)
        return model.eval()

    def without(self, here: set[str]) -> nn.Module:
        kept_steps = [dataclasses.replace(s, targets=tuple(t for t in s.targets if t.path not in here))
                      for s in self.others]
        kept_trees = {anchor: {path: tree for path, tree in by_path.items() if path not in here}
                      for anchor, by_path in self.plan.restricted({s.index for s in self.others}).trees.items()}
        return self.built([s for s in kept_steps if s.targets], kept_trees)

    def perturbed(self) -> nn.Module:
        """The plan's adapters everywhere, every tensor of theirs drawn afresh (seeded)."""
        model = self.built(self.others)
        generator = self.check.generator(1)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if f".{ATTR}." in name:
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        return model

    @staticmethod
    def blocks(model: nn.Module) -> dict[str, list[torch.Tensor]]:
        """Each block's composition tensors, in registration order (a drop's wrapper adds no tensor)."""
        found: dict[str, list[torch.Tensor]] = {}
        for name, tensor in model.state_dict().items():
            if f".{ATTR}." in name:
                found.setdefault(name.partition(f".{ATTR}.")[0], []).append(tensor)
        return found

    def copy_into(self, source: nn.Module, model: nn.Module, skip: set[str] = frozenset()) -> bool:
        """Give `model` the tensors of `source` block by block; False where their blocks differ."""
        theirs, mine = self.blocks(source), self.blocks(model)
        if set(mine) != set(theirs) - set(skip):
            return False
        with torch.no_grad():
            for path, tensors in mine.items():
                if [t.shape for t in tensors] != [t.shape for t in theirs[path]]:
                    return False
                for tensor, value in zip(tensors, theirs[path]):
                    tensor.copy_(value)
        return True


def _training_drops(p: AdapterDropParams, check, model: nn.Module) -> set[int]:
    """Put `model`'s drops in training mode at the first step that drops some layer; that step's drops."""
    schedule = RandomDropSchedule(p, check.targets, model)
    schedule.step = next((t for t in range(10_000) if schedule.drops(t)), 0)
    schedule._set()
    for module in model.modules():
        if isinstance(module, RandomDrop):
            module.train()
    return schedule.drops(schedule.step)
