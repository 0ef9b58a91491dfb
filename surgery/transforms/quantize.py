"""4-bit weight quantisation of linear layers (NF4 / FP4, optionally double-quantised): QLoRA's base.

Each linear weight W (``nn.Linear`` layout ``[out, in]``; GPT-2 ``Conv1D`` weights are transposed
first) is flattened and cut into blocks of ``block_size`` values. A block with absolute maximum a is
stored as 4-bit indices into a 16-value code book c ⊂ [−1, 1] plus the scale a:

    q_i = argmin_k |W_i / a − c_k|          Ŵ_i = c[q_i] · â

NF4's code book holds the quantiles of N(0, 1) (equal probability mass per bin), FP4's the values of
a 1-2-1 bit float. With ``double_quant`` the fp32 scales are themselves quantised to 8 bits (blocks
of 256, bitsandbytes' dynamic code, after subtracting their mean), so â ≈ a. The layer computes
y = x Ŵᵀ + b in ``compute_dtype``; the bias stays in float. The storage is bitsandbytes'
``Linear4bit`` / ``Params4bit``; nothing here re-implements the quantiser.
Dettmers et al. 2023 (QLoRA), https://arxiv.org/abs/2305.14314.

The error bound the obligations check: with g the largest half-gap between adjacent code values and
g₂ the largest half-gap of the 8-bit scale code,

    |W_i − Ŵ_i| ≤ |W_i/a − c[q_i]|·a + |c[q_i]|·|a − â| ≤ g·a + g₂·max_{scale block}|a − mean(a)|

(the second term is 0 without double quantisation). Obligations: the quantised layer equals a float
layer holding the dequantised weights; the dequantisation error stays within that bound; the
whole model equals a float copy whose targeted layers hold the dequantised weights.

Quantised weights cannot be merged (``mergeable = False``): a LoRA on top (``quantize(nf4) +
lora(r=8)``, i.e. QLoRA) stays a separate branch. A state dict saved from a quantised model (the
packed weights plus bitsandbytes' quant-state entries ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``: all tensors, so safetensors can hold
them) loads back bit-exactly into a model the same plan was applied to.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.errors import ApplyError
from surgery.layers import SurgeryLinear, linear_weight
from surgery.transforms.registry import Anchor, Params, obligation, transform

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bitsandbytes' double quantisation always quantises the scales in blocks of 256 (functional.quantize_4bit).
_SCALE_BLOCK = 256


class QuantizeParams(Params):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit code book")
    double_quant: bool = Field(True, description="quantise the per-block scales to 8 bits as well")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the matrix product (and of adapters stacked on the layer)")
    block_size: Literal[64, 128, 256] = Field(64, description="weights per scale")


@functools.cache
def quant_linear_class() -> type[nn.Module]:
    """:class:`QuantLinear4bit`, defined on first use.

    It subclasses bitsandbytes' ``Linear4bit``, and importing bitsandbytes takes over a second (it
    pulls in torch's inductor); :func:`~surgery.transforms.register_all` imports this module for
    every command, so only quantising (applying, verifying, loading a saved quantised model) pays
    for it. ``from surgery.transforms.quantize import QuantLinear4bit`` calls this.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Linear4bit, Params4bit

    class QuantLinear4bit(Linear4bit):
        """A bitsandbytes ``Linear4bit`` that exposes its dequantised weight and round-trips its state dict.

        Differences from the parent, and why:

        * ``forward`` never takes bitsandbytes' CPU fast path: it repacks the weight in place on first
          call (dropping the double quantisation) and computes in bf16 whatever ``compute_dtype`` says;
          nor does it cast the bias in place. It calls ``bnb.matmul_4bit`` (which keeps only the packed
          weight for the backward pass) with the input and bias in ``compute_dtype``.
        * bitsandbytes' CPU dequantisation kernel takes each *row* to start a new block, while its
          quantiser blocks the *flattened* weight; they agree when ``in_features`` is a multiple of the
          block size (a 64-wide layer with 128-blocks comes out wrong). :meth:`dequantized` therefore
          dequantises a view whose rows are exactly one block, and ``forward`` falls back to
          ``F.linear`` on that for the other layers on CPU.
        * ``_load_from_state_dict`` rebuilds the quant state from the saved entries
          (``Params4bit.from_prequantized``). ``Linear4bit`` has none: a strict load rejects the
          quant-state entries as unexpected, a non-strict one copies the packed bytes and keeps the
          layer's own scales.

        Constructed directly (not by :meth:`from_float`) the layer holds only placeholders of the right
        shapes, to be filled by ``load_state_dict``; on the meta device that is all there is.
        """

        mergeable = False

        def __init__(self, in_features: int, out_features: int, bias: bool, *, quant_type: str = "nf4",
                     double_quant: bool = True, block_size: int = 64, compute_dtype: torch.dtype = torch.float32,
                     weight_dtype: torch.dtype = torch.float32, device=None):
            # Build the parent on meta: its float weight placeholder would only be thrown away.
            super().__init__(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                             compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8,
                             device="meta")
            self.block_size = block_size
            self.weight_dtype = weight_dtype  # dtype of the dequantised weight (the original weight's)
            self.support_avx512bf16_for_cpu = False
            # Until quantised or loaded: an unfilled packed weight of the right shape (planning on meta
            # counts parameters; these numbers then match a quantised model's).
            packed = torch.empty(((in_features * out_features + 1) // 2, 1), dtype=torch.uint8, device=device)
            self.weight = self._param(packed, None)
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features, dtype=weight_dtype, device=device))

        def _param(self, packed: torch.Tensor, state: QuantState | None) -> Params4bit:
            return Params4bit(packed, requires_grad=False, quant_state=state, blocksize=self.block_size,
                              compress_statistics=self.weight.compress_statistics, quant_type=self.weight.quant_type,
                              quant_storage=torch.uint8, module=self, bnb_quantized=True)

        @classmethod
        def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, p: QuantizeParams) -> "QuantLinear4bit":
            """Quantise ``weight`` (``[out, in]``); ``bias`` (kept as it is, in float) is shared, not copied."""
            out_f, in_f = weight.shape
            layer = cls(in_f, out_f, False, quant_type=p.quant_type, double_quant=p.double_quant,
                        block_size=p.block_size, compute_dtype=getattr(torch, p.compute_dtype),
                        weight_dtype=weight.dtype, device=weight.device)
            layer.bias = bias
            if weight.device.type != "meta":  # on meta there is nothing to quantise: structure only
                packed, state = bnbF.quantize_4bit(weight.detach().contiguous(), blocksize=p.block_size,
                                                   compress_statistics=p.double_quant, quant_type=p.quant_type,
                                                   quant_storage=torch.uint8)
                layer.weight = layer._param(packed, state)
                layer.quant_state = state
            return layer

        @property
        def double_quant(self) -> bool:
            return self.weight.compress_statistics

        def extra_repr(self) -> str:
            return (f"{super().extra_repr()}, quant_type={self.weight.quant_type}, block_size={self.block_size}, "
                    f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

        def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
            """The dequantised weight Ŵ in ``nn.Linear`` layout ``[out, in]`` (in the original dtype by default)."""
            state = self.weight.quant_state
            dtype = dtype or self.weight_dtype
            shape = (self.out_features, self.in_features)
            if state is None:  # never quantised (meta): the right shape, no values
                return torch.empty(shape, dtype=dtype, device=self.weight.device)
            n, block = self.out_features * self.in_features, state.blocksize
            rows = -(-n // block)
            packed = self.weight.data.reshape(-1)
            if rows * block // 2 > packed.numel():  # the last, partial block: pad the indices it lacks
                packed = torch.cat([packed, packed.new_zeros(rows * block // 2 - packed.numel())])
            # One block per row, so that a kernel that blocks rows and one that blocks the flat weight agree.
            view = QuantState(absmax=state.absmax, shape=torch.Size((rows, block)), code=state.code,
                              blocksize=block, quant_type=state.quant_type, dtype=dtype, offset=state.offset,
                              state2=state.state2)
            return bnbF.dequantize_4bit(packed.view(-1, 1), view).reshape(-1)[:n].reshape(shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            state = self.weight.quant_state
            if state is not None and (self.weight.device.type != "cpu" or self.in_features % state.blocksize == 0):
                out = bnb.matmul_4bit(x, self.weight, quant_state=state, bias=bias)
            else:
                out = F.linear(x, self.dequantized(self.compute_dtype), bias)
            return out.to(dtype)

        def _quant_state_keys(self) -> list[str]:
            """The state-dict entries bitsandbytes writes for this layer's quant state (``QuantState.as_dict``)."""
            keys = ["absmax", "quant_map"]
            if self.double_quant:
                keys += ["nested_absmax", "nested_quant_map"]
            return [f"weight.{k}" for k in keys] + [f"weight.quant_state.bitsandbytes__{self.weight.quant_type}"]

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            # nn.Module's loader checks shapes, loads the bias, copies the packed bytes and reports missing
            # keys; it also calls every dotted key under "weight." unexpected (it expects a submodule there):
            # take the quant-state entries back out of that list.
            expected = {prefix + k for k in self._quant_state_keys()}
            reported = len(unexpected_keys)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            unexpected_keys[reported:] = [k for k in unexpected_keys[reported:] if k not in expected]
            key = prefix + "weight"
            if key not in state_dict or state_dict[key].shape != self.weight.shape:
                return  # reported by the parent
            given = {k for k in state_dict if k.startswith(key + ".")}
            if expected - given:
                missing_keys.extend(sorted(expected - given))
                return
            data = state_dict[key]
            device = data.device if self.weight.device.type == "meta" else self.weight.device
            stats = {k[len(prefix):]: state_dict[k].detach().clone() for k in expected}
            try:
                loaded = Params4bit.from_prequantized(data.detach().clone(), stats, requires_grad=False, device=device)
            except (ValueError, AssertionError, KeyError) as e:
                error_msgs.append(f"cannot read the 4-bit quant state of {key}: {e}")
                return
            state = loaded.quant_state
            saved = (tuple(state.shape), state.blocksize, state.nested)
            wanted = ((self.out_features, self.in_features), self.block_size, self.double_quant)
            if saved != wanted:
                error_msgs.append(f"{key} was saved with (shape, block size, double quant) = {saved}, "
                                  f"but this layer is quantised with {wanted}")
                return
            self.weight = self._param(loaded.data, state)
            self.quant_state = state
            self.weight_dtype = state.dtype

    QuantLinear4bit.__qualname__ = "QuantLinear4bit"  # pickled by name: module.__getattr__ finds it
    return QuantLinear4bit


def __getattr__(name: str):
    if name == "QuantLinear4bit":
        return quant_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _DequantizedLinear(nn.Module):
    """The float reference: ``F.linear`` with the dequantised weight, in the layer's compute dtype.

    The weight is dequantised straight into the compute dtype, as the 4-bit matmul does: a bf16
    model computing in float32 uses the exact products code·scale, not their bf16 roundings.
    """

    def __init__(self, layer: nn.Module):  # a QuantLinear4bit
        super().__init__()
        self.weight = layer.dequantized(layer.compute_dtype).detach().clone()
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        self.compute_dtype = layer.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(cd)
        return F.linear(x.to(cd), self.weight.to(cd), bias).to(x.dtype)


def _half_gap(code: torch.Tensor) -> float:
    """Largest distance from a point of [min c, max c] to its nearest code value."""
    code = code.float().sort().values
    return (code[1:] - code[:-1]).max().item() / 2


def error_bound_ratio(original: torch.Tensor, layer: nn.Module) -> float:
    """max_i |W_i − Ŵ_i| / bound_i for the bound of the module docstring (≤ 1 when `layer`, a
    :class:`QuantLinear4bit`, is right).

    The bound is computed from the original weights and bitsandbytes' code books only, never from the
    layer's stored scales, so corrupted indices or scales both show up as a ratio above 1.
    """
    import bitsandbytes.functional as bnbF

    block = layer.block_size
    w = original.detach().float().contiguous().reshape(-1)
    err = (w - layer.dequantized(torch.float32).reshape(-1)).abs()
    pad = -w.numel() % block
    absmax = F.pad(w.abs(), (0, pad)).view(-1, block).amax(dim=1)  # a, per block (zeros pad the last one)
    g = _half_gap(bnbF.get_4bit_type(layer.weight.quant_type, device="cpu"))
    # bitsandbytes computes W / a in float32 (whatever the weight dtype): a few ulps of slack.
    bound = (g + 1e-6) * absmax
    if layer.double_quant:
        g2 = _half_gap(bnbF.create_dynamic_map(signed=True))
        spread = F.pad((absmax - absmax.mean()).abs(), (0, -absmax.numel() % _SCALE_BLOCK))
        spread = spread.view(-1, _SCALE_BLOCK).amax(dim=1).repeat_interleave(_SCALE_BLOCK)[: absmax.numel()]
        # bitsandbytes' 8-bit kernel rounds to the nearest code up to ~0.2 % of the half-gap at ties.
        bound = bound + 1.01 * g2 * spread
    bound = bound.repeat_interleave(block)[: w.numel()]
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    return ratio.max().item() if ratio.numel() else 0.0


@transform("quantize", params=QuantizeParams, anchor=Anchor.LINEAR, positional=("quant_type",),
           reference="https://arxiv.org/abs/2305.14314")
class Quantize:
    """4-bit NF4/FP4 weight quantisation (bitsandbytes; with lora on top, QLoRA)."""

    peft_base = True  # not an adapter: a PEFT export of the adapters on top expects a quantised base

    def replace_base(self, p: QuantizeParams, base: nn.Module, target) -> nn.Module:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt

        if isinstance(base, (Linear4bit, Linear8bitLt)):
            raise ApplyError(f"{target.path} is already quantised ({type(base).__name__}); "
                             "quantize applies to float linear layers")
        weight, bias = linear_weight(base)  # GPT-2 Conv1D: transposed to [out, in]
        if weight.dtype not in _FLOAT_DTYPES:
            raise ApplyError(f"{target.path} has {weight.dtype} weights; quantize needs float32, bfloat16 or float16")
        return quant_linear_class().from_float(weight, bias, p)

    def _layers(self, check):
        for t in check.targets:
            layer = check.module(t.path)
            assert isinstance(layer, SurgeryLinear) and isinstance(layer.base, quant_linear_class())
            yield t, layer

    @obligation("quantised layer == float layer holding the dequantised weights", tol=1e-6)
    def layer_equal(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer) in enumerate(self._layers(check)):
            x = check.randn(3, 5, layer.in_features, salt=i)
            with torch.no_grad():
                out, ref = layer(x), _DequantizedLinear(layer.base)(x)
            errors.append(check.max_abs(out, ref) / max(ref.abs().max().item(), 1e-12))
        return max(errors)

    @obligation("dequantisation error / code-book bound (g·absmax + scale error)", tol=1.0)
    def error_bound(self, p, check) -> float:
        ratios = [0.0]
        for t, layer in self._layers(check):
            original, _ = linear_weight(check.module(t.path, surgered=False))
            ratios.append(error_bound_ratio(original, layer.base))
        return max(ratios)

    @obligation("model logits == float model holding the dequantised weights", tol=1e-4)
    def model_equal(self, p, check) -> float:
        reference = copy.deepcopy(check.original)
        for t, layer in self._layers(check):
            parent, _, name = t.path.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, name, _DequantizedLinear(layer.base))
        ids = check.tokens()
        return check.max_abs(check.logits(check.surgered, ids), check.logits(reference, ids))
