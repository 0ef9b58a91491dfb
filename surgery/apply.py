"""Apply a :class:`~surgery.planner.Plan` to a module tree, transactionally.

Every change goes through an :class:`Edit`, which records how to undo it. If any step raises — or
is interrupted: ``KeyboardInterrupt``, ``SystemExit``, any ``BaseException`` — the edit is rolled
back in reverse order and the model is exactly as it was: the same module objects in the same
places, the same parameter objects with the same ``requires_grad``, a bit-identical state dict.
Errors become :class:`ApplyError` (labelled with the step); interruptions are re-raised unchanged. Original modules are never modified in place — wrappers hold them, replacements keep them.

Each step builds its modules under its own RNG seed (``seed + step.index``), so applying a plan,
or a plan restricted to one step (as :mod:`surgery.verify` does), initialises identically.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from surgery import anchors
from surgery.errors import ApplyError, SurgeryError
from surgery.planner import Plan, Step
from surgery.transforms.registry import Anchor

_MISSING = object()


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _registered(obj: Any, name: str) -> bool:
    """Whether `name` is a submodule, parameter or buffer: nn.Module keeps those out of __dict__."""
    return isinstance(obj, nn.Module) and any(name in d for d in (obj._modules, obj._parameters, obj._buffers))


class Edit:
    """A journal of changes to one model; :meth:`rollback` undoes them in reverse order."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._undo: list[Callable[[], None]] = []

    def replace(self, path: str, new: nn.Module) -> nn.Module:
        """Put `new` at `path`; returns the module that was there."""
        parent_path, _, name = path.rpartition(".")
        parent = get_module(self.model, parent_path)
        old = getattr(parent, name)
        setattr(parent, name, new)
        self._undo.append(lambda: setattr(parent, name, old))
        return old

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, restoring the old value (or absence) on rollback."""
        if _registered(obj, name):
            old = getattr(obj, name)
        else:
            old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)

        def undo():
            if old is _MISSING:
                if name in getattr(obj, "__dict__", {}) or _registered(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self._undo.append(undo)

    def requires_grad(self, param: torch.Tensor, flag: bool) -> None:
        old = param.requires_grad
        param.requires_grad_(flag)
        self._undo.append(lambda: param.requires_grad_(old))

    def hook(self, handle) -> None:
        """Take ownership of a removable hook handle (``register_forward_*_hook``)."""
        self._undo.append(handle.remove)

    def on_rollback(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _run_step(step: Step, model: nn.Module, edit: Edit, installers: dict[Anchor, anchors.Installer],
              seed: int) -> None:
    anchor = step.spec.anchor
    if anchor not in installers:
        installers[anchor] = anchors.kind(anchor).installer(model, edit)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + step.index)
        installers[anchor].add(step)


def apply_plan(plan: Plan, model: nn.Module, *, seed: int = 0, edit: Edit | None = None) -> Edit:
    """Apply every step of `plan` to `model` in place; on any failure roll back and raise ApplyError.

    An interruption (Ctrl-C, ``SystemExit``) also rolls back, and is re-raised as it came.
    """
    edit = edit or Edit(model)
    step = None
    try:
        if plan.freezes_base:
            for param in model.parameters():
                if param.requires_grad:
                    edit.requires_grad(param, False)
        installers: dict[Anchor, anchors.Installer] = {}  # one per anchor kind, in order of first use
        for step in plan.steps:
            _run_step(step, model, edit, installers, seed)
        step = None
        for anchor, installer in installers.items():  # wrappers are built once every step has run
            installer.finish(plan.trees.get(anchor, {}))
    except BaseException as e:
        edit.rollback()
        if not isinstance(e, Exception):  # an interruption, not a failure of the step: pass it on as is
            raise
        if step is None:
            raise ApplyError(f"applying the plan failed: {e}") from e
        where = f"{step.span.file}:{step.span.line}:{step.span.column}"
        if isinstance(e, SurgeryError):
            e.message = f"step {step.index} ({step.transform} at {where}) failed: {e.message}"
            raise
        raise ApplyError(f"step {step.index} ({step.transform} at {where}) failed: {type(e).__name__}: {e}",
                         step.span) from e
    return edit
