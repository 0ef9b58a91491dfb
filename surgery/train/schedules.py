"""Schedules: every step's training-time behaviour behind one object, for any training loop.

A transform offering :class:`~surgery.transforms.registry.Schedule` contributes a
:class:`~surgery.transforms.registry.StepSchedule` per step; :class:`Schedules` holds them in plan
order and is what a loop calls. In a hand-written loop one call replaces ``optimizer.step()``::

    schedules = Schedules(result)                 # result = surgery.compile(model, spec)
    for batch in batches:
        outputs = model(**batch)
        loss = schedules.loss(batch, outputs)     # the model's loss, with the steps' terms
        loss.backward()
        schedules.optimizer_step(optimizer)       # scaled LR, optimizer.step(), then e.g. restarts
        optimizer.zero_grad()

With transformers' ``Trainer`` the same calls come from :class:`surgery.train.SurgeryCallback`.

The learning-rate scale of step t is the product of every step's ``lr_scale(t)``. It is applied to
each parameter group for the one ``optimizer.step()`` and taken off again right after, unless
something (a scheduler) set a new rate in between: so it composes with any scheduler (a
``LambdaLR`` recomputes from its base rates) and with none.

State (``state_dict``) is the optimizer steps taken and each step's own state: JSON values and
tensors (AdaLoRA's importance statistics). :func:`surgery.io.save` writes the JSON into
``surgery.json`` and the tensors into ``schedules.safetensors`` when the result carries schedules
(:func:`split_tensors`), and a run continued from it is bit-exact with one that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.transforms.registry import Schedule, StepSchedule


class BaseSchedule:
    """A :class:`StepSchedule` that does nothing: subclasses override what their step needs."""

    def lr_scale(self, step: int) -> float:
        return 1.0

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        return None

    def loss(self, batch: Mapping[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


TENSOR = "__tensor__"  # {TENSOR: key} stands for a tensor stored beside the JSON


def split_tensors(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(`state` with every tensor replaced by ``{TENSOR: key}``, the tensors by key)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            tensors[path] = value.detach().cpu().contiguous()
            return {TENSOR: path}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    return walk(state, ""), tensors


def join_tensors(state: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(state, Mapping):
        if set(state) == {TENSOR}:
            return tensors[state[TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_tensors(v, tensors) for v in state]
    return state


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (or anyone's) wrapper, whose ``state`` is per parameter."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Schedules:
    """The training-time behaviour of a surgered model: every scheduled step of its plan, in order."""

    def __init__(self, result: Any):
        """`result`: what :func:`surgery.compile` returned; the schedules are attached to it (as
        ``result.schedules``), so :meth:`surgery.api.Result.save` writes their state."""
        self.model: nn.Module = result.model
        self.step = 0  # optimizer steps taken
        self.hooks: dict[int, StepSchedule] = {}
        for step in result.plan.steps:
            impl = step.spec.offers(Schedule)
            hook = impl.schedule(step.params, step.targets, self.model) if impl is not None else None
            if hook is not None:
                self.hooks[step.index] = hook
        self._scaled: list[tuple[dict, float, float]] = []
        result.schedules = self

    def __bool__(self) -> bool:
        return bool(self.hooks)

    @property
    def batch_keys(self) -> set[str]:
        """Batch entries the steps read (e.g. T-Few's ``answer``) that are not inputs of the model."""
        return {key for hook in self.hooks.values() for key in getattr(hook, "batch_keys", ())}

    def lr_scale(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        return math.prod(hook.lr_scale(step) for hook in self.hooks.values())

    def loss(self, batch: Mapping[str, Any], outputs: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss: `loss` (default ``outputs.loss``) passed through every step's ``loss``."""
        loss = outputs.loss if loss is None else loss
        for hook in self.hooks.values():
            loss = hook.loss(batch, outputs, loss)
        return loss

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Scale every group's learning rate by :meth:`lr_scale` for the coming ``optimizer.step()``."""
        scale = self.lr_scale()
        self._scaled = []
        if scale != 1.0:
            for group in unwrap(optimizer).param_groups:
                scaled = group["lr"] * scale
                self._scaled.append((group, group["lr"], scaled))
                group["lr"] = scaled

    def after_optimizer_step(self, optimizer: Any) -> None:
        """Take the scale off again (unless a scheduler already set a new rate), run every step's
        ``on_step``, and count the step."""
        for group, base, scaled in self._scaled:
            if group["lr"] == scaled:
                group["lr"] = base
        self._scaled = []
        for hook in self.hooks.values():
            hook.on_step(self.step, unwrap(optimizer))
        self.step += 1

    def optimizer_step(self, optimizer: Any) -> None:
        """The one call for a hand-written loop, in place of ``optimizer.step()``."""
        self.before_optimizer_step(optimizer)
        optimizer.step()
        self.after_optimizer_step(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "steps": {str(i): hook.state_dict() for i, hook in self.hooks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("steps", {})
        if set(saved) != {str(i) for i in self.hooks}:
            raise SurgeryError(f"the saved schedule state is for steps {sorted(saved)}, this plan schedules "
                               f"steps {sorted(str(i) for i in self.hooks)}")
        self.step = int(state["step"])
        for i, hook in self.hooks.items():
            hook.load_state_dict(saved[str(i)])


def load(out_dir: Any) -> Any:
    """A saved result to continue training: a :class:`surgery.api.Result` whose model is
    :func:`surgery.load`'s and whose ``schedules`` carry the saved state (bit-exact continuation)."""
    from pathlib import Path

    from surgery import io
    from surgery.api import Result, skeleton
    from surgery.planner import build_plan

    out_dir = Path(out_dir)
    model = io.load(out_dir)
    state = io.schedule_state(out_dir)
    if state is None:
        raise SurgeryError(f"{out_dir} holds no training schedule state (it was not saved from a training run)")
    manifest = io.read_manifest(out_dir)
    plan = build_plan(io.saved_spec(out_dir, manifest), skeleton(model))  # the plan as resolved on the base model
    if manifest.merged_steps:
        plan = plan.restricted({s.index for s in plan.steps} - set(manifest.merged_steps))
    result = Result(model, plan, None, None, seed=manifest.seed)  # type: ignore[arg-type]
    Schedules(result).load_state_dict(state)
    return result
