"""The cache layer of a program with a bounded cache policy.

:class:`ProgramLayer` keeps, for the stream it has seen (columns 0 … end − 1), the head columns
0 … head − 1 — every row's sinks: up to the largest left padding + sinks — and the most recent
``size − sinks`` columns. In an unpadded batch that is exactly ``size`` keys; a left-padded batch
keeps its padding columns before the sinks too (bounded by size + padding, fixed at prefill).
With ``pre_rope`` (a sink frame) it stores keys before RoPE, un-rotated with the cos/sin the model
used, and remembers the recent keys rotated in the frame so decoding rotates only the new ones.

With a :class:`PreRope` policy nothing is evicted and every key is stored before RoPE: the frame
re-rotates them per call (:class:`RelativeFrame`: near and far keys differently;
:class:`ConsistentFrame`: with the base of each query's length). Its first call (a prefill) returns
the keys as the model rotated them (``returned_raw`` False), so a prefill computes exactly what a
forward without a cache does.

``update`` returns every key the call's queries may need (the head and the columns its first query
can see, plus the new tokens: one copy per tensor) and records their layout
(:class:`surgery.attention.keys.Inputs`) for the attention call that follows.
Per-call inputs arrive through ``kwargs["surgery_call"]`` (see :mod:`surgery.attention.implementation`);
the layer belongs to one cache, i.e. to one generation, so nothing here is shared between calls.
"""

from __future__ import annotations

import torch

from surgery.attention.frame import Table, rotate_signed, signed
from surgery.attention.internals import DynamicLayer
from surgery.attention.program import Bounded, PreRope, SinkFrame
from surgery.errors import ApplyError


class Shared:
    """What the layers of one cache compute alike: the frame table (a function of the rotary and the
    frame's size), and, per call, values that depend only on the call's cos/sin, its mask and Python
    ints (the rotations at the call's positions, each row's padding). The first layer computes them,
    the others reuse them. A call's entries are keyed by the identity of its tensors, which they hold
    (so an identity cannot be reused while the entry lives), and dropped when a call brings others."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int], tuple[object, Table]] = {}
        self.anchor: tuple = ()
        self.values: dict = {}

    def table(self, rotary, size: int, like: torch.Tensor) -> Table:
        held = self.tables.get((id(rotary), size))
        if held is None or held[0] is not rotary:
            held = self.tables[id(rotary), size] = (rotary, Table.of(rotary, size, like))
        return held[1]

    def per_call(self, anchor: tuple, name: tuple, make):
        """`make()` once per `name` while the call's tensors are the same objects as `anchor`."""
        if len(anchor) != len(self.anchor) or any(a is not b for a, b in zip(anchor, self.anchor)):
            self.anchor, self.values = anchor, {}
        if name not in self.values:
            self.values[name] = make()
        return self.values[name]


def _pieces(t: torch.Tensor, layout: tuple[int, int], kept: tuple[int, int]) -> list[torch.Tensor]:
    """Views of `t` (keys in `layout`) holding, in order, the columns of layout `kept` (a subset)."""
    head, start = kept
    at = start if layout == (0, 0) else layout[0] + start - layout[1]
    return [t] if (head, start) == (0, 0) or at == head else [t[..., :head, :], t[..., at:, :]]


def _take(t: torch.Tensor, layout: tuple[int, int], kept: tuple[int, int], *new: torch.Tensor) -> torch.Tensor:
    """The columns of layout `kept` from `t`, followed by `new`: one copy at most."""
    pieces = [*_pieces(t, layout, kept), *new]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


