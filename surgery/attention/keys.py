"""What an executor is given: queries, keys and values of one attention call, and where they sit.

Columns are sequence indices (one per token the stream has seen, padding included). Keys are laid
out as two contiguous column ranges, described by Python ints so no tensor value steers control
flow (``torch.export`` can then capture the graph): positions 0 … head − 1 hold columns
0 … head − 1 (a bounded cache's sinks and the left padding before them), positions head … hold
columns start … end − 1. Queries are the last ``Tq`` columns, end − Tq … end − 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.attention.frame import Table


@dataclass
class Inputs:
    q: torch.Tensor                     # [B, H, Tq, D]; pre-RoPE in a sink frame, else as the model rotated it
    k: torch.Tensor                     # [B, Hkv, Tk, D]; likewise
    v: torch.Tensor                     # [B, Hkv, Tk, Dv]
    scaling: float
    head: int = 0                       # key layout (see the module docstring)
    start: int = 0
    pad: torch.Tensor | None = None     # [B] first real column of each row (None: no padding)
    key_ok: torch.Tensor | None = None  # [B, Tk] bool: key is a real token (None: all are)
    given: torch.Tensor | None = None   # a 4D mask the caller passed ([B|1, 1, Tq, Tk], bool or additive)
    table: Table | None = None          # the sink frame's table (q and k are then pre-RoPE)
    dropout: float = 0.0

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

    def position_of(self, columns: torch.Tensor) -> torch.Tensor:
        """Key positions of `columns` (each in the head range or in start … end − 1)."""
        return torch.where(columns < self.head, columns, columns - self.start + self.head)
