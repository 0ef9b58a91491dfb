"""The cache layer of a program with a bounded cache policy.

:class:`ProgramLayer` keeps, for the stream it has seen (columns 0 … end − 1), the head columns
0 … head − 1 — every row's sinks: up to the largest left padding + sinks — and the most recent
``size − sinks`` columns. In an unpadded batch that is exactly ``size`` keys; a left-padded batch
keeps its padding columns before the sinks too (bounded by size + padding, fixed at prefill).
With ``pre_rope`` (a sink frame) it stores keys before RoPE, un-rotated with the cos/sin the model
used, and remembers the recent keys rotated in the frame so decoding rotates only the new ones.
Single-token decoding steps on an unpadded stream write in place (:class:`Ring`), from the first
step after the prompt, while the cache fills and once it evicts.

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

import operator

import torch

from surgery.attention import fast
from surgery.attention.frame import Table, composite, matrix, rotate, rotate_signed, signed
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
        if len(anchor) != len(self.anchor) or not all(map(operator.is_, anchor, self.anchor)):
            self.anchor, self.values = anchor, {}
        if name not in self.values:
            self.values[name] = make()
        return self.values[name]


class Ring:
    """A bounded cache written in place (steady decoding: one token in, and once full the oldest recent one out).

    Storage is [slots, B, H, D] (keys, values, and with a sink frame the keys rotated in the frame),
    seen as [B, H, slots, D] views: slots 0 … head − 1 hold the head, slots head … hold the recent
    columns in a ring — column c at head + (c − base) mod R, R = slots − head, `base` fixed when
    the ring is built. A new column takes the next free slot while the cache fills, then the slot of
    the column it evicts (c − R), so a step writes one vector per tensor and copies nothing.
    Attention over an unmasked band does not depend on the keys' order, so the views of the slots
    in use go straight to the fused kernel; any other call first takes the columns back in order
    (:meth:`ordered`).

    With a sink frame, the frame keys hold the recent keys at column − origin (as
    ``ProgramLayer.keys2``) and, in slots 0 … S − 1, the sinks as the step's query needs them: sink s
    at s + offset with offset = i − min(i, size − 1) − origin (see fast._step). The sinks rotated at
    their slots, R(s)k_s, are kept (``sinks``), so a step places them with one rotation by offset
    (none while the offset stays where ``placed`` says it is: 0 while the cache fills)."""

    def __init__(self, keys, values, framed, head: int, base: int, slots: int, table: Table | None = None):
        """`keys`, `values`, `framed` hold the first columns in slot order (the head, then base …)."""
        def store(t):
            storage = t.new_zeros((slots, t.shape[0], t.shape[1], t.shape[3]))  # free slots are never read
            storage[:t.shape[2]] = t.permute(2, 0, 1, 3)
            return storage
        self.k, self.v = store(keys), store(values)
        self.f = store(framed) if framed is not None else None
        self.keys, self.values = self.k.permute(1, 2, 0, 3), self.v.permute(1, 2, 0, 3)
        self.framed = self.f.permute(1, 2, 0, 3) if self.f is not None else None
        self.head, self.base, self.r = head, base, slots - head
        # Views [B, H, 1, D] of each slot (key, value, frame key), made at once: one op per tensor.
        self.slots = list(zip(*(t.unsqueeze(3).unbind(0) if t is not None else (None,) * slots
                                for t in (self.k, self.v, self.f))))
        self.sinks = self.sink_slots = self.placed = None
        if self.f is not None and head:
            positions = torch.arange(head, device=keys.device)
            c, si = table.at(positions, bound=head)
            self.sinks = rotate(self.k[:head].float(), c[:, None, None], si[:, None, None])
            self.sink_slots = self.f[:head]

    def slot(self, column: int):
        """Views [B, H, 1, D] of the slot that holds `column` (key, value, frame key)."""
        return self.slots[self.head + (column - self.base) % self.r]

    def columns(self, start: int, end: int) -> torch.Tensor:
        """The column each slot holds, the ring full and holding columns start … end − 1."""
        r = self.r
        ring = torch.arange(r, device=self.k.device)
        first = (start - self.base) % r  # the slot offset of column `start`
        return torch.cat([torch.arange(self.head, device=self.k.device), start + (ring - first) % r])

    def ordered(self, start: int, end: int) -> tuple:
        """(keys, values, frame keys) in column order, as ProgramLayer keeps them in layout (head,
        start) with columns up to end − 1: start = 0, the ring not yet full, is columns 0 … end − 1
        (slots 0 … end − 1); otherwise the full ring's head, then start … ."""
        if start == 0:
            return tuple(None if t is None else t[..., :end, :] for t in (self.keys, self.values, self.framed))
        p = self.head + (start - self.base) % self.r

        def order(t):
            return None if t is None else torch.cat([t[..., :self.head, :], t[..., p:, :], t[..., self.head:p, :]], -2)
        return order(self.keys), order(self.values), order(self.framed)


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