def _inverse(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, signed(−s)) / (c² + s²): the inverse rotation for :func:`rotate_signed`, per head."""
    norm = cos.float() ** 2 + sin.float() ** 2
    return (cos.float() / norm).unsqueeze(1), signed(-sin.float() / norm).unsqueeze(1)


def _signed(cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_sin[0], signed(cos_sin[1])


class ProgramLayer(DynamicLayer):
    is_sliding = False   # the mask is sized as for a full layer: one column per token of the stream
    is_croppable = False

    def __init__(self, policy: Bounded | PreRope, shared: Shared | None = None):
        super().__init__()
        self.policy = policy
        self.shared = shared or Shared()  # with the other layers of its cache
        self.cumulative_length = 0
        self.head = 0              # stored positions 0 … head − 1 hold columns 0 … head − 1
        self.start = 0             # the rest hold columns start … end − 1
        self.head_span = None      # columns the head keeps (set by the first update: padding + sinks)
        self.layout = (0, 0)       # (head, start) of the keys the last update returned
        self.table: Table | None = None
        self.keys2 = None          # the stored keys rotated in a frame (fast.frame_keys), at column − origin
        self.returned2 = None      # the same for the keys the last update returned
        self.returned_raw = True   # whether the keys the last update returned are pre-RoPE
        self.origin = 0
        self.max_distance = 0      # largest query–key distance attention used (when recorded)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs=None, **rest):
        call = (kwargs or {}).get("surgery_call")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        if self.head_span is None:
            pad = 0 if call is None or call.pad is None else int(call.pad.max())
            self.head_span = pad + self.policy.sinks if self.policy.sinks else 0
        if self.policy.pre_rope:
            if call is None or call.position_embeddings is None:
                raise ApplyError("a pre-RoPE cache needs the cos/sin the attention module was called with")
            cos, sin = call.position_embeddings
            # x = (c − sJ)y / (c² + s²) (frame.unrotate), with the normalised c, s shared by the layers
            c, si = self.shared.per_call(call.anchor(), ("unrotate",), lambda: _inverse(cos, sin))
            rotated, key_states = key_states, rotate_signed(key_states.float(), c, si).to(key_states.dtype)
        start_col = self.cumulative_length
        end = start_col + key_states.shape[-2]
        reach = None if self.policy.size is None else self.policy.size - self.policy.sinks  # None: keep all
        # Return the head and what the call's first query may see (one copy per tensor), …
        stored = (self.head, self.start)
        returned = (0, 0) if reach is None else self._kept(start_col - reach + 1, end)
        keys = _take(self.keys, stored, returned, key_states)
        values = _take(self.values, stored, returned, value_states)
        self.layout = returned
        self.cumulative_length = end
        framed = None
        if self.policy.pre_rope and isinstance(call.program.frame, SinkFrame):
            framed = self._frame(call, keys, key_states, stored, start_col, end)
        self.returned2 = framed
        # … and keep what the next call's first query may see: after a single new token that is what
        # was returned (the one key too old for the next query goes at the next update's copy).
        kept = returned if key_states.shape[-2] == 1 or reach is None else self._kept(end - reach + 1, end)
        self.keys, self.values = _take(keys, returned, kept), _take(values, returned, kept)
        self.keys2 = _take(framed, returned, kept) if framed is not None else None
        self.head, self.start = kept
        # A PreRope layer's first call (a prefill) hands attention the keys as the model rotated them,
        # so a prefill is exactly the full forward without a cache (no un-rotation round trip).
        self.returned_raw = not (isinstance(self.policy, PreRope) and start_col == 0)
        return (keys if self.returned_raw else rotated), values

    def _kept(self, first: int, end: int) -> tuple[int, int]:
        """The layout keeping the head and the columns first … end − 1 ((0, 0): every column)."""
        head = min(self.head_span, end)
        start = max(first, head)
        return (head, start) if start > head else (0, 0)

    def _frame(self, call, keys, new_keys, stored: tuple[int, int], start_col: int, end: int):
        """The returned keys rotated in the frame (see fast.frame_keys), rotating only the new ones;
        rebased (all re-rotated from the pre-RoPE keys) when positions would pass 3·size.

        The origin is set one frame size before the first kept column, so that a decoding step can
        place the sinks in this frame too (at column − origin − (size − 1 − slot) ≥ 0; see
        fast._step)."""
        from surgery.attention.fast import frame_keys

        frame = call.program.frame
        table = self.frame_table(frame.rotary(), frame.size, new_keys)
        head, start = self.layout
        if self.keys2 is None or end - self.origin > 3 * frame.size:
            self.origin = max(start - frame.size, 0)
            columns = torch.cat([torch.arange(head), torch.arange(start, end)]).to(keys.device)
            return frame_keys(table, keys, (columns - start).clamp(min=0) + start, self.origin, end)
        c, s = self.shared.per_call(
            call.anchor(), ("fresh", id(table), start_col, end, self.origin),
            lambda: _signed(table.at(torch.arange(start_col - self.origin, end - self.origin, device=keys.device),
                                     bound=end - self.origin)))
        fresh = rotate_signed(new_keys.float(), c, s)
        return _take(self.keys2, stored, self.layout, fresh)

    def columns(self) -> torch.Tensor:
        """Columns (sequence indices) of the stored keys, in storage order."""
        first = self.start if self.head or self.start else 0
        return torch.cat([torch.arange(self.head), torch.arange(first, self.cumulative_length)])

    def frame_table(self, rotary, size: int, like: torch.Tensor) -> Table:
        if self.table is None:
            self.table = self.shared.table(rotary, size, like)
        return self.table

    def frame_inputs(self):
        """(keys of the last update rotated in the frame, origin), for the fast path."""
        return self.returned2, self.origin

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # One mask column per token seen, as a full layer: the program picks its keys' columns.
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # the stream may grow without bound; only the stored keys are bounded

    def reset(self) -> None:
        super().reset()
        self.head = self.start = 0
        self.head_span, self.table, self.keys2, self.returned2 = None, None, None, None
        self.origin = 0
        self.layout = (0, 0)
        self.max_distance = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ApplyError("a bounded attention cache cannot be cropped: evicted tokens are gone "
                         "(assisted decoding and similar rollbacks are not supported)")
