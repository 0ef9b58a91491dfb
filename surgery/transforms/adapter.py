"""Bottleneck adapters at the sublayers: Houlsby, Pfeiffer, and the parallel adapter of He et al.

An adapter is a bottleneck f(z) = W_up σ(W_down z + b_down) + b_up with W_down ∈ ℝ^{m×d},
W_up ∈ ℝ^{d×m}, m = ⌊d / reduction⌋, and a scale s. With h the sublayer's output before the
residual connection and x its input:

* ``houlsby`` — after the attention block and after the FFN (two adapters per layer; select both,
  e.g. ``layers`` or ``attn, mlp``): h' = h + s·f(h), the adapter's own skip connection inside.
  Houlsby et al. 2019, https://arxiv.org/abs/1902.00751.
* ``pfeiffer`` — the same adapter after the FFN only (it attaches to no attention block).
  Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247. AdapterHub's Pfeiffer configuration also
  re-uses the layer's own LayerNorm around the adapter in post-LN models; that is not reproduced:
  here Pfeiffer is Houlsby's adapter at the FFN alone, on every architecture alike.
* ``parallel`` — beside the sublayer, reading its input: h' = h + s·f(x). He et al. 2022,
  https://arxiv.org/abs/2110.04366 (at the FFN, ``mlp``, in their MAM adapter; ``attn`` works too).

Defaults are AdapterHub's: reduction 16, σ = swish (Houlsby) or ReLU (Pfeiffer); parallel:
reduction 2, ReLU, s = 4; otherwise s = 1. W_down starts Kaiming-uniform, b_down, W_up and b_up at
zero, so f = 0 and the model is unchanged at initialisation; the base is frozen.

Each adapter has 2·d·m + m + d parameters (both projections with their biases), the papers' count.

Obligations: identity at init (logits unchanged, exactly); each adapter's parameter count equals
2·d·m + m + d; with every adapter's tensors perturbed, the logits equal the untouched model's with
each sublayer's output h replaced by the adapter's formula computed by hand (from x and h captured
at that sublayer), so the adapters change the model only as their formula says, where it says.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.anchors.sublayer import composition, locate
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, Params, Target, obligation, transform

# What each kind reads and where it may attach, and its defaults (reduction, activation, scale).
ATTACHES = {"houlsby": {"attn", "mlp"}, "pfeiffer": {"mlp"}, "parallel": {"attn", "mlp"}}
DEFAULTS = {"houlsby": (16, "swish", 1.0), "pfeiffer": (16, "relu", 1.0), "parallel": (2, "relu", 4.0)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}


class AdapterParams(Params):
    kind: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction: int | None = Field(None, ge=1, description="bottleneck m = ⌊d / reduction⌋ (default 16; parallel 2)")
    act: Literal["relu", "gelu", "swish", "tanh"] | None = Field(None, description="σ (default swish; relu)")
    scaling: float | None = Field(None, gt=0, description="s (default 1; parallel 4)")

    def settings(self) -> tuple[int, str, float]:
        """(reduction, act, scaling) with the kind's defaults filled in."""
        reduction, act, scaling = DEFAULTS[self.kind]
        return self.reduction or reduction, self.act or act, scaling if self.scaling is None else self.scaling

    def bottleneck(self, hidden: int) -> int:
        return hidden // self.settings()[0]


