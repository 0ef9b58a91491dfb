"""The one wrapper every linear-anchored transform lives in, and the composition operators.

``SurgeryLinear(base, adapter)`` replaces an ``nn.Linear`` (or GPT-2 ``Conv1D``). ``adapter`` is a
transform module or a composition of them:

* :class:`Sequential` — ``a + b``: ``b`` wraps ``a``: y = b(x, λz. a(z, base)).
* :class:`Parallel` — ``a | b``: y = base(x) + Σᵢ (branchᵢ(x, base) − base(x)); a branch that
  defines ``delta(x, inner)`` contributes that directly, so the base runs once.

Merging folds the composition into one weight: ``merge`` keeps the original tensors and ``unmerge``
puts them back, so unmerging restores the weights bit-exactly (unlike subtracting ΔW again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of a Linear, GPT-2 Conv1D (stored [in, out]) or anything with ``dequantized()``."""
    if hasattr(module, "dequantized"):
        return module.dequantized(), module.bias
    if type(module).__name__ == "Conv1D":
        return module.weight.t(), module.bias
    return module.weight, module.bias


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class Sequential(nn.ModuleList):
    """``a + b`` at one linear: each item wraps the one before it."""

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        for module in self:
            inner = _bind(module, inner)
        return inner(x)

    @property
    def mergeable(self) -> bool:
        return all(getattr(m, "mergeable", True) for m in self)

    def merge(self, weight, bias):
        for module in self:
            weight, bias = module.merge(weight, bias)
        return weight, bias


class Parallel(nn.ModuleList):
    """``a | b`` at one linear: both see the same input; their contributions are summed."""

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        base = inner(x)

        def memo(z):
            return base if z is x else inner(z)

        out = base
        for module in self:
            if hasattr(module, "delta"):
                out = out + module.delta(x, memo)
            else:
                out = out + (module(x, memo) - base)
        return out

    @property
    def mergeable(self) -> bool:
        return all(getattr(m, "mergeable", True) for m in self)

    def merge(self, weight, bias):
        new_w, new_b = weight, bias
        for module in self:
            w, b = module.merge(weight, bias)
            new_w = new_w + (w - weight)
            if bias is not None or b is not None:
                zero = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                base_b = zero if bias is None else bias
                new_b = (base_b if new_b is None else new_b) + ((zero if b is None else b) - base_b)
        return new_w, new_b


def _bind(module, inner):
    return lambda z: module(z, inner)


class SurgeryLinear(nn.Module):
    """A linear layer with composed transforms; ``base`` is the original (or replaced) layer."""

    def __init__(self, base: nn.Module, adapter: nn.Module | None):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self._original: tuple | None = None  # (weight, bias) while merged

    @property
    def in_features(self) -> int:
        return features(self.base)[0]

    @property
    def out_features(self) -> int:
        return features(self.base)[1]

    @property
    def weight(self) -> torch.Tensor:
        return linear_weight(self.base)[0]

    @property
    def mergeable(self) -> bool:
        return getattr(self.base, "mergeable", True) and (self.adapter is None or getattr(self.adapter, "mergeable", True))

    @property
    def merged(self) -> bool:
        return self._original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._original is not None or self.adapter is None:
            return self.base(x)
        return self.adapter(x, self.base)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The single (weight [out, in], bias) computing this layer; the layer itself is not changed."""
        weight, bias = linear_weight(self.base)
        with torch.no_grad():
            if self.adapter is None:
                return weight.detach().clone(), None if bias is None else bias.detach().clone()
            w, b = self.adapter.merge(weight.detach(), None if bias is None else bias.detach())
            return w.to(weight.dtype), None if b is None else b.to(weight.dtype)

    def merge(self) -> None:
        """Fold the adapters into the base weights (kept aside for :meth:`unmerge`)."""
        if self.merged:
            return
        if not self.mergeable:
            raise SurgeryError("this layer cannot be merged: its base is replaced (e.g. quantized) "
                               "or one of its transforms does not fold into a weight")
        w, b = self.merged_weights()
        base = self.base
        self._original = (base.weight, base.bias)
        if type(base).__name__ == "Conv1D":
            w = w.t().contiguous()
        base.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            base.bias = nn.Parameter(b, requires_grad=False)

    def unmerge(self) -> None:
        """Put the original weight tensors back (bit-exact: they were never modified)."""
        if not self.merged:
            return
        self.base.weight, self.base.bias = self._original
        self._original = None

    def to_plain(self) -> nn.Module:
        """A plain ``nn.Linear`` with the folded weights (for ``--merge`` exports)."""
        w, b = self.merged_weights()
        out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if b is not None:
                out.bias.copy_(b)
        out.requires_grad_(False)
        return out


def linear_forward(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x @ Wᵀ + b`` for a module's weights in Linear layout (used by obligations)."""
    w, b = linear_weight(module)
    return F.linear(x, w, b)
