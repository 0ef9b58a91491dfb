"""RoPE frequency rewrites: stretch a rotary model's context without touching attention.

RoPE rotates query/key pair i at position m by the angle m·θ_i, θ_i = b^(−2i/d) (b the model's
``rope_theta``, d the rotary dimension). Each kind replaces the frequencies (and, for YaRN, scales
cos/sin by an attention temperature); s is the scale, L the trained context length:

* ``linear`` — Position Interpolation, θ_i / s, i.e. position m is seen as m/s.
  Chen et al. 2023, https://arxiv.org/abs/2306.15595 (transformers rope_type "linear").
* ``ntk`` — static NTK-aware scaling, b' = b·s^(d/(d−2)): θ_0 stays 1 (high frequencies extrapolate)
  and the lowest frequency becomes θ_{d/2−1}/s (low frequencies interpolate). bloc97,
  https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/ (transformers "default" with rope_theta b').
* ``ntk_dynamic`` — at sequence length n (largest position id + 1 of the call), static NTK with
  α = s·n/L − (s−1) when n > L, plain RoPE otherwise. emozilla,
  https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/ (transformers "dynamic"). Unlike
  transformers' module, ours keeps no state between calls: the same input always gives the same
  output (theirs keeps the frequencies of a longer call for a later call of length exactly L).
  n is the whole batch's, as in transformers: once the longest row of a batch passes L, every row
  of it is computed with that row's frequencies, so a short row differs from itself fed alone. We
  keep this on purpose: the exported ``rope_parameters`` ("dynamic") reproduce exactly it, and
  frequencies per row would make the saved model disagree with the surgered one. Within L, which
  is what the kind promises to leave untouched, every row is plain RoPE whatever its batch.
* ``ntk_consistent`` — consistent dynamic NTK: token i of a stream (stream index, i.e. counted
  from each row's first real token, as ``generate()`` numbers positions) attends with the
  frequencies θ(n) of its own length n = i + 1 — static NTK with α = s·n/L − (s−1) past L, plain
  RoPE within — applied to its query *and to every key it sees*. Keys are cached before RoPE and
  re-rotated per query, so one base holds throughout each query's attention (the last query of an
  n-token call sees exactly transformers' "dynamic" on n tokens), and, since query i depends on
  tokens 0 … i only, a full forward equals prefill + token-by-token decoding at every step, and
  forward(x)[:t] equals forward(x[:t]). transformers' "dynamic" does neither: a full forward rotates
  every token with the call's length, and its cache keeps each key in the base of the step that
  computed it (NormXU/Consistent-DynamicNTKRoPE; transformers issue 25104). Built on the attention
  program (a :class:`~surgery.attention.program.ConsistentFrame` and a pre-RoPE cache on every
  attention module), so it clashes with another frame or cache policy (``window``, ``rerope``).
  Cost: tiles within L run the fused kernel; a query past L has its own base, so its scores are
  formed explicitly, O((N − L)·N·D) for a prefill (one decoding step: O(N·D)). Not expressible as
  ``rope_parameters``.
* ``yarn`` — per pair, blend interpolation θ_i/s and extrapolation θ_i by a ramp over the number
  of rotations pair i makes within L (≥ beta_fast rotations: keep θ_i; ≤ beta_slow: θ_i/s), and
  scale cos/sin by 0.1·ln s + 1. Peng et al. 2023, https://arxiv.org/abs/2309.00071; matches
  transformers "yarn" exactly (including its floor/ceil of the ramp's ends).
* ``yarn_dynamic`` — YaRN at the call's length: s_n = max(1, s·n/L − (s−1)) (transformers'
  dynamic-NTK schedule; s = 1 gives YaRN's own Dynamic-YaRN, s_n = max(1, n/L)), so every call
  with n ≤ L is plain RoPE (no temperature either) and a call with n > L is exactly ``yarn`` at
  s_n, temperature 0.1·ln s_n + 1 included. Peng et al. 2023 §3.3. Stateless, like ``ntk_dynamic``.
  transformers has no such type: not expressible as ``rope_parameters``.
* ``llama3`` — Llama 3.1's bands: with λ_i = 2π/θ_i, λ_i < L/high_freq_factor keeps θ_i,
  λ_i > L/low_freq_factor uses θ_i/s, between (1 − γ)·θ_i/s + γ·θ_i with γ = (L/λ_i − low)/(high − low).
  Meta's Llama 3.1 release (transformers "llama3"; defaults low 1, high 4 as there).
* ``longrope`` — per-pair divisors θ_i/f_i, with f = ``short_factor`` (default all 1) for calls of
  length n ≤ L and ``long_factor`` beyond, cos/sin scaled by √(1 + ln s / ln L) (or the given
  ``attention_factor``) at every length. Ding et al. 2024, https://arxiv.org/abs/2402.13753
  (transformers "longrope"; the factors come from LongRoPE's search, which is not reproduced here).

The rotary module is shared by every layer, so the step replaces it once with a
:class:`RescaledRope` that holds its own frequencies; the model's config is never changed. The
result is expressible in plain transformers: :meth:`Rope.rope_parameters` gives the
``config.rope_parameters`` dict that reproduces it (``None`` for ``ntk_dynamic`` with an L other
than ``max_position_embeddings``, which transformers' "dynamic" always uses as L).

Obligations (float32; L positions per call unless noted):

* scale=1 is the identity: a scale-1 instance (without an explicit ``attention_factor``; longrope
  with all factors 1) gives the original module's cos/sin at positions 0..4L (``ntk_dynamic``,
  ``yarn_dynamic``: calls of length n ≤ L only, since their s_n is n/L beyond L even at s=1).
* equals transformers (cos/sin, positions 0..4L): the transformers rotary class built from a config
  copy carrying :meth:`Rope.rope_parameters` (``ntk_dynamic``, ``longrope``: a fresh transformers
  module per call length, lengths in an order that would expose state kept between calls;
  ``yarn_dynamic``: per call length, transformers' "yarn" at s_n, or its plain RoPE where s_n = 1).
* equals transformers (logits): a transformers model built from that config with the original
  weights gives the same logits on a sequence whose positions run past L (a fresh model per
  length for the dynamic kinds; ``longrope`` also at a length within L, where the short factors apply;
  ``ntk_consistent`` within L only: past it each query has its own base, which no config expresses,
  and its cos/sin at a stream of n tokens are compared with transformers' "dynamic" on n tokens).
* the kind's defining property: ``linear`` cos/sin at m equal the original's at m/s (error per
  unit of position, the resolution float32 angles have); ``ntk`` θ_0 unchanged and the lowest
  frequency exactly θ_{d/2−1}/s (relative error); ``ntk_dynamic`` logits identical to the unscaled
  model for N ≤ L (N = L, the boundary, and N = L/2); ``yarn`` pairs making ≥ beta_fast
  rotations in L keep θ_i, pairs making ≤ beta_slow are θ_i/s, the rest lie between, and
  cos²+sin² = (0.1·ln s + 1)², all from the paper's definitions in float64; ``yarn_dynamic`` logits
  identical to the unscaled model for N ≤ L and cos/sin equal to our ``yarn`` at s_n for n > L;
  ``ntk_consistent`` identical to the unscaled model for N ≤ L, and position m rotated with θ(m + 1);
  ``llama3`` every θ'_i equals the banded formula in float64 (relative error); ``longrope`` the
  short set for n ≤ L, the long set for n > L (relative error against float64) and
  cos²+sin² = attention factor² at both.
* prefill + decode equals the full forward (rel., tol 1e-5): past L for the kinds whose
  frequencies do not depend on the call and for ``ntk_consistent`` (with L = min(L, 16), where it
  also checks forward(x)[:t] == forward(x[:t]), fast path == dense reference, and per layer that
  the last query equals the untouched layer given transformers' dynamic cos/sin for the call's
  length); within L for ``ntk_dynamic``, ``yarn_dynamic`` and ``longrope``, which rescale per call.
* left-padded batch equals each row alone (relative to the logits' scale): rows of min(16, L)
  tokens and fewer, with and without ``generate()``'s position_ids, full forward and token-by-token
  decode (:meth:`surgery.verify.Check.padded_rows_error`). RoPE sees only position differences, so
  a rotary module that honours ``position_ids`` cannot let padding change a row; one that numbers
  the call's own tokens instead fails at the first decode step. The batch stays within L, where
  ``ntk_dynamic`` promises it too.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from surgery.errors import ApplyError, SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform

# Which kinds each option applies to.
_OPTION_KINDS = {
    "beta_fast": ("yarn", "yarn_dynamic"), "beta_slow": ("yarn", "yarn_dynamic"),
    "attention_factor": ("yarn", "yarn_dynamic", "longrope"),
    "low_freq_factor": ("llama3",), "high_freq_factor": ("llama3",),
    "short_factor": ("longrope",), "long_factor": ("longrope",),
}


class RopeParams(Params):
    kind: Literal["linear", "ntk", "ntk_dynamic", "ntk_consistent", "yarn", "yarn_dynamic", "llama3", "longrope"]
    scale: float = Field(ge=1, description="context scale factor s")
    original_max_position: int | None = Field(
        None, ge=1, description="trained context length L; defaults to config.max_position_embeddings")
    beta_fast: float = Field(32.0, gt=0, description="yarn: pairs with at least this many rotations in L keep θ_i")
    beta_slow: float = Field(1.0, gt=0, description="yarn: pairs with at most this many rotations in L use θ_i/s")
    attention_factor: float | None = Field(
        None, gt=0, description="yarn: cos/sin scale; default 0.1·ln s + 1 (longrope: √(1 + ln s / ln L))")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: wavelengths above L/low_freq_factor use θ_i/s")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3: wavelengths below L/high_freq_factor keep θ_i")
    short_factor: tuple[float, ...] | None = Field(
        None, description="longrope: per-pair divisors of θ_i for calls of length ≤ L (default all 1)")
    long_factor: tuple[float, ...] | None = Field(None, description="longrope: per-pair divisors of θ_i beyond L (required)")

    @model_validator(mode="after")
    def _yarn_options(self) -> "RopeParams":
        given = [k for k, kinds in _OPTION_KINDS.items() if k in self.model_fields_set and self.kind not in kinds]
        if given:
            owners = "/".join(dict.fromkeys(_OPTION_KINDS[k][0] for k in given))
            raise PydanticCustomError("rope_options", "the {owners} option(s) {names} do not apply to rope({kind}, …)",
                                      {"owners": owners, "names": ", ".join(given), "kind": self.kind})
        if self.low_freq_factor >= self.high_freq_factor:
            raise PydanticCustomError("rope_bands", "rope(llama3) needs low_freq_factor < high_freq_factor, "
                                      "got {low} >= {high}", {"low": self.low_freq_factor, "high": self.high_freq_factor})
        if self.kind == "longrope" and self.long_factor is None:
            raise PydanticCustomError("rope_long", "rope(longrope) needs long_factor=[…], one divisor per rotary pair", {})
        for name in ("short_factor", "long_factor"):
            if any(not f > 0 for f in getattr(self, name) or ()):
                raise PydanticCustomError("rope_factors", "rope(longrope): every {name} entry must be > 0", {"name": name})
        if self.beta_fast <= self.beta_slow:
            raise PydanticCustomError("rope_betas", "rope(yarn) needs beta_fast > beta_slow, got {fast} <= {slow}",
                                      {"fast": self.beta_fast, "slow": self.beta_slow})
        return self


# ------------------------------------------------------------------------------- frequencies


def rope_settings(config) -> tuple[float, int]:
    """(base b, rotary dimension d) of a config, the way transformers' scaled rope types read them."""
    params = config.rope_parameters or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return float(base), dim


