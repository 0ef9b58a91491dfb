"""Rotary frames: where queries and keys are rotated, and the float32 helpers that move between frames.

RoPE rotates each pair of a head vector by an angle m·θ_i at position m. Writing J for
``rotate_half`` (J² = −1 on every pair), rotating x at m is ``x·cos_m + J(x)·sin_m``. A score
``q_m · k_n`` depends on m − n only while the frequencies θ_i are fixed, which is what lets a stage
place queries and keys at positions of its choosing (a *frame*):

* the **absolute frame**: positions as the model computed them (``position_ids``); the program
  uses the rotated queries and keys it is handed.
* a **table frame** (StreamingLLM's cache positions): positions inside a cache of ``size`` slots.
  The rotary module is called once with positions 0 … size − 1, so a dynamic rotary computes its
  frequencies for a context of ``size`` tokens — the same in a full forward and in every decoding
  step. Positions past the table (a tile of queries with its band of keys spans tile + size) are
  reached by composing rotations: R(a + b) = R(a)·R(b) for the table's frequencies.

Queries and keys arrive rotated by the model (whatever its rotary did for that call); they are
un-rotated with the exact cos/sin the model used, then rotated in the frame. All of it in float32.
"""

from __future__ import annotations

import contextlib

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def signed(sin: torch.Tensor) -> torch.Tensor:
    """The sine with rotate_half's sign folded in, for :func:`rotate_signed`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``rotate(x, cos, sin)`` given ``signed(sin)``: J(x)·s = roll(x, d/2)·signed(s), one op where
    rotate_half takes four (decoding steps, where the count of small ops is the cost). Exact."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation ``rotate(·, cos, sin)`` as a matrix M, [..., D, D] from [..., D]: ``x @ M`` is one
    op where the elementwise form takes four, for a decoding step that rotates a vector per layer
    by the same angles (its rows hold c on the diagonal and ∓s where rotate_half pairs j with j ± D/2)."""
    half = cos.shape[-1] // 2
    m = torch.diag_embed(cos)
    m[..., half:, :half] = torch.diag_embed(-sin[..., :half])  # y_j gets −x_{j+h}·s_j for j < h
    m[..., :half, half:] = torch.diag_embed(sin[..., half:])   # and x_{j−h}·s_j for j ≥ h
    return m


def unrotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x from y = (c + sJ)x: x = (c − sJ)y / (c² + s²); the division also undoes a rotary's
    attention scaling (YaRN multiplies cos and sin by it). Float32."""
    cos, sin, y = cos.float(), sin.float(), y.float()
    return (y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)


class Table:
    """cos/sin of a table frame: the rotary called once at positions 0 … size − 1 (float32).

    ``at(positions)`` gives cos/sin at any non-negative positions, extending the table by composing
    with the rotation at size − 1 (angle addition) where a position lies beyond it."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        # [size, dim] each; the rotary's own scaling factor (YaRN) is |(cos, sin)| at position 0.
        self.cos, self.sin = cos.float(), sin.float()
        self.scale = self.cos[0:1]  # cos(0)·f = f per dimension
        self.longest: Table = self  # the longest extension built so far (a cache layer's table lives a stream)

    @classmethod
    def of(cls, rotary, size: int, like: torch.Tensor) -> "Table":
        return cls(*table_rotation(rotary, size, like))

    def __len__(self) -> int:
        return self.cos.shape[0]

    def extend(self, n: int) -> "Table":
        """This table grown to at least `n` positions (itself when long enough); remembered, so a
        decoding stream extends its table once, not at every step."""
        if n <= len(self):
            return self
        if n <= len(self.longest):
            return self.longest
        cos, sin = [self.cos], [self.sin]
        size = self.cos.shape[0]
        step_cos, step_sin = self.cos[-1:] / self.scale, self.sin[-1:] / self.scale  # unit rotation at size − 1
        base_cos, base_sin = self.cos[1:], self.sin[1:]
        total = size
        last_cos, last_sin = step_cos, step_sin  # unit rotation at the last position reached
        while total < n:
            # positions total … total + size − 2 are (last) + r for r in 1 … size − 1
            cos.append(base_cos * last_cos - base_sin * last_sin)
            sin.append(base_sin * last_cos + base_cos * last_sin)
            last_cos, last_sin = cos[-1][-1:] / self.scale, sin[-1][-1:] / self.scale
            total += size - 1
        self.longest = Table(torch.cat(cos), torch.cat(sin))
        return self.longest

    def at(self, positions: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at `positions` (any shape, non-negative), shape positions.shape + [dim].

        `bound`: a Python int above every position, when the caller knows one (the fast path always
        does): then no tensor value decides the table's size, so torch.export can capture the call."""
        if bound is None:
            bound = int(positions.max()) + 1 if positions.numel() else 0
        table = self.extend(bound)
        return table.cos[positions], table.sin[positions]


def table_rotation(rotary, size: int, like: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [size, dim] of the rotary module at positions 0 … size − 1 (what a :class:`Table` holds),
    computed without autograd unless `grad` (torch.export: see :func:`surgery.attention.export.attend`)."""
    positions = torch.arange(size, device=like.device)[None]
    with contextlib.nullcontext() if grad else torch.no_grad():
        cos, sin = rotary(like.float(), positions)
    return cos[0], sin[0]


def composite(cos: torch.Tensor, sin: torch.Tensor, given_cos=None, given_sin=None):
    """cos/sin of R(cos, sin) ∘ R(given)⁻¹: moves a vector the model rotated with (given_cos,
    given_sin) straight into the frame, in one rotation instead of un-rotating and rotating again.
    R(a)·R(b)⁻¹ = (c_a c_b + s_a s_b + (s_a c_b − c_a s_b)J) / (c_b² + s_b²), since J² = −1."""
    if given_cos is None:
        return cos, sin
    gc, gs = given_cos.float(), given_sin.float()
    norm = gc * gc + gs * gs
    return (cos * gc + sin * gs) / norm, (sin * gc - cos * gs) / norm


def frequencies(table: Table) -> torch.Tensor:
    """The table's angle per unit of position, per dimension (float64): θ = atan2(sin₁, cos₁).
    Every RoPE frequency is at most 1 rad per position, so the angle at position 1 is unambiguous."""
    return torch.atan2(table.sin[1].double(), table.cos[1].double())


def real_rotation(table: Table, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin at real (fractional) `positions`, shape positions.shape + [dim], float32: the table's
    scale times cos/sin of position·θ, with the angle formed in float64 (Leaky ReRoPE's positions
    w + (i − w)/k and j/k are rarely integers)."""
    angles = positions.double()[..., None] * frequencies(table)
    scale = table.scale[0].double()
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()
