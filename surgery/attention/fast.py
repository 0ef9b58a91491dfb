"""The fast execution of an attention program: query tiles, only the keys a tile can see, fused sdpa.

For a tile of queries (columns a … b − 1) the program's rules bound how far back any of them looks
(``Program.reach``), so the tile needs the key band max(0, a − reach + 1) … b − 1 only: memory is
O(tile × (tile + reach)) per call, never O(N²), and time O(N · (tile + reach)) instead of O(N²).

Two rotary frames in one tile (StreamingLLM's sinks) are merged *inside* one fused sdpa call,
exactly: the sink scores (tile × sinks, small) are computed explicitly in the sink frame and enter
the kernel as an additive mask over zero key vectors (score 0 + mask = the sink score), while the
recent band's keys are ordinary keys in the recent frame. The kernel's softmax then runs over the
union, which is the log-sum-exp merge of the two parts without materialising either part's
normaliser. (ReRoPE's far frame would enter the same way: concatenated features, one frame per half.)

Obligation (tests/attention/test_fast.py and window's obligations): equals
:func:`surgery.attention.reference.attend` on random inputs at lengths that are and are not
multiples of the tile, for every stage combination the registry allows.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from surgery.attention.frame import rotate
from surgery.attention.keys import Inputs
from surgery.attention.program import Program

TILE = 512  # queries per tile: large enough to keep sdpa efficient, small enough to bound memory


def attend(program: Program, x: Inputs, tile: int = TILE, rotated=None) -> torch.Tensor:
    """Attention output [B, Tq, H, Dv]. `rotated`: optional (keys in the recent frame, origin) a
    cache layer kept from earlier calls (decoding then rotates only the new keys)."""
    if _plain(program, x):  # causal attention, no padding: the fused kernel as transformers calls it
        tq, tk = x.q.shape[-2], x.k.shape[-2]
        out = sdpa(x.q, x.k, x.v, is_causal=tq > 1 and tq == tk, scale=x.scaling, dropout_p=x.dropout,
                   enable_gqa=x.q.shape[1] != x.k.shape[1])
        return out.transpose(1, 2)
    sinks = _sinks(program, x) if program.frame is not None else None
    tiles = []
    for a in range(0, x.q.shape[-2], tile):
        b = min(a + tile, x.q.shape[-2])
        tiles.append(_tile(program, x, a, b, sinks, rotated))
    out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=2)
    return out.transpose(1, 2)


def _plain(program: Program, x: Inputs) -> bool:
    tq, tk = x.q.shape[-2], x.k.shape[-2]
    return (not program.rules and program.frame is None and x.pad is None and x.key_ok is None
            and x.given is None and x.head == 0 and (tq == tk or tq == 1))


def _band(program: Program, x: Inputs, a: int, b: int) -> tuple[int, int]:
    """Key positions [lo, hi) that the query tile [a, b) (indices into the call's queries) may see."""
    hi = x.head + (x.q_start + b) - x.start
    reach = program.reach()
    if reach is None:
        return 0, hi
    first = max(x.q_start + a - reach + 1, 0)  # the earliest column any query of the tile reaches
    return (first if first < x.head else x.head + max(first, x.start) - x.start), hi


def _sinks(program: Program, x: Inputs):
    """(keys, values, present [B, S]) of every row's sinks: columns pad_b … pad_b + S − 1, keys
    rotated at slots 0 … S − 1 of the frame."""
    frame = program.frame
    s = torch.arange(frame.sinks, device=x.k.device)
    columns = x.pads()[:, None] + s[None]                                  # [B, S]
    stored = (columns < x.head) | ((columns >= x.start) & (columns < x.end))  # seen, and not evicted
    present = stored & (columns < x.end)
    positions = x.position_of(columns).clamp(0, x.k.shape[-2] - 1)
    index = positions[:, None, :, None]
    keys = torch.gather(x.k.float(), 2, index.expand(-1, x.k.shape[1], -1, x.k.shape[-1]))
    values = torch.gather(x.v, 2, index.expand(-1, x.v.shape[1], -1, x.v.shape[-1]))
    if x.key_ok is not None:
        present = present & torch.gather(x.key_ok, 1, positions)
    cos, sin = x.table.at(s)
    return rotate(keys, cos, sin), values, present


def _tile(program: Program, x: Inputs, a: int, b: int, sinks, rotated) -> torch.Tensor:
    lo, hi = _band(program, x, a, b)
    k, v = x.k[..., lo:hi, :], x.v[..., lo:hi, :]
    device = x.q.device
    k_pos = torch.arange(lo, hi, device=device)
    k_cols = torch.where(k_pos < x.head, k_pos, k_pos - x.head + x.start)
    q_cols = torch.arange(x.q_start + a, x.q_start + b, device=device)
    pad = x.pads()[:, None, None]
    i = q_cols[None, :, None] - pad                                        # [B, t, 1]
    j = k_cols[None, None, :] - pad                                        # [B, 1, n]
    visible = program.visible(i, j) & (j >= 0)
    if x.key_ok is not None:
        visible = visible & x.key_ok[:, k_pos][:, None, :]
    if program.frame is not None:
        visible = visible & (j >= program.frame.sinks)                     # sinks come through their own frame
    if x.pad is not None:
        visible = visible | ((i < 0) & (q_cols[:, None] == k_cols[None, :]))
    q = x.q[..., a:b, :]
    given = None
    if x.given is not None:
        given = x.given[..., a:b, :][..., k_pos]
        if given.dtype == torch.bool:
            visible, given = visible & given[:, 0], None
    if program.frame is None:
        mask = visible[:, None] if given is None else torch.where(visible[:, None], given.to(q.dtype), float("-inf"))
        return sdpa(q, k, v, attn_mask=mask, scale=x.scaling, dropout_p=x.dropout,
                    enable_gqa=q.shape[1] != k.shape[1])
    return _sink_tile(program, x, q, k, v, q_cols, k_cols, i, visible, given, sinks, rotated, lo, hi)


def _sink_tile(program, x: Inputs, q, k, v, q_cols, k_cols, i, visible, given, sinks, rotated, lo, hi):
    frame = program.frame
    q = q.float()
    # Recent band: query and keys at their columns, shifted by a common origin (the distances are
    # what count), so positions stay within tile + reach of the table.
    if rotated is not None:
        keys, origin = rotated
        k_rec = keys[..., lo:hi, :]
    else:
        origin = lo if lo < x.head else lo - x.head + x.start  # the band's first column
        cos_k, sin_k = x.table.at(k_cols - origin)
        k_rec = rotate(k.float(), cos_k, sin_k)
    cos_q, sin_q = x.table.at(q_cols - origin)
    q_rec = rotate(q, cos_q, sin_q)
    # Sinks: the query at its cache slot min(i', size − 1), sink s at slot s.
    sink_k, sink_v, present = sinks
    cos_s, sin_s = x.table.at(i[..., 0].clamp(0, frame.size - 1))        # [B, t, D]
    q_sink = rotate(q, cos_s[:, None], sin_s[:, None])                   # [B, H, t, D]
    B, H, t, D = q_sink.shape
    hkv = sink_k.shape[1]
    scores = (q_sink.view(B, hkv, H // hkv, t, D) @ sink_k[:, :, None].transpose(-1, -2)).view(B, H, t, -1)
    s = torch.arange(frame.sinks, device=q.device)
    sink_ok = present[:, None, :] & (s[None, None, :] <= i)              # [B, t, S]
    low = torch.finfo(torch.float32).min
    sink_mask = torch.where(sink_ok[:, None], scores * x.scaling, low)
    band_mask = torch.where(visible[:, None], 0.0, low)
    if given is not None:
        band_mask = band_mask + given.float()
    mask = torch.cat([sink_mask, band_mask.expand(B, H, t, -1)], dim=-1)
    zeros = k_rec.new_zeros(k_rec.shape[0], k_rec.shape[1], frame.sinks, k_rec.shape[-1])
    keys = torch.cat([zeros, k_rec], dim=-2)
    values = torch.cat([sink_v.to(v.dtype), v], dim=-2).float()
    out = sdpa(q_rec, keys, values, attn_mask=mask, scale=x.scaling, dropout_p=x.dropout,
               enable_gqa=H != hkv)
    return out.to(x.v.dtype)