def _unpadded(mask) -> bool:
    """Whether the model's key-padding mask ([B, 1, 1, K] bool, implementation.key_padding) has no
    padding: every column real. Any other mask (a caller's 4D mask) counts as padding."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[2] == 1
            and bool(mask.all()))


def _rotate_into(slot: torch.Tensor, x: torch.Tensor, rotation: torch.Tensor) -> None:
    """slot ← x @ rotation, written in place (one op when the dtypes agree)."""
    if slot.dtype == x.dtype == rotation.dtype:
        torch.matmul(x, rotation, out=slot)
    else:
        slot.copy_(torch.matmul(x.float(), rotation))


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
        self.ring: Ring | None = None  # the cache written in place while decoding is steady
        self.stepped = None        # after a ring step: (keys for attention, the query's rotation) (fast.ring_step)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs=None, **rest):
        call = (kwargs or {}).get("surgery_call")
        self.stepped = None
        if call is not None and self._steady(call, key_states, value_states):
            return self._step(call, key_states, value_states)
        if self.ring is not None:  # any other call sees the columns in order again
            self.keys, self.values, self.keys2 = self.ring.ordered(self.start, self.cumulative_length)
            self.ring = None
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

    def _steady(self, call, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether this call is a steady decoding step, written in place (:class:`Ring`): one new
        token, filling the cache or evicting the oldest recent column; window rules only (so the
        query sees every stored key unmasked); no padding anywhere and no caller mask; no gradient
        through the cache; and what :meth:`_ringable` asks of the layer. Everything else takes the
        general path."""
        if (key_states.shape[-2] != 1 or call.reference or not call.program.only_windows
                or key_states.requires_grad or value_states.requires_grad):
            return False
        if self.ring is None and not self._ringable():
            return False
        return call.mask is None or self.shared.per_call(call.anchor(), ("unpadded",), lambda: _unpadded(call.mask))

    def _ringable(self) -> bool:
        """What :meth:`_steady` asks of the layer itself: a bounded policy whose head holds exactly
        the sinks (no padding), all of them stored; the layout a general step leaves (every stored
        column visible to the next query but the one it evicts: columns 0 … end − 1 with end ≤ size,
        or the head and the last reach − 1 or reach columns); and with a sink frame the frame keys
        kept and the origin at or before the sinks' offset. Once the ring is built, each step keeps
        all of it (the head never moves, the sinks' offset never decreases and a rebase leaves it at
        reach + 1), so it is asked only before."""
        policy = self.policy
        if policy.size is None or self.head_span != policy.sinks or self.cumulative_length < self.head_span:
            return False
        end, reach = self.cumulative_length, policy.size - policy.sinks
        if (self.head, self.start) == (0, 0):
            if end > policy.size:
                return False
        elif self.head != self.head_span or not end - reach <= self.start <= end - reach + 1:
            return False
        return not policy.pre_rope or (self.keys2 is not None and fast.sink_offset(end, policy.size, self.origin) >= 0)

    def _step(self, call, key_states: torch.Tensor, value_states: torch.Tensor):
        """A steady step: the new column takes the next free slot, or the slot of the column it
        evicts, in place. With a sink frame its key is written un-rotated and in the frame, and the
        sinks are moved to the step's offset; the query's rotation into the frame is left for
        attention (``stepped``). The layer's layout afterwards is the one the general path keeps."""
        i, size = self.cumulative_length, self.policy.size
        if self.ring is None:  # layout (0, 0) is the head (0 … head_span − 1), then columns head_span …
            self.ring = Ring(self.keys, self.values, self.keys2, self.head_span, self.start or self.head_span, size,
                             self.table)
        ring = self.ring
        start = i + 1 - (size - self.policy.sinks)  # the oldest recent column after this step, once full
        key, value, framed = ring.slot(i)  # a free slot, or that of column i − R, which leaves the window
        value.copy_(value_states)
        if framed is None:
            key.copy_(key_states)
        else:
            rebase = i + 1 - self.origin > 3 * size  # as _frame does: keeps positions in 3·size
            if rebase:
                self.origin = max(start - size, 0)
            raw, frame, sinks = self.shared.per_call(call.anchor(), ("ring", id(self.table), i, self.origin),
                                                     lambda: self._rotations(call, i))
            _rotate_into(key, key_states, raw)
            if rebase:  # every recent key again from its pre-RoPE key, at column − origin
                columns = ring.columns(start, i + 1)
                columns = (columns - start).clamp(min=0) + start  # the head's slots: any column
                ring.f.copy_(fast.frame_keys(self.table, ring.keys, columns, self.origin, i + 1).permute(2, 0, 1, 3))
            else:
                _rotate_into(framed, key_states, frame)
            offset = fast.sink_offset(i, size, self.origin)
            if rebase or ring.placed != offset:
                torch.matmul(ring.sinks, sinks, out=ring.sink_slots)
                ring.placed = offset
        self.cumulative_length = i + 1
        if start > self.head_span:
            self.head, self.start = self.head_span, start
            self.keys, self.values, self.keys2 = ring.keys, ring.values, ring.framed
        else:  # still filling: slots 0 … i hold columns 0 … i
            self.keys, self.values = ring.keys[..., :i + 1, :], ring.values[..., :i + 1, :]
            self.keys2 = None if framed is None else ring.framed[..., :i + 1, :]
        self.layout = (self.head, self.start)
        self.returned2 = self.keys2
        self.stepped = (self.keys if framed is None else self.keys2, None if framed is None else frame)
        return self.keys, self.values

    def _rotations(self, call, i: int):
        """Matrices of one step (shared by the layers): the model's rotation at column i undone, the
        move from it into the frame at i − origin (the new key's and the query's), and the sinks'
        rotation by fast.sink_offset (a unit rotation: the table's scale is in Ring.sinks already)."""
        cos, sin = (t.float() for t in call.position_embeddings)  # [B, 1, D]
        norm = cos * cos + sin * sin
        frame_c, frame_s = composite(*self.table.at(torch.tensor([i - self.origin], device=cos.device),
                                                    bound=i - self.origin + 1), cos, sin)
        offset = fast.sink_offset(i, self.policy.size, self.origin)
        sink_c, sink_s = self.table.at(torch.tensor(offset, device=cos.device), bound=offset + 1)
        scale = self.table.scale[0]
        one = cos.shape[0] == 1  # one rotation for the batch: [D, D] matrices (matmul folds the batch)
        raw = matrix(cos / norm, -sin / norm)  # frame.unrotate: (c − sJ)/(c² + s²)
        frame = matrix(frame_c, frame_s)
        return ((raw[0, 0], frame[0, 0]) if one else (raw, frame)) + (matrix(sink_c / scale, sink_s / scale),)

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
        frame = call.program.frame
        table = self.frame_table(frame.rotary(), frame.size, new_keys)
        head, start = self.layout
        if self.keys2 is None or end - self.origin > 3 * frame.size:
            self.origin = max(start - frame.size, 0)
            columns = torch.cat([torch.arange(head), torch.arange(start, end)]).to(keys.device)
            return fast.frame_keys(table, keys, (columns - start).clamp(min=0) + start, self.origin, end)
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
        self.ring = self.stepped = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ApplyError("a bounded attention cache cannot be cropped: evicted tokens are gone "
                         "(assisted decoding and similar rollbacks are not supported)")
