"""The cache layer of a program with a bounded cache policy.

:class:`ProgramLayer` keeps, for the stream it has seen (columns 0 … end − 1), the head columns
0 … head − 1 — every row's sinks: up to the largest left padding + sinks — and the most recent
``size − sinks`` columns. In an unpadded batch that is exactly ``size`` keys; a left-padded batch
keeps its padding columns before the sinks too (bounded by size + padding, fixed at prefill).
With ``pre_rope`` (a sink frame) it stores keys before RoPE, un-rotated with the cos/sin the model
used, and remembers the recent keys rotated in the frame so decoding rotates only the new ones.

``update`` returns every key the call's queries may need (what was kept plus the new tokens) and
records their layout (:class:`surgery.attention.keys.Inputs`) for the attention call that follows.
Per-call inputs arrive through ``kwargs["surgery_call"]`` (see :mod:`surgery.attention.implementation`);
the layer belongs to one cache, i.e. to one generation, so nothing here is shared between calls.
"""

from __future__ import annotations

import torch

from surgery.attention.frame import Table, rotate, unrotate
from surgery.attention.internals import DynamicLayer
from surgery.attention.program import Bounded
from surgery.errors import ApplyError


class ProgramLayer(DynamicLayer):
    is_sliding = False   # the mask is sized as for a full layer: one column per token of the stream
    is_croppable = False

    def __init__(self, policy: Bounded):
        super().__init__()
        self.policy = policy
        self.cumulative_length = 0
        self.head = 0              # stored positions 0 … head − 1 hold columns 0 … head − 1
        self.start = 0             # the rest hold columns start … end − 1
        self.head_span = None      # columns the head keeps (set by the first update: padding + sinks)
        self.layout = (0, 0)       # (head, start) of the keys the last update returned
        self.table: Table | None = None
        self.rotated = None        # (keys of the last update rotated in the frame, origin)
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
            key_states = unrotate(key_states, cos.unsqueeze(1), sin.unsqueeze(1)).to(key_states.dtype)
        new = key_states.shape[-2]
        end = self.cumulative_length + new
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.layout = (self.head, self.start)
        self.cumulative_length = end
        # Keep what a later query can see: the head, and the last size − sinks columns.
        recent = max(end - (self.policy.size - self.policy.sinks), 0)
        head = min(self.head_span, end)
        if self.head == 0 and self.start == 0 and recent <= head:
            self.keys, self.values = keys, values                      # nothing to evict yet
        else:
            at = recent if self.head == 0 and self.start == 0 else self.head + max(recent, self.start) - self.start
            self.keys = torch.cat([keys[..., :head, :], keys[..., at:, :]], dim=-2)
            self.values = torch.cat([values[..., :head, :], values[..., at:, :]], dim=-2)
            self.head, self.start = head, max(recent, self.start) if (self.head or self.start) else recent
        return keys, values

    def columns(self) -> torch.Tensor:
        """Columns (sequence indices) of the stored keys, in storage order."""
        end = self.cumulative_length
        return torch.cat([torch.arange(self.head), torch.arange(self.start if self.head or self.start else 0, end)])

    def frame_table(self, rotary, size: int, like: torch.Tensor) -> Table:
        if self.table is None:
            self.table = Table.of(rotary, size, like)
        return self.table

    def rotated_keys(self, keys: torch.Tensor, table: Table):
        """The returned `keys` (pre-RoPE, layout ``self.layout``) rotated at column − origin, reusing
        the rotation of keys kept from the previous call; None when the call is not a short step."""
        head, start = self.layout
        end = self.cumulative_length
        n = keys.shape[-2]
        if n - head > 2 * len(table):
            self.rotated = None  # a long chunk: the executor rotates per tile; start afresh next time
            return None
        memo = self.rotated
        origin = memo[1] if memo is not None else start
        if end - origin > 2 * len(table) - 1:  # rebase so positions stay within twice the table
            origin, memo = start, None
        columns = torch.arange(start, end, device=keys.device)
        recent = keys[..., head:, :]
        if memo is not None and memo[2] == (head, start):
            kept_keys, kept_end = memo[0], memo[3]
            fresh_cols = columns[kept_end - start:]
            cos, sin = table.at(fresh_cols - origin)
            fresh = rotate(recent[..., kept_end - start:, :].float(), cos, sin)
            rotated = torch.cat([kept_keys, fresh], dim=-2)
        else:
            cos, sin = table.at(columns - origin)
            rotated = rotate(recent.float(), cos, sin)
        # What the next call keeps of these: its layout is (self.head, self.start).
        keep_from = self.start - start if self.start >= start else 0
        self.rotated = (rotated[..., keep_from:, :], origin, (self.head, self.start), end)
        full = torch.cat([keys[..., :head, :].float(), rotated], dim=-2)  # head keys: never used in the recent frame
        return full, origin

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
        self.head_span, self.table, self.rotated = None, None, None
        self.layout = (0, 0)
        self.max_distance = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ApplyError("a bounded attention cache cannot be cropped: evicted tokens are gone "
                         "(assisted decoding and similar rollbacks are not supported)")