class BottleneckAdapter(nn.Module):
    """f(z) = up(σ(down(z))), added as h + s·f(h) (serial) or h + s·f(x) (parallel)."""

    def __init__(self, parallel: bool, hidden: int, bottleneck: int, act: str, scaling: float, dtype, device):
        super().__init__()
        self.parallel, self.scaling = parallel, scaling
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        if device != torch.device("meta"):
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for zero in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(zero)

    def delta(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        z = x if self.parallel else h
        if z is None:
            raise RuntimeError("the parallel adapter's sublayer input was not captured")
        out = self.up(self.act(self.down(z.to(self.down.weight.dtype))))
        return (out * self.scaling).to(h.dtype)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(x, h)

    def extra_repr(self) -> str:
        return f"{'parallel' if self.parallel else 'serial'}, scaling={self.scaling}"


def count_formula(hidden: int, bottleneck: int) -> int:
    """The papers' parameter count of one adapter: 2·d·m + m + d."""
    return 2 * hidden * bottleneck + bottleneck + hidden


@transform("adapter", params=AdapterParams, anchor=Anchor.SUBLAYER, positional=("kind",),
           reference="https://arxiv.org/abs/1902.00751")
class Adapter:
    """Bottleneck adapters (Houlsby, Pfeiffer, parallel) at the attention and MLP blocks (base frozen)."""

    freezes_base = True

    def accepts(self, p: AdapterParams, target: Target, module: nn.Module) -> bool:
        return target.role in ATTACHES[p.kind]

    def sublayer_adapter(self, p: AdapterParams, target: Target, hidden: int, like: torch.Tensor) -> nn.Module:
        reduction, act, scaling = p.settings()
        bottleneck = p.bottleneck(hidden)
        if bottleneck < 1:
            raise SpecError(f"adapter(reduction={reduction}) leaves no bottleneck on a model of width {hidden} "
                            f"(m = ⌊{hidden} / {reduction}⌋ = 0; use reduction ≤ {hidden})")
        return BottleneckAdapter(p.kind == "parallel", hidden, bottleneck, act, scaling, like.dtype, like.device)

    @obligation("identity at init: model logits unchanged", tol=0.0)
    def identity_model(self, p, check) -> float:
        return check.logits_identity_error()

    @obligation("parameters per adapter == 2·d·m + m + d", tol=0.0)
    def parameter_count(self, p, check) -> float:
        hidden = check.config.get_text_config().hidden_size
        expected = count_formula(hidden, p.bottleneck(hidden))
        error = 0.0
        for target in check.targets:
            adapter = composition(check.surgered, target)
            if not isinstance(adapter, BottleneckAdapter):
                return math.inf  # no adapter at a target of the step
            error += abs(sum(t.numel() for t in adapter.parameters()) - expected)
        return error

    @obligation("perturbed: logits == the original with h replaced by the formula at each sublayer, relative",
                tol=1e-5)
    def formula(self, p, check) -> float:
        adapters = {t: composition(check.surgered, t) for t in check.targets}
        generator = check.generator(1)
        saved = {t: {k: v.clone() for k, v in a.state_dict().items()} for t, a in adapters.items()}
        with torch.no_grad():
            for adapter in adapters.values():
                for tensor in (adapter.up.weight, adapter.up.bias, adapter.down.bias):
                    tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
        try:
            ids = check.tokens()
            surgered = check.logits(check.surgered, ids)
            handles = []
            try:
                for target, adapter in adapters.items():
                    handles += _by_hand(check.original, target, p, adapter)
                reference = check.logits(check.original, ids)
            finally:
                for handle in handles:
                    handle.remove()
            if check.max_abs(surgered, check.logits(check.original, ids)) < 1e-3:
                return math.inf  # the perturbation did not reach the logits: nothing was tested
            return check.max_rel(surgered, reference)
        finally:
            for target, adapter in adapters.items():
                adapter.load_state_dict(saved[target])


def _by_hand(model: nn.Module, target: Target, p: AdapterParams, adapter: BottleneckAdapter) -> list:
    """Hooks making `model`'s sublayer at `target` output h + s·(W_up σ(W_down z + b_down) + b_up),
    z = h (serial) or its input x (parallel), with `adapter`'s tensors: the formula, not the module."""
    _, act, scaling = p.settings()
    sigma = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}[act]
    source, sink = locate(model, target)
    seen: dict[str, torch.Tensor] = {}
    first = next(iter(inspect.signature(source.forward).parameters))
    w_down, b_down = adapter.down.weight.detach(), adapter.down.bias.detach()
    w_up, b_up = adapter.up.weight.detach(), adapter.up.bias.detach()

    def keep(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs[first]

    def replace(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        z = seen.pop("x") if p.kind == "parallel" else h
        new = h + scaling * (sigma(z @ w_down.T + b_down) @ w_up.T + b_up)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return [source.register_forward_pre_hook(keep, with_kwargs=True), sink.register_forward_hook(replace)]
