"""LoRA: a trainable low-rank update beside a frozen linear layer.

    y = W x + b + (α / r) · B A dropout(x)          (α / √r with ``rslora=true``)

A ∈ ℝ^{r×in} starts Kaiming-uniform (PEFT's default) or Gaussian N(0, 1/r); B ∈ ℝ^{out×r} starts
at zero, so the layer is unchanged at initialisation. Hu et al. 2021, https://arxiv.org/abs/2106.09685.

Obligations: identity at init (layer and whole model); merged == unmerged (with B perturbed so the
update is not zero); unmerge restores the original weight tensors bit-exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from surgery.errors import SpecError
from surgery.layers import SurgeryLinear, features, linear_forward, linear_weight
from surgery.transforms.registry import Anchor, Params, obligation, transform


class LoraParams(Params):
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="scale numerator; defaults to r (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rslora: bool = False

    @property
    def scaling(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.r) if self.rslora else alpha / self.r


class LoraAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, p: LoraParams, dtype, device):
        super().__init__()
        self.lora_A = nn.Linear(in_features, p.r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(p.r, out_features, bias=False, dtype=dtype, device=device)
        self.dropout = nn.Dropout(p.dropout) if p.dropout else nn.Identity()
        self.scaling = p.scaling
        if device != torch.device("meta"):
            if p.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A.weight, std=1 / p.r)
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, inner) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        # Cast only where the dtypes differ: a same-dtype ``.to`` returns x itself, but torch.export
        # records it as two nodes (a cast and a metadata check), which every graph capture then traces.
        z = x if x.dtype == dtype else x.to(dtype)
        out = self.lora_B(self.lora_A(self.dropout(z))) * self.scaling
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        return inner(x) + self.delta(x, inner)

    def merge(self, weight: torch.Tensor, bias):
        update = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return weight + update.to(weight.dtype), bias


@transform("lora", params=LoraParams, anchor=Anchor.LINEAR, positional=("r",),
           reference="https://arxiv.org/abs/2106.09685")
class LoRA:
    """Low-rank adaptation of linear layers (base frozen, A/B trainable)."""

    freezes_base = True
    # Fields PEFT's LoraConfig also takes per module: steps differing only in these export as one adapter.
    peft_patterns = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}

    def accepts(self, p: LoraParams, target, module: nn.Module) -> bool:
        # Beyond min(in, out) the update B·A has no more rank to gain: only parameters (and, for an
        # absurd r, an allocation failure at apply time), so the spec is refused where it is wrong.
        limit = min(features(module))
        if p.r > limit:
            raise SpecError(f"lora() rank r={p.r} exceeds min(in, out) = {limit} of {target.path}; "
                            f"a rank above that adds parameters, not expressiveness (use r ≤ {limit})")
        return True

    def adapter(self, p: LoraParams, base: nn.Module, target) -> nn.Module:
        in_f, out_f = features(base)
        weight, _ = linear_weight(base) if not hasattr(base, "compute_dtype") else (None, None)
        dtype = getattr(base, "compute_dtype", None) or weight.dtype
        device = next(base.parameters()).device
        return LoraAdapter(in_f, out_f, p, dtype, device)

    def peft(self, p: LoraParams, targets) -> dict:
        return {"peft_type": "LORA", "r": p.r, "lora_alpha": p.r if p.alpha is None else p.alpha,
                "lora_dropout": p.dropout, "use_rslora": p.rslora, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True}

    @obligation("identity at init: layer output unchanged", tol=1e-6)
    def identity_layer(self, p, check) -> float:
        return check.layer_identity_error()

    @obligation("identity at init: model logits unchanged", tol=1e-5)
    def identity_model(self, p, check) -> float:
        return check.logits_identity_error()

    @obligation("merged == unmerged (B perturbed)", tol=1e-4)
    def merge_equal(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, _) in enumerate(check.linear_layers()):
            with torch.no_grad():
                _perturb_b(layer, check.generator(i))
                x = check.randn(3, layer.in_features, salt=i)
                unmerged = layer(x)
                layer.merge()
                merged = layer(x)
                layer.unmerge()
            errors.append(check.max_abs(merged, unmerged) / max(1.0, unmerged.abs().max().item()))
        return max(errors)

    @obligation("unmerge restores the weights bit-exactly", tol=0.0)
    def unmerge_exact(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, original) in enumerate(check.linear_layers()):
            with torch.no_grad():
                _perturb_b(layer, check.generator(i))
                layer.merge()
                layer.unmerge()
                x = check.randn(3, layer.in_features, salt=i)
                same = torch.equal(linear_weight(layer.base)[0], linear_weight(original)[0])
                errors.append(0.0 if same and torch.equal(layer.base(x), linear_forward(x, original)) else 1.0)
        return max(errors)


def _perturb_b(layer: SurgeryLinear, generator: torch.Generator) -> None:
    """Draw B at random so the update is not zero (a merge of B = 0 would prove nothing)."""
    for module in layer.adapter.modules():
        if isinstance(module, LoraAdapter):
            module.lora_B.weight.normal_(generator=generator)
