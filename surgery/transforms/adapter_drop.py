"""AdapterDrop: no adapters in the lowest layers, for training and inference alike.

``adapter_drop(layers=k)`` drops the adapters of layers 0 … k−1 at the sublayers it selects;
``layers=[i, j, …]`` names the layers. It drops what comes *before* it at each sublayer, so it
follows the adapters: ``layers: adapter(houlsby) + adapter_drop(layers=3)``, or a later rule
``attn, mlp: adapter_drop(layers=3)``. A dropped adapter is not built at all: those layers compute
exactly the base sublayer (the speed-up at inference that the paper measures, and no parameters
that would never train). Rücklé et al. 2021, https://arxiv.org/abs/2010.11918.

Not here: the paper's robust variant, which samples how many layers to drop at every training
step; that is a training schedule (it needs a per-step sample shared by all layers), not a change
to the model's structure.

Obligation: with every adapter's tensors perturbed, the model equals the plan's adapters built
without the dropped layers' ones (and the same tensors everywhere else): exactly those adapters
are gone, the others unchanged; and the dropped adapters did change the model, so something was
dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from pydantic import Field, field_validator
from torch import nn

from surgery.anchors.sublayer import DropsAdapters
from surgery.transforms.registry import Anchor, Params, Target, obligation, transform


class AdapterDropParams(Params):
    layers: int | tuple[int, ...] = Field(..., description="drop layers 0 … k−1, or the listed layers")

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        if isinstance(value, int) and value < 1:
            raise ValueError("the number of lowest layers to drop is at least 1")
        if isinstance(value, tuple) and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("a list of distinct layer numbers (0 is the lowest) is needed")
        return value

    @property
    def dropped(self) -> frozenset[int]:
        return frozenset(range(self.layers)) if isinstance(self.layers, int) else frozenset(self.layers)


@transform("adapter_drop", params=AdapterDropParams, anchor=Anchor.SUBLAYER, positional=("layers",),
           reference="https://arxiv.org/abs/2010.11918")
class AdapterDrop:
    """AdapterDrop: the adapters before it at a sublayer are not built in the given (lowest) layers."""

    def accepts(self, p: AdapterDropParams, target: Target, module: nn.Module) -> bool:
        return target.layer in p.dropped

    def drops(self, p: AdapterDropParams, target: Target) -> bool:
        return target.layer in p.dropped

    @obligation("perturbed: equals the model built without the dropped layers' adapters", tol=0.0)
    def without_dropped(self, p, check) -> float:
        from surgery.apply import apply_plan
        from surgery.planner import Plan

        plan = check.plan
        others = [s for s in plan.steps if s.spec.anchor is Anchor.SUBLAYER and s.spec.offers(DropsAdapters) is None]
        here = {t.path for t in check.targets}

        def built(steps, trees=None, extra=()) -> nn.Module:
            model = copy.deepcopy(check.original)
            restricted = plan.restricted({s.index for s in steps} | set(extra))
            if trees is not None:
                restricted = Plan(plan.spec, plan.arch, list(steps), trees)
            apply_plan(restricted, model, seed=check.seed)
            return model.eval()

        everywhere = built(others)
        dropped = built(others, extra={check.step.index})
        # The reference: the same adapters, with the dropped layers' targets removed from their steps.
        kept_steps = [dataclasses.replace(s, targets=tuple(t for t in s.targets if t.path not in here))
                      for s in others]
        kept_trees = {anchor: {path: tree for path, tree in by_path.items() if path not in here}
                      for anchor, by_path in plan.restricted({s.index for s in others}).trees.items()}
        reference = built([s for s in kept_steps if s.targets], kept_trees)

        generator = check.generator(1)
        with torch.no_grad():
            for name, tensor in everywhere.state_dict().items():
                if ".surgery_sublayer." in name:
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        state = everywhere.state_dict()
        gone = {k for k in state if any(k.startswith(f"{path}.surgery_sublayer.") for path in here)}
        if not gone:
            raise ValueError(f"adapter_drop drops nothing at {', '.join(sorted(here))}: the plan has no adapter there")
        for model in (dropped, reference):
            if set(model.state_dict()) != set(state) - gone:
                return math.inf  # other adapters than the dropped layers' are missing (or left)
            model.load_state_dict({k: v for k, v in state.items() if k not in gone})
        ids = check.tokens()
        result = check.logits(dropped, ids)
        if check.max_abs(result, check.logits(everywhere, ids)) < 1e-3:
            return math.inf  # the dropped adapters did not matter: nothing was tested
        return check.max_abs(result, check.logits(reference, ids))