def inverse_frequencies(base, dim: int) -> torch.Tensor:
    """θ_i = b^(−2i/d) in float32, with transformers' operation order (so results agree bit for bit).

    `base` is a float, or a 0-dim tensor (dynamic NTK), whose device the result then shares."""
    device = base.device if isinstance(base, torch.Tensor) else None
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def yarn_keep(base: float, dim: int, L: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Per pair, YaRN's weight of extrapolation (θ_i kept): 1 for pairs making ≥ beta_fast rotations in L,
    0 for ≤ beta_slow, a linear ramp between (transformers' "yarn" with truncate=True: floor/ceil ends)."""

    def pair_index(rotations: float) -> float:
        # The (fractional) pair index whose wavelength fits `rotations` times into L.
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a one-pair ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return 1 - ramp


def yarn_frequencies(base: float, dim: int, s: float, L: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN's blended frequencies (transformers' "yarn" with truncate=True, same operation order)."""
    keep = yarn_keep(base, dim, L, beta_fast, beta_slow)
    wavelengths = base ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (s * wavelengths)) * (1 - keep) + (1.0 / wavelengths) * keep


def llama3_frequencies(base: float, dim: int, s: float, L: int, low: float, high: float) -> torch.Tensor:
    """Llama 3.1's banded frequencies (transformers' "llama3", same operation order).

    With wavelength λ_i = 2π/θ_i: λ_i < L/high keeps θ_i; λ_i > L/low uses θ_i/s; in between
    (1 − γ)·θ_i/s + γ·θ_i with γ = (L/λ_i − low)/(high − low), which runs from 0 to 1 across the band.
    """
    theta = inverse_frequencies(base, dim)
    wavelength = 2 * math.pi / theta
    outer = torch.where(wavelength > L / low, theta / s, theta)
    gamma = (L / wavelength - low) / (high - low)
    blended = (1 - gamma) * outer / s + gamma * outer
    band = (wavelength >= L / high) & (wavelength <= L / low)
    return torch.where(band, blended, outer)


def longrope_frequencies(base: float, dim: int, divisors: list[float]) -> torch.Tensor:
    """θ_i / f_i for per-pair divisors f_i (transformers' "longrope", same operation order)."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(divisors, dtype=torch.float32) * base ** shape)


def longrope_attention_factor(p: "RopeParams", L: int) -> float:
    if p.attention_factor is not None:
        return float(p.attention_factor)
    return math.sqrt(1 + math.log(p.scale) / math.log(L)) if p.scale > 1 else 1.0


def yarn_attention_factor(p: RopeParams) -> float:
    if p.attention_factor is not None:
        return float(p.attention_factor)
    return 0.1 * math.log(p.scale) + 1.0 if p.scale > 1 else 1.0


class RescaledRope(nn.Module):
    """Rotary cos/sin from its own frequencies; ``forward(x, position_ids) -> (cos, sin)`` like transformers'.

    With ``dynamic`` = (b, d, s, L) the frequencies are recomputed per call from that call's length
    n = max(position_ids) + 1 (dynamic NTK); nothing is remembered between calls.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 dynamic: tuple[float, int, float, int] | None = None):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not in the state dict: weights unchanged
        self.attention_scaling = attention_scaling
        self.dynamic = dynamic

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.dynamic is None:
            return self.inv_freq
        base, dim, s, L = self.dynamic
        n = position_ids.max() + 1
        alpha = s * n / L - (s - 1)  # a float32 tensor, as in transformers, so the two agree bit for bit
        scaled = inverse_frequencies(base * alpha ** (dim / (dim - 2)), dim)
        # A tensor select, not a Python branch on n: torch.export can then capture the graph
        # (a branch on data is a data-dependent guard it refuses).
        return torch.where(n <= L, self.inv_freq.to(scaled.device), scaled)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.frequencies(position_ids).to(device=x.device, dtype=torch.float)
        angles = position_ids[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        kind = "dynamic NTK" if self.dynamic else "fixed"
        return f"pairs={self.inv_freq.numel()}, {kind}, attention_scaling={self.attention_scaling:g}"


class ConsistentNtkRope(RescaledRope):
    """Dynamic NTK per token: the frequencies of a stream of n tokens are θ(n) (static NTK with
    α = s·n/L − (s−1) for n > L, plain RoPE otherwise), and token p is rotated with θ(p + 1), the
    base of its own length. The attention program's :class:`~surgery.attention.program.ConsistentFrame`
    re-rotates every key a query sees with that query's θ (:meth:`frequencies_at`)."""

    def __init__(self, base: float, dim: int, s: float, L: int):
        super().__init__(inverse_frequencies(base, dim), dynamic=(base, dim, s, L))
        self.trained = L

    def frequencies_at(self, n: torch.Tensor) -> torch.Tensor:
        """θ(n) for every entry of `n` (stream lengths), shape n.shape + [d/2], float32.

        The same bits whether n comes alone (a decoding step; transformers' dynamic NTK on n tokens,
        which forms α^(d/(d−2)) on one number) or among others (a prefill): torch's float32 power
        runs a vectorised kernel over contiguous runs and the C library's powf on anything else (a
        run's tail, a strided view, a single number), one ulp apart at times, and a score at
        distance 16k turns one ulp of θ into ~1e-4. So the power of α runs on a strided view (powf
        for every n); the power of the base runs on rows of d/2 frequencies, the same kernel for
        one n as for many."""
        base, dim, s, L = self.dynamic
        alpha = s * n.clamp(min=L).float() / L - (s - 1)  # clamped: no NaN where plain RoPE is taken
        stretched = torch.stack((alpha, alpha), dim=-1)[..., 0] ** (dim / (dim - 2))  # strided: powf, as alone
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=n.device).float() / dim
        scaled = 1.0 / ((base * stretched[..., None]) ** exponents)
        return torch.where(n[..., None] <= L, self.inv_freq.to(n.device), scaled)

    def at_length(self, x: torch.Tensor, position_ids: torch.Tensor, n: int):
        """cos/sin at `position_ids` with the frequencies of an n-token stream (transformers' dynamic
        NTK on a call of length n)."""
        inv_freq = self.frequencies_at(torch.tensor(n, device=position_ids.device))
        angles = position_ids[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        angles = position_ids[..., None].float() * self.frequencies_at(position_ids + 1)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)

    def extra_repr(self) -> str:
        base, dim, s, L = self.dynamic
        return f"pairs={self.inv_freq.numel()}, consistent dynamic NTK (θ of each token's own length), s={s:g}, L={L}"


class DynamicYarnRope(RescaledRope):
    """YaRN whose scale follows the call's length n = max(position_ids) + 1: s_n = max(1, s·n/L − (s−1)).

    Per call with s_n > 1 this is exactly YaRN (frequencies and temperature 0.1·ln s_n + 1, or the
    fixed `attention_factor`) at scale s_n; a call with n ≤ L is plain RoPE (no temperature either). The ramp between interpolated and
    kept pairs depends on L only, so it is computed once; s_n is a tensor (no Python branch on
    data, so torch.export can capture it). Nothing is remembered between calls.
    """

    def __init__(self, base: float, dim: int, s: float, L: int, beta_fast: float, beta_slow: float,
                 attention_factor: float | None):
        super().__init__(inverse_frequencies(base, dim))
        wavelengths = base ** (torch.arange(0, dim, 2).float() / dim)
        self.register_buffer("wavelengths", wavelengths, persistent=False)
        self.register_buffer("keep", yarn_keep(base, dim, L, beta_fast, beta_slow), persistent=False)
        self.scale, self.trained, self.fixed_factor = s, L, attention_factor

    def scale_at(self, position_ids: torch.Tensor) -> torch.Tensor:
        n = position_ids.max() + 1
        return torch.clamp(self.scale * n.double() / self.trained - (self.scale - 1), min=1.0)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        s_n = self.scale_at(position_ids)
        wavelengths, keep = self.wavelengths.to(x.device), self.keep.to(x.device)
        # transformers' operation order (interpolation 1/(s·w), then the blend), so the two agree bit for bit
        blended = (1.0 / (s_n.float() * wavelengths)) * (1 - keep) + (1.0 / wavelengths) * keep
        # Within L exactly plain RoPE (the blend at s = 1 can differ from θ_i in the last bit).
        inv_freq = torch.where(s_n > 1, blended, self.inv_freq.to(blended.device))
        temperature = torch.full_like(s_n, self.fixed_factor) if self.fixed_factor is not None else 0.1 * torch.log(s_n) + 1.0
        factor = torch.where(s_n > 1, temperature, torch.ones_like(s_n))
        angles = position_ids[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        scaling = factor.float()
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"pairs={self.inv_freq.numel()}, dynamic YaRN s_n = max(1, {self.scale:g}·n/{self.trained} − {self.scale - 1:g})"


class LongRope(RescaledRope):
    """LongRoPE: θ_i/short_i for calls of length n ≤ L, θ_i/long_i beyond (n = max(position_ids) + 1),
    cos/sin scaled by the attention factor in both. A tensor select, so nothing is kept between calls."""

    def __init__(self, short: torch.Tensor, long: torch.Tensor, L: int, attention_scaling: float):
        super().__init__(short, attention_scaling)
        self.register_buffer("long_inv_freq", long, persistent=False)
        self.trained = L

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        n = position_ids.max() + 1
        return torch.where(n > self.trained, self.long_inv_freq.to(self.inv_freq.device), self.inv_freq)

    def extra_repr(self) -> str:
        return (f"pairs={self.inv_freq.numel()}, LongRoPE short/long factors switched at n > {self.trained}, "
                f"attention_scaling={self.attention_scaling:g}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every layer's attention module (role ``attn``), where ntk_consistent installs its stage."""
    from surgery.arch import backbone_prefix, detect

    arch = detect(model)
    if not arch.mapped or "attn" not in arch.layer:
        raise ApplyError(f"rope(ntk_consistent) re-rotates keys inside attention, but {arch.name} has no "
                         "role map for its attention modules")
    layers = model.get_submodule(backbone_prefix(model) + arch.layers)
    return [layer.get_submodule(path) for layer in layers for path in arch.layer_paths("attn")]


def trained_length(p: RopeParams, config) -> int:
    return p.original_max_position or config.max_position_embeddings


def build_rope(p: RopeParams, config) -> RescaledRope:
    """The rotary module of `p` for a model with this config (on the CPU)."""
    base, dim = rope_settings(config)
    s, L = p.scale, trained_length(p, config)
    plain = inverse_frequencies(base, dim)
    if p.kind == "linear":
        return RescaledRope(plain / s)
    if p.kind == "ntk":
        return RescaledRope(inverse_frequencies(base * s ** (dim / (dim - 2)), dim))
    if p.kind == "ntk_dynamic":
        return RescaledRope(plain, dynamic=(base, dim, s, L))
    if p.kind == "ntk_consistent":
        return ConsistentNtkRope(base, dim, s, L)
    if p.kind == "yarn_dynamic":
        return DynamicYarnRope(base, dim, s, L, p.beta_fast, p.beta_slow, p.attention_factor)
    if p.kind == "llama3":
        return RescaledRope(llama3_frequencies(base, dim, s, L, p.low_freq_factor, p.high_freq_factor))
    if p.kind == "longrope":
        short = longrope_frequencies(base, dim, p.short_factor or [1.0] * (dim // 2))
        return LongRope(short, longrope_frequencies(base, dim, p.long_factor), L, longrope_attention_factor(p, L))
    return RescaledRope(yarn_frequencies(base, dim, s, L, p.beta_fast, p.beta_slow), yarn_attention_factor(p))


# --------------------------------------------------------------------------------- transform


@transform("rope", params=RopeParams, anchor=Anchor.ROTARY, positional=("kind", "scale"),
           reference="https://arxiv.org/abs/2306.15595")
class Rope:
    """Rewrite the RoPE frequencies (linear / NTK / dynamic NTK / YaRN) to extend the context."""

    def accepts(self, p: RopeParams, target, module: nn.Module) -> bool:
        config = getattr(module, "config", None)
        inv_freq = getattr(module, "inv_freq", None)
        if config is None or not isinstance(inv_freq, torch.Tensor) or not getattr(config, "rope_parameters", None):
            raise SpecError(f"rope() cannot read the rotary embedding at {target.path} "
                            f"({type(module).__name__} has no config.rope_parameters / inv_freq)")
        rope_type = getattr(module, "rope_type", config.rope_parameters.get("rope_type", "default"))
        if isinstance(rope_type, dict):
            raise SpecError(f"the rotary embedding at {target.path} uses a different RoPE per layer type "
                            f"({', '.join(rope_type)}); rope() rewrites one shared RoPE only")
        if rope_type != "default":
            raise SpecError(f"the model's RoPE is already rewritten (rope_type {rope_type!r}); "
                            "rope() rewrites plain RoPE only")
        _, dim = rope_settings(config)
        if 2 * inv_freq.numel() != dim:
            raise SpecError(f"the rotary embedding at {target.path} rotates {2 * inv_freq.numel()} dimensions but "
                            f"the config implies {dim}; rope() cannot rewrite it consistently")
        for name in ("short_factor", "long_factor"):
            factors = getattr(p, name)
            if factors is not None and len(factors) != dim // 2:
                raise SpecError(f"rope(longrope) {name} has {len(factors)} entries; the rotary embedding at "
                                f"{target.path} has {dim // 2} pairs (rotary dimension {dim})")
        if p.kind in ("ntk", "ntk_dynamic", "ntk_consistent") and dim <= 2:
            raise SpecError(f"rope({p.kind}) needs a rotary dimension above 2 (b' = b·s^(d/(d−2))), got {dim}")
        return True

    def apply(self, p: RopeParams, model: nn.Module, targets, edit) -> None:
        for target in targets:
            original = model.get_submodule(target.path)
            new = build_rope(p, original.config).to(original.inv_freq.device)
            edit.replace(target.path, new)
        if p.kind == "ntk_consistent":
            from surgery.attention import install, rotary_ref

            install(edit, model, attention_modules(model), self.stage(p, rotary=rotary_ref(model)))

    def stage(self, p: RopeParams, span=None, rotary=None):
        """ntk_consistent's stage of every attention module's program: the consistent frame and a
        pre-RoPE cache (None for the other kinds, which change the rotary module only)."""
        if p.kind != "ntk_consistent":
            return None
        from surgery.attention.program import ConsistentFrame, PreRope, Stage

        return Stage(f"rope(ntk_consistent, scale={p.scale:g})", span, frame=ConsistentFrame(rotary), cache=PreRope())

    def config_fields(self, p: RopeParams, model: nn.Module) -> dict | None:
        """The rope as transformers' config: its ``rope_parameters`` (None where they cannot express it)."""
        params = self.rope_parameters(p, model.config)
        return None if params is None else {"rope_parameters": params}

    def rope_parameters(self, p: RopeParams, config) -> dict | None:
        """transformers' ``config.rope_parameters`` reproducing this rope (None if not expressible)."""
        base, dim = rope_settings(config)
        params = dict(config.rope_parameters)  # keeps partial_rotary_factor and any model-specific keys
        if p.kind == "linear":
            return {**params, "rope_type": "linear", "factor": p.scale}
        if p.kind == "ntk":
            return {**params, "rope_type": "default", "rope_theta": base * p.scale ** (dim / (dim - 2))}
        if p.kind == "yarn_dynamic":
            return None  # transformers has no YaRN that follows the call's length
        if p.kind == "ntk_consistent":
            return None  # a base per query: no transformers rope does that
        if p.kind == "llama3":
            return {**params, "rope_type": "llama3", "factor": p.scale, "low_freq_factor": p.low_freq_factor,
                    "high_freq_factor": p.high_freq_factor,
                    "original_max_position_embeddings": trained_length(p, config)}
        if p.kind == "longrope":
            out = {**params, "rope_type": "longrope", "factor": p.scale,
                   "short_factor": list(p.short_factor or [1.0] * (dim // 2)), "long_factor": list(p.long_factor),
                   "original_max_position_embeddings": trained_length(p, config)}
            if p.attention_factor is not None:
                out["attention_factor"] = float(p.attention_factor)
            return out
        if p.kind == "ntk_dynamic":
            # transformers' "dynamic" always takes L = config.max_position_embeddings.
            if trained_length(p, config) != config.max_position_embeddings:
                return None
            return {**params, "rope_type": "dynamic", "factor": p.scale}
        out = {**params, "rope_type": "yarn", "factor": p.scale,
               "original_max_position_embeddings": trained_length(p, config),
               "beta_fast": p.beta_fast, "beta_slow": p.beta_slow}
        if p.attention_factor is not None:
            out["attention_factor"] = float(p.attention_factor)
        return out

    # ---------------------------------------------------------------------------- obligations

    @staticmethod
    def _modules(check):
        """(ours, transformers' own rotary for this config). The reference is built afresh: a model
        cast to bf16 and back keeps bf16-rounded frequencies in its buffer, which is not RoPE."""
        path = check.targets[0].path
        original = check.module(path, surgered=False)
        fresh = type(original)(original.config).to(original.inv_freq.device)
        return check.module(path), fresh

    @staticmethod
    def _yarn_scale_at(p: RopeParams, n: int, L: int) -> float:
        """yarn_dynamic's s_n = max(1, s·n/L − (s−1)) for a call of length n."""
        return max(1.0, p.scale * n / L - (p.scale - 1))

    def _reference_config(self, p: RopeParams, config, n: int | None = None):
        """A copy of `config` with which plain transformers computes this rope (for yarn_dynamic: on
        calls of length `n`, i.e. static YaRN at s_n, or the config itself where s_n = 1)."""
        ref = copy.deepcopy(config)
        if p.kind == "yarn_dynamic":
            s_n = self._yarn_scale_at(p, n, trained_length(p, config))
            if s_n > 1:
                ref.rope_parameters = self.rope_parameters(p.model_copy(update={"kind": "yarn", "scale": s_n}), config)
            return ref
        if p.kind == "ntk_consistent":  # per call length n, transformers' "dynamic" at n is θ(n)
            p = p.model_copy(update={"kind": "ntk_dynamic"})
        params = self.rope_parameters(p, config)
        if params is None:  # ntk_dynamic with a custom L: transformers reads L from max_position_embeddings
            params = self.rope_parameters(p.model_copy(update={"original_max_position": None}), config)
            ref.max_position_embeddings = trained_length(p, config)
        ref.rope_parameters = params
        return ref

    @staticmethod
    def _cos_sin_error(a: nn.Module, b: nn.Module, positions: torch.Tensor, check) -> float:
        x = torch.zeros(1, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            (cos_a, sin_a), (cos_b, sin_b) = a(x, positions), b(x, positions)
        return max(check.max_abs(cos_a, cos_b), check.max_abs(sin_a, sin_b))

    @staticmethod
    def _positions(n: int, device, offset: int = 0) -> torch.Tensor:
        return (torch.arange(n, device=device) + offset)[None]

    def _long_input(self, check, end: int, cap: int = 256):
        """Tokens whose positions end at `end` − 1: a real sequence of that length when it is short,
        else its last `cap` positions (position ids offset), which exercise the same frequencies."""
        length = min(end, cap)
        device = next(check.original.parameters()).device
        ids = check.tokens(batch=2, length=length).to(device)
        positions = torch.arange(end - length, end, device=device)[None].expand(2, -1)
        return ids, positions

    @obligation("scale=1 is the identity (cos/sin)", tol=1e-6)
    def identity(self, p, check) -> float:
        _, original = self._modules(check)
        L = trained_length(p, original.config)
        # An explicit yarn temperature is a separate choice from the scale, so the unit instance drops it.
        update = {"scale": 1.0, "attention_factor": None}
        if p.kind == "longrope":  # its per-pair factors are a choice of their own: all 1 is the unit
            update.update(short_factor=None, long_factor=(1.0,) * original.inv_freq.numel())
        unit = build_rope(p.model_copy(update=update), original.config)
        unit = unit.to(original.inv_freq.device)
        device = original.inv_freq.device
        if p.kind in ("ntk_dynamic", "ntk_consistent", "yarn_dynamic"):  # beyond L, s_n = n/L even at s=1
            return max(self._cos_sin_error(unit, original, self._positions(n, device), check)
                       for n in (1, L // 2, L))
        return self._cos_sin_error(unit, original, self._positions(4 * L, device), check)

    @obligation("equals transformers' rope (cos/sin to 4L)", tol=1e-6)
    def equals_transformers(self, p, check) -> float:
        ours, original = self._modules(check)
        L, device = trained_length(p, original.config), original.inv_freq.device
        if p.kind == "yarn_dynamic":  # per call length: static YaRN at s_n from transformers, a fresh one each
            return max(self._cos_sin_error(ours, type(original)(self._reference_config(p, original.config, n)).to(device),
                                           self._positions(n, device), check)
                       for n in (4 * L, L + 1, L, L // 2, 2 * L))
        reference = self._reference_config(p, original.config)
        make = lambda: type(original)(reference).to(device)  # noqa: E731
        if p.kind == "ntk_consistent":  # θ(n) at a stream of n tokens is transformers' dynamic on n tokens
            x = torch.zeros(1, device=device)
            errors = []
            for n in (4 * L, L + 1, L, L // 2, 2 * L):
                positions = self._positions(n, device)
                with torch.no_grad():
                    (cos, sin), (cos_t, sin_t) = ours.at_length(x, positions, n), make()(x, positions)
                errors += [check.max_abs(cos, cos_t), check.max_abs(sin, sin_t)]
            return max(errors)
        if p.kind not in ("ntk_dynamic", "longrope"):
            return self._cos_sin_error(ours, make(), self._positions(4 * L, device), check)
        # Theirs is stateful, so a fresh one per length; ours sees the lengths long-short-long, which
        # would expose frequencies kept from an earlier call.
        return max(self._cos_sin_error(ours, make(), self._positions(n, device), check)
                   for n in (4 * L, L + 1, L, L // 2, 2 * L))

    @obligation("equals transformers' rope (logits past L)", tol=1e-4)
    def equals_transformers_model(self, p, check) -> float:
        _, original = self._modules(check)
        L = trained_length(p, original.config)
        errors = []
        ends = {"ntk_dynamic": (2 * L, L + L // 2), "yarn_dynamic": (2 * L, L + L // 2), "longrope": (2 * L, L),
                "ntk_consistent": (L, L // 2)}  # past L a base per query, which no transformers rope has
        for end in ends.get(p.kind, (2 * L,)):
            reference = self._reference_config(p, check.config, end)
            plain = self._plain_model(check, reference)  # fresh per length: transformers' dynamic keeps state
            ids, positions = self._long_input(check, end)
            errors.append(check.max_abs(check.logits(check.surgered, ids, position_ids=positions),
                                        check.logits(plain, ids, position_ids=positions)))
            del plain
        return max(errors)

    @staticmethod
    def _plain_model(check, config) -> nn.Module:
        """A transformers model built from `config` holding the original weights; its rotary buffers
        are computed afresh (a model cast to bf16 and back keeps rounded frequencies)."""
        with torch.random.fork_rng(devices=[]):  # building a model draws random weights
            plain = type(check.original)(config)
        plain.load_state_dict(check.original.state_dict())
        first = next(check.original.parameters())
        return plain.to(dtype=first.dtype, device=first.device).eval()

    @obligation("defining property of the kind (see docstring)", tol=1e-6)
    def kind_property(self, p, check) -> float:
        return getattr(self, f"_property_{p.kind}")(p, check)

    def _property_linear(self, p, check) -> float:
        # cos/sin at m equal the original's at m/s. Both sides round angles of size ~m/s to float32,
        # so the error is measured per unit of position (a wrong scale is off by O(1) at m = 1).
        ours, original = self._modules(check)
        L, device = trained_length(p, original.config), original.inv_freq.device
        m = self._positions(4 * L, device)
        x = torch.zeros(1, device=device)
        with torch.no_grad():
            (cos, sin), (cos_ref, sin_ref) = ours(x, m), original(x, m.float() / p.scale)
        per_position = torch.clamp(m.float() / p.scale, min=1.0)[..., None]
        return max(((cos - cos_ref).abs() / per_position).max().item(),
                   ((sin - sin_ref).abs() / per_position).max().item())

    def _property_ntk(self, p, check) -> float:
        # θ_0 = 1 unchanged; the lowest frequency is θ_{d/2−1}/s exactly (float64 expectation).
        ours, original = self._modules(check)
        base, dim = rope_settings(original.config)
        theta = ours.inv_freq.double()
        lowest = base ** (-(dim - 2) / dim) / p.scale
        return max(abs(theta[0].item() - original.inv_freq[0].item()),
                   abs(theta[-1].item() - lowest) / lowest)

    def _property_ntk_dynamic(self, p, check) -> float:
        # For N ≤ L the model is exactly the unscaled one: at the boundary N = L and well inside.
        L = trained_length(p, check.module(check.targets[0].path, surgered=False).config)
        unscaled = self._plain_model(check, check.config)
        errors = []
        for end in (L, max(1, L // 2)):
            ids, positions = self._long_input(check, end)
            errors.append(check.max_abs(check.logits(check.surgered, ids, position_ids=positions),
                                        check.logits(unscaled, ids, position_ids=positions)))
        return max(errors)

    def _property_ntk_consistent(self, p, check) -> float:
        # Identical to the unscaled model for N ≤ L, and the rotary rotates position m with θ(m + 1),
        # the base of a stream ending there (cos/sin of every position past L, each at its own length).
        ours, _ = self._modules(check)
        L, device = trained_length(p, check.config), ours.inv_freq.device
        errors = [self._property_ntk_dynamic(p, check)]
        x = torch.zeros(1, device=device)
        positions = self._positions(3 * L, device)
        with torch.no_grad():
            cos, sin = ours(x, positions)
            for m in (L - 1, L, L + 1, 2 * L, 3 * L - 1):
                cos_m, sin_m = ours.at_length(x, positions[:, m:m + 1], m + 1)
                errors += [check.max_abs(cos[:, m:m + 1], cos_m), check.max_abs(sin[:, m:m + 1], sin_m)]
        return max(errors)

    @obligation("prefill + decode equals the full forward (rel.)", tol=1e-5)
    def cached_decode(self, p, check) -> float:
        """Prefill, then token by token through the cache, against one forward without a cache.
        Past L for the kinds whose frequencies do not depend on the call (positions offset to run
        past L) and for ntk_consistent (run with L = min(L, 16): also forward(x)[:t] == forward(x[:t]),
        fast path == dense reference, and per layer the last query equals the untouched layer given
        transformers' dynamic cos/sin for the call's length); within L for ntk_dynamic, yarn_dynamic
        and longrope, which rescale per call — past L their cache drifts from the full forward, as
        transformers' own does (the bug ntk_consistent fixes)."""
        from surgery.transforms.window import Window

        if p.kind == "ntk_consistent":
            return self._consistent_decode(p, check)
        L = trained_length(p, check.config)
        per_call = p.kind in ("ntk_dynamic", "yarn_dynamic", "longrope")
        n = min(L, 24) if per_call else 24
        offset = 0 if per_call else L - n // 2
        device = next(check.surgered.parameters()).device
        ids = check.tokens(length=n, salt=5).to(device)
        positions = (torch.arange(n, device=device) + offset)[None].expand(ids.shape[0], -1)
        full = check.logits(check.surgered, ids, position_ids=positions, use_cache=False)
        return check.max_rel(Window._decode(check.surgered, ids, prefill=n // 3, offset=offset), full)

    def _consistent_decode(self, p, check) -> float:
        from surgery.transforms.window import Window

        errors = []
        with self._short_trained(p, check) as L:
            n = 2 * L + 8
            ids = check.tokens(length=n, salt=5)
            full = check.logits(check.surgered, ids, use_cache=False)
            errors.append(check.max_rel(Window._decode(check.surgered, ids, prefill=L // 2), full))
            for t in (L + 3, n - 5):
                errors.append(check.max_rel(check.logits(check.surgered, ids[:, :t], use_cache=False), full[:, :t]))
            mask = torch.ones_like(ids)
            mask[0, :3] = 0
            fast = check.logits(check.surgered, ids, attention_mask=mask, surgery_tile=5)
            dense = check.logits(check.surgered, ids, attention_mask=mask, surgery_reference=True)
            errors.append(check.max_rel(fast[mask.bool()], dense[mask.bool()]))
            errors.append(self._last_query_error(p, check, L, n))
        return max(errors)

    def _last_query_error(self, p, check, L: int, n: int) -> float:
        """One base throughout a query's attention: per layer, the last query of an n-token call
        equals the untouched layer given transformers' dynamic cos/sin for n tokens."""
        config = self._reference_config(p.model_copy(update={"original_max_position": L}), check.config)
        original_rotary = check.module(check.targets[0].path, surgered=False)
        reference = type(original_rotary)(config).to(original_rotary.inv_freq.device)
        pos = torch.arange(n)[None]
        errors = [0.0]
        pairs = list(zip(attention_modules(check.surgered), attention_modules(check.original)))
        inputs: dict = {}  # the hidden states each attention module receives in the untouched model
        handles = [theirs.register_forward_pre_hook(
            lambda m, args, kwargs, k=k: inputs.__setitem__(k, (args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True) for k, (_, theirs) in enumerate(pairs)]
        try:
            check.logits(check.original, check.tokens(length=n, salt=31))
        finally:
            for handle in handles:
                handle.remove()
        rotary = check.surgered.get_submodule(check.targets[0].path)
        for k, (ours, theirs) in enumerate(pairs):
            x = inputs[k]
            with torch.no_grad():
                got = ours(x, attention_mask=None, position_embeddings=rotary(x, pos))[0][:, -1]
                want = theirs(x, attention_mask=None, position_embeddings=reference(x, pos))[0][:, -1]
            errors.append(check.max_rel(got, want))
        return max(errors)

    @contextlib.contextmanager
    def _short_trained(self, p, check, short: int = 16):
        """The surgered model with its consistent rotary rebuilt for L = min(L, short), so checks
        pass L on short sequences (the attention programs find the rotary at call time)."""
        path = check.targets[0].path
        parent, _, name = path.rpartition(".")
        holder = check.surgered.get_submodule(parent) if parent else check.surgered
        current = getattr(holder, name)
        L = min(trained_length(p, check.config), short)
        replacement = build_rope(p.model_copy(update={"original_max_position": L}), check.config)
        setattr(holder, name, replacement.to(current.inv_freq.device))
        try:
            yield L
        finally:
            setattr(holder, name, current)

    def _property_llama3(self, p, check) -> float:
        # From the paper's definition in float64: wavelengths below L/high keep θ_i, above L/low are
        # θ_i/s, between the smooth blend (1 − γ)θ_i/s + γθ_i.
        ours, original = self._modules(check)
        base, dim = rope_settings(original.config)
        L = trained_length(p, original.config)
        theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        wavelength = 2 * math.pi / theta
        gamma = ((L / wavelength - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)).clamp(0, 1)
        expected = (1 - gamma) * theta / p.scale + gamma * theta
        return ((ours.inv_freq.double().cpu() - expected).abs() / expected).max().item()

    def _property_longrope(self, p, check) -> float:
        # θ_i/short_i for n ≤ L and θ_i/long_i beyond, cos² + sin² = attention factor², all in float64.
        ours, original = self._modules(check)
        base, dim = rope_settings(original.config)
        L, device = trained_length(p, original.config), original.inv_freq.device
        theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        short = torch.tensor(p.short_factor or [1.0] * (dim // 2), dtype=torch.float64)
        long = torch.tensor(p.long_factor, dtype=torch.float64)
        temperature = p.attention_factor if p.attention_factor is not None else (
            math.sqrt(1 + math.log(p.scale) / math.log(L)) if p.scale > 1 else 1.0)
        errors = []
        for n, divisors in ((L, short), (L // 2, short), (L + 1, long), (3 * L, long)):
            got = ours.frequencies(self._positions(n, device)).double().cpu()
            expected = theta / divisors
            errors.append(((got - expected).abs() / expected).max().item())
            x = torch.zeros(1, device=device)
            with torch.no_grad():
                cos, sin = ours(x, self._positions(n, device))
            errors.append(((cos.double() ** 2 + sin.double() ** 2) - temperature ** 2).abs().max().item())
        return max(errors)

    def _property_yarn_dynamic(self, p, check) -> float:
        # Identical to the unscaled model for N ≤ L, and per call exactly our static YaRN at s_n.
        ours, original = self._modules(check)
        L, device = trained_length(p, original.config), original.inv_freq.device
        errors = [self._property_ntk_dynamic(p, check)]
        for n in (L + 1, 2 * L, 3 * L):
            static = build_rope(p.model_copy(update={"kind": "yarn", "scale": self._yarn_scale_at(p, n, L)}),
                                original.config).to(device)
            errors.append(self._cos_sin_error(ours, static, self._positions(n, device), check))
        return max(errors)

    def _property_yarn(self, p, check) -> float:
        ours, original = self._modules(check)
        base, dim = rope_settings(original.config)
        L = trained_length(p, original.config)
        theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        got = ours.inv_freq.double().cpu()
        rotations = L * theta / (2 * math.pi)  # turns pair i makes within the trained context
        errors = [0.0]
        keep, interp = rotations >= p.beta_fast, rotations <= p.beta_slow
        if keep.any():
            errors.append(((got[keep] - theta[keep]).abs() / theta[keep]).max().item())
        if interp.any():
            errors.append(((got[interp] - theta[interp] / p.scale).abs() / (theta[interp] / p.scale)).max().item())
        # Between the two: a blend, so within [θ_i/s, θ_i] (how far outside, relative to θ_i).
        errors.append(((theta / p.scale - got).clamp(min=0) / theta).max().item())
        errors.append(((got - theta).clamp(min=0) / theta).max().item())
        # cos² + sin² = temperature², with the paper's temperature unless one was given.
        temperature = p.attention_factor if p.attention_factor is not None else (
            0.1 * math.log(p.scale) + 1 if p.scale > 1 else 1.0)
        x = torch.zeros(1, device=original.inv_freq.device)
        with torch.no_grad():
            cos, sin = ours(x, self._positions(4 * L, x.device))
        errors.append(((cos.double() ** 2 + sin.double() ** 2) - temperature ** 2).abs().max().item())
        return max(errors)

    @obligation("left-padded batch equals each row alone", tol=1e-4)
    def padded_rows(self, p, check) -> float:
        width = min(16, trained_length(p, check.module(check.targets[0].path, surgered=False).config))
        lengths = (width, max(1, 2 * width // 3), max(1, width // 3))
        decode = min(3, min(lengths) - 1)
        return max(check.padded_rows_error(check.surgered, lengths, generate_positions=positions, decode=steps)
                   for positions in (False, True) for steps in sorted({0, decode}))
