"""IA³: learned vectors rescale the keys, the values and the FFN intermediate activation.

    k = l_k ⊙ (W_k x + b_k)        v = l_v ⊙ (W_v x + b_v)        y = W_down (l_ff ⊙ h) + b_down

l_k, l_v ∈ ℝ^{out} scale the *output* of the key and value projections (option ``"out"``, bias
included, as PEFT does); l_ff ∈ ℝ^{in} scales the *input* of the FFN down projection, i.e. the
intermediate activation h (option ``"in"``). Every vector starts at 1, so the layer is unchanged at
initialisation. Because the scaling is diagonal it folds into the layer exactly:

    out:  W' = diag(l) W,  b' = l ⊙ b          in:  W' = W diag(l),  b' = b

Training loss: ``ia3(loss=tfew)`` trains with T-Few's L_LM + L_UL (unlikelihood of the wrong answer
choices) + L_LN (softmax over length-normalised choice scores), on multiple-choice batches; the
formulas are in :mod:`surgery.train.losses`. ``loss=lm`` (the default) keeps the model's own loss.

Liu et al. 2022, https://arxiv.org/abs/2205.05638; PEFT's ``IA3Config`` is the reference
implementation (its ``ia3_l`` is stored [out, 1] / [1, in]; ours is the plain vector).

Obligations: identity at init (layer and whole model); merged == unmerged with the vectors perturbed
away from 1; unmerge restores the original weight tensors bit-exactly.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import SurgeryError
from surgery.layers import SurgeryLinear, features, linear_forward, linear_weight
from surgery.train.schedules import BaseSchedule
from surgery.transforms.registry import Anchor, Params, obligation, transform


class IA3Params(Params):
    """Where IA³ scales follows from the role it attaches to; its one option is the training loss."""

    loss: Literal["lm", "tfew"] = Field("lm", description="lm: the model's loss; tfew: T-Few's "
                                        "L_LM + L_UL + L_LN on multiple-choice batches")


class TFewSchedule(BaseSchedule):
    """T-Few's loss in place of the model's, on batches that carry ``answer`` (see surgery.train.losses)."""

    batch_keys = ("answer",)  # read here, never given to the model

    def loss(self, batch, outputs, loss: torch.Tensor) -> torch.Tensor:
        from surgery.train.losses import tfew_loss

        if "answer" not in batch or "labels" not in batch:
            raise SurgeryError("ia3(loss=tfew) trains on multiple-choice batches: C sequences per example "
                               "(prompt + choice) with `labels` on the choice tokens and `answer` per example")
        return tfew_loss(outputs.logits, batch["labels"], batch["answer"])


class IA3Adapter(nn.Module):
    """One learned scaling vector on the output (``side="out"``) or the input (``side="in"``) of a linear."""

    def __init__(self, side: str, size: int, dtype, device):
        super().__init__()
        self.side = side
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        # Cast only where the product's dtype differs (see LoraAdapter.delta: a same-dtype ``.to`` is
        # two nodes under torch.export and nothing in eager).
        if self.side == "out":
            y = inner(x)
            out = y * self.ia3_l
            return out if out.dtype == y.dtype else out.to(y.dtype)
        z = x * self.ia3_l
        return inner(z if z.dtype == x.dtype else z.to(x.dtype))

    def merge(self, weight: torch.Tensor, bias):
        scale = self.ia3_l.detach().to(weight.dtype)
        if self.side == "out":
            return weight * scale[:, None], None if bias is None else bias * scale.to(bias.dtype)
        return weight * scale[None, :], bias  # scaling the input leaves the bias alone

    def extra_repr(self) -> str:
        return f"side={self.side}, size={self.ia3_l.numel()}"


@transform("ia3", params=IA3Params, anchor=Anchor.LINEAR, reference="https://arxiv.org/abs/2205.05638")
class IA3:
    """(IA)³: learned vectors scale keys, values and the FFN activation (base frozen, vectors trainable)."""

    freezes_base = True
    # Which side of the layer the vector scales: keys/values are outputs, the FFN activation is an input.
    _side = {"attn.k": "out", "attn.v": "out", "mlp.down": "in"}

    def accepts(self, p: IA3Params, target, module) -> str | None:
        return self._side.get(target.role)

    def adapter(self, p: IA3Params, base: nn.Module, target) -> nn.Module:
        in_f, out_f = features(base)
        dtype = getattr(base, "compute_dtype", None) or linear_weight(base)[0].dtype
        device = next(base.parameters()).device
        side = target.option or self._side[target.role]
        return IA3Adapter(side, out_f if side == "out" else in_f, dtype, device)

    def schedule(self, p: IA3Params, targets, model):
        # One T-Few loss per plan, however many ia3 steps: each replaces the loss with the same value.
        return TFewSchedule() if p.loss == "tfew" else None

    def peft(self, p: IA3Params, targets) -> dict:
        # Full module paths: PEFT matches a key that equals or ends with an entry, and checks that
        # feedforward_modules ⊆ target_modules, which full paths satisfy by construction.
        return {"peft_type": "IA3", "target_modules": sorted(t.path for t in targets),
                "feedforward_modules": sorted(t.path for t in targets if t.option == "in"),
                "fan_in_fan_out": False, "init_ia3_weights": True}

    def peft_tensors(self, p: IA3Params, target, adapter: "IA3Adapter") -> dict:
        # PEFT stores the vector as a column [out, 1] for outputs and a row [1, in] for inputs.
        shape = (-1, 1) if adapter.side == "out" else (1, -1)
        return {"ia3_l": adapter.ia3_l.detach().reshape(shape)}

    @staticmethod
    @contextlib.contextmanager
    def _perturbed(layer: SurgeryLinear, generator: torch.Generator):
        """Vectors drawn around 1 (so the layer really changes) for the block, then put back."""
        vectors = [m.ia3_l for m in layer.adapter.modules() if isinstance(m, IA3Adapter)]
        saved = [v.detach().clone() for v in vectors]
        with torch.no_grad():
            for v in vectors:
                v.copy_(1 + 0.5 * torch.randn(v.shape, generator=generator).to(v.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for v, s in zip(vectors, saved):
                    v.copy_(s)

    @obligation("identity at init: layer output unchanged", tol=1e-6)
    def identity_layer(self, p, check) -> float:
        return check.layer_identity_error()

    @obligation("identity at init: model logits unchanged", tol=1e-6)
    def identity_model(self, p, check) -> float:
        return check.logits_identity_error()

    @obligation("merged == unmerged (vectors perturbed), relative", tol=1e-5)
    def merge_equal(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, original) in enumerate(check.linear_layers()):
            x = check.randn(3, layer.in_features, salt=i)
            with self._perturbed(layer, check.generator(i)), torch.no_grad():
                unmerged = layer(x)
                if torch.equal(unmerged, original(x)):
                    errors.append(1.0)  # the perturbation did not reach the output: nothing was tested
                    continue
                layer.merge()
                merged = layer(x)
                layer.unmerge()
            errors.append(check.max_abs(merged, unmerged) / max(1.0, unmerged.abs().max().item()))
        return max(errors)

    @obligation("unmerge restores the weights bit-exactly", tol=0.0)
    def unmerge_exact(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, original) in enumerate(check.linear_layers()):
            x = check.randn(3, layer.in_features, salt=i)
            with self._perturbed(layer, check.generator(i)), torch.no_grad():
                layer.merge()
                changed = not torch.equal(linear_weight(layer.base)[0], linear_weight(original)[0])
                layer.unmerge()
                w, b = linear_weight(layer.base)
                w0, b0 = linear_weight(original)
                same = torch.equal(w, w0) and (b is None) == (b0 is None) and (b is None or torch.equal(b, b0))
                same = same and torch.equal(layer.base(x), linear_forward(x, original))
            errors.append(0.0 if changed and same else 1.0)
        return max(errors)
