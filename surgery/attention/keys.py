"""What an executor is given: queries, keys and values of one attention call, and where they sit.

Columns are sequence indices (one per token the stream has seen, padding included). Keys are laid
out as two contiguous column ranges, described by Python ints so no tensor value steers control
flow (``torch.export`` can then capture the graph): positions 0 … head − 1 hold columns
0 … head − 1 (a bounded cache's sinks and the left padding before them), positions head … hold
columns start … end − 1. Queries are the last ``Tq`` columns, end − Tq … end − 1. A K/V prefix
(``prefix``) has no column: it sits before the stream, outside this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.attention.frame import Table


@dataclass
class Inputs:
    q: torch.Tensor                     # [B, H, Tq, D] as the model rotated it
    k: torch.Tensor                     # [B, Hkv, Tk, D] as the model rotated it, or pre-RoPE (k_raw)
    v: torch.Tensor                     # [B, Hkv, Tk, Dv]
    scaling: float
    head: int = 0                       # key layout (see the module docstring)
    start: int = 0
    pad: torch.Tensor | None = None     # [B] first real column of each row (None: no padding)
    key_ok: torch.Tensor | None = None  # [B, Tk] bool: key is a real token (None: all are)
    given: torch.Tensor | None = None   # a 4D mask the caller passed ([B|1, 1, Tq, Tk], bool or additive)
    table: Table | None = None          # a sink frame's table
    cos: torch.Tensor | None = None     # [B, Tq, D] the model's rotation of q (and of k unless k_raw)
    sin: torch.Tensor | None = None
    k_raw: bool = False                 # keys come from a pre-RoPE cache
    dropout: float = 0.0
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # K/V prefix: keys, values [B|1, Hkv, P, D]
    prefix_weight: torch.Tensor | None = None  # [B, Tq] log-weight of the prefix for each query (a gate, log g)
    positions: torch.Tensor | None = None  # [B|1, Tq] the call's position ids, when the module was given them
    unpadded: bool | None = None        # a single query whose padding mask has no padding (None: not known)
    shared: tuple | None = None         # (cache.Shared of the layer's cache, the call's anchor), or None

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V prefix expanded to the batch: keys [B, Hkv, P, D], values [B, Hkv, P, Dv]."""
        keys, values = self.prefix
        b = self.q.shape[0]
        return keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1)

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) before RoPE, float32 (a sink frame's inputs)."""
        from surgery.attention.frame import unrotate

        cos, sin = self.cos[:, None], self.sin[:, None]
        return unrotate(self.q, cos, sin), (self.k.float() if self.k_raw else unrotate(self.k, cos, sin))

    @property
    def end(self) -> int:
        return self.start + self.k.shape[-2] - self.head

    @property
    def q_start(self) -> int:
        return self.end - self.q.shape[-2]

    def key_columns(self) -> torch.Tensor:
        device = self.k.device
        return torch.cat([torch.arange(self.head, device=device), torch.arange(self.start, self.end, device=device)])

    def query_columns(self) -> torch.Tensor:
        return torch.arange(self.q_start, self.end, device=self.q.device)

    def pads(self) -> torch.Tensor:
        if self.pad is None:
            return torch.zeros(self.q.shape[0], dtype=torch.long, device=self.q.device)
        return self.pad

    def position_offset(self) -> torch.Tensor:
        """[B, 1] position id minus stream index of each row (0 without position ids), read at the
        row's first real query of the call (padding columns carry arbitrary position ids)."""
        pads = self.pads()
        if self.positions is None:
            return torch.zeros_like(pads)[:, None]
        positions = self.positions.expand(self.q.shape[0], -1)
        first = (pads - self.q_start).clamp(0, self.q.shape[-2] - 1)[:, None]  # index of the first real query
        return torch.gather(positions, 1, first) - (self.q_start + first - pads[:, None])

    def lengths(self) -> torch.Tensor:
        """[B] tokens each row's stream holds in this call: its real keys (padding on either side
        excluded), else every column from its first real one."""
        if self.key_ok is not None:
            return self.key_ok.sum(-1)
        return self.end - self.pads()

    def position_of(self, columns: torch.Tensor) -> torch.Tensor:
        """Key positions of `columns` (each in the head range or in start … end − 1)."""
        return torch.where(columns < self.head, columns, columns - self.start + self.head)
