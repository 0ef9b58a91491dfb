"""ReLoRA: LoRA whose update is merged into the base and restarted, so the total update outgrows rank r.

Between restarts a layer computes exactly LoRA's y = W x + b + s · B A x (s = α / r; :mod:`lora`'s
adapter is reused). After every ``restart_every``-th optimizer step (steps ``k·restart_every − 1``,
0-based) each adapted layer is restarted:

    W ← W + s · B A          A ← Kaiming-uniform (as at init)          B ← 0

so the layer — and the model — compute the same function across the restart, while the next B A
starts a fresh rank-r update: after n restarts the accumulated change of W has rank up to (n+1)·r.
The optimizer state of A and B is reset with it: ``reset = 1`` zeroes the moments, ``reset = q`` in
(0, 1) magnitude-prunes them (the fraction q with the smallest |value| of each state tensor set to
zero, the rest kept; Lialin et al. prune 99 %, ``reset = 0.99``), ``reset = 0`` keeps them. Adam's
step count is kept, so its bias correction stays small and a zeroed moment makes the first update
after a restart large: hence the re-warm-up. The learning rate of the i-th step after a restart is
scaled by min(1, (i + 1) / (warmup + 1)); on top of a cosine scheduler (``surgery train``'s
default) this is the paper's jagged cosine schedule. Before the first restart the scale is 1 (the
run's own warm-up applies).

Restarts draw A from a generator seeded by the restart count and the layer, so a run resumed from
saved schedule state restarts exactly as the uninterrupted one would.

Lialin et al. 2023, https://arxiv.org/abs/2307.05695.

Obligations: LoRA's (identity at init; merged == unmerged; unmerge restores the weights), and a
restart leaves the model's logits unchanged (B perturbed so the merged update is not zero) and
resets or prunes the adapter's optimizer state to the declared fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgery.errors import SurgeryError
from surgery.layers import SurgeryLinear, linear_weight
from surgery.train.schedules import BaseSchedule
from surgery.transforms.lora import LoRA, LoraAdapter, LoraParams, _perturb_b
from surgery.transforms.registry import Anchor, Target, obligation, transform


class ReLoraParams(LoraParams):
    restart_every: int = Field(..., ge=1, description="optimizer steps between merge-and-restarts")
    warmup: int = Field(0, ge=0, description="steps of linear learning-rate warm-up after each restart")
    reset: float = Field(1.0, ge=0, le=1, description="fraction of the adapter's optimizer state zeroed "
                                                       "at a restart (1: all; 0.99: prune 99 % by magnitude)")


def _adapter(layer: nn.Module, path: str) -> LoraAdapter:
    """The layer's adapter, which must be ReLoRA's alone: merging B A into W is exact only then (an
    adapter composed around or beside it would see the changed W)."""
    if not isinstance(layer, SurgeryLinear) or not isinstance(layer.adapter, LoraAdapter):
        raise SurgeryError(f"relora at {path} is composed with other transforms; a restart merges the update "
                           "into the base weight, which is exact only where relora is the layer's only adapter")
    if hasattr(layer.base, "dequantized") or layer.merged:
        raise SurgeryError(f"relora at {path}: the base weight is quantized or merged, so a restart cannot "
                           "fold the update into it")
    return layer.adapter


def prune_state(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], reset: float) -> None:
    """Zero the fraction `reset` of smallest-magnitude entries of every state tensor of `params`
    (all of them at ``reset = 1``); scalar entries (Adam's step) are kept."""
    if reset == 0:
        return
    for param in params:
        for value in optimizer.state.get(param, {}).values():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            n_zero = math.ceil(reset * value.numel())
            if n_zero >= value.numel():
                value.zero_()
            elif n_zero > 0:
                threshold = value.abs().flatten().kthvalue(n_zero).values
                # Ties at the threshold go too, so at most (1 − reset) of the entries survive.
                value.masked_fill_(value.abs() <= threshold, 0)


def restart(layers: Sequence[tuple[str, SurgeryLinear]], optimizer: torch.optim.Optimizer | None,
            reset: float, restarts: int) -> None:
    """Merge every layer's B A into its base weight, draw A afresh and zero B; prune the optimizer state."""
    with torch.no_grad():
        for i, (path, layer) in enumerate(layers):
            adapter = _adapter(layer, path)
            weight, _ = linear_weight(layer.base)  # a view of the stored tensor (GPT-2's Conv1D transposed)
            update = (adapter.lora_B.weight @ adapter.lora_A.weight) * adapter.scaling
            weight.add_(update.to(weight.dtype))
            generator = torch.Generator(device=adapter.lora_A.weight.device).manual_seed(1_000_003 * restarts + i)
            nn.init.kaiming_uniform_(adapter.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(adapter.lora_B.weight)
            if optimizer is not None:
                prune_state(optimizer, list(adapter.parameters()), reset)


class ReLoraSchedule(BaseSchedule):
    """Restarts every ``restart_every`` steps and the re-warm-up after each; state: restarts so far."""

    def __init__(self, p: ReLoraParams, targets: Sequence[Target], model: nn.Module):
        self.p = p
        self.layers = [(t.path, model.get_submodule(t.path)) for t in targets]
        for path, layer in self.layers:
            _adapter(layer, path)  # refuse a composition now, not at the first restart
        self.restarts = 0
        self.last_restart = -1  # the optimizer step after which the last restart happened

    def lr_scale(self, step: int) -> float:
        if self.restarts == 0:
            return 1.0
        return min(1.0, (step - self.last_restart) / (self.p.warmup + 1))

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if (step + 1) % self.p.restart_every == 0:
            self.restarts += 1
            restart(self.layers, optimizer, self.p.reset, self.restarts)
            self.last_restart = step

    def state_dict(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "last_restart": self.last_restart}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.restarts, self.last_restart = int(state["restarts"]), int(state["last_restart"])


@transform("relora", params=ReLoraParams, anchor=Anchor.LINEAR, positional=("r", "restart_every", "warmup"),
           reference="https://arxiv.org/abs/2307.05695")
class ReLoRA:
    """LoRA merged into the base and restarted every few steps while training (base frozen, A/B trainable)."""

    freezes_base = True
    # No PEFT export: after a restart the base weights differ from the original model's, which a
    # PEFT adapter is applied to. The surgery format (or --merge) holds the trained base.

    def accepts(self, p: ReLoraParams, target: Target, module: nn.Module) -> bool:
        return LoRA().accepts(p, target, module)

    def adapter(self, p: ReLoraParams, base: nn.Module, target: Target) -> nn.Module:
        return LoRA().adapter(p, base, target)

    def schedule(self, p: ReLoraParams, targets: Sequence[Target], model: nn.Module) -> ReLoraSchedule:
        return ReLoraSchedule(p, targets, model)

    identity_layer = LoRA.identity_layer
    identity_model = LoRA.identity_model
    merge_equal = LoRA.merge_equal
    unmerge_exact = LoRA.unmerge_exact

    @obligation("merge-and-restart leaves the logits unchanged (B perturbed), relative", tol=1e-5)
    def restart_equal(self, p: ReLoraParams, check: Any) -> float:
        layers = [(path, layer) for path, layer, _ in check.linear_layers()]
        with torch.no_grad():
            for i, (_, layer) in enumerate(layers):
                _perturb_b(layer, check.generator(i))
            tokens = check.tokens()
            before = check.logits(check.surgered, tokens)
            if torch.equal(before, check.logits(check.original, tokens)):
                return 1.0  # the perturbation did not reach the logits: nothing would be tested
            restart(layers, None, p.reset, restarts=1)
            after = check.logits(check.surgered, tokens)
        return check.max_abs(after, before) / max(1.0, before.abs().max().item())

    @obligation("a restart resets the adapter's optimizer state to the declared fraction", tol=0.0)
    def state_reset(self, p: ReLoraParams, check: Any) -> float:
        layers = [(path, layer) for path, layer, _ in check.linear_layers()]
        params = [q for _, layer in layers for q in layer.adapter.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for i, q in enumerate(params):
            q.grad = torch.randn(q.shape, generator=check.generator(i)).to(q.dtype)
        optimizer.step()
        optimizer.zero_grad()
        restart(layers, optimizer, p.reset, restarts=1)
        errors = [0.0]
        for q in params:
            for value in optimizer.state[q].values():
                if torch.is_tensor(value) and value.dim() > 0:
                    kept = value.count_nonzero().item() / value.numel()
                    errors.append(max(0.0, kept - (1 - p.reset)))
        return max(errors)
