"""The fast execution of an attention program: query tiles, only the keys a tile can see, fused sdpa.

For a tile of queries (columns a … b − 1) the program's rules bound how far back any of them looks
(``Program.reach``), so the tile needs the key band max(0, a − reach + 1) … b − 1 only: memory is
O(tile × (tile + reach)) per call, never O(N²), and time O(N · (tile + reach)) instead of O(N²).

Two rotary frames in one tile (StreamingLLM's sinks: recent keys at their true distance, sinks at
cache slots) are merged exactly by log-sum-exp: the recent band runs in torch's fused CPU flash
kernel, which returns its log-sum-exp alongside the output (``internals.sdpa_with_lse``), and the
sink scores (tile × sinks, small) are computed explicitly in the sink frame; then
out = (e^{lse−m}·out_band + Σ e^{s−m}·v_sink) / (e^{lse−m} + Σ e^{s−m}), m the larger exponent.
Two alternatives were measured and dropped: sinks as zero keys with their scores in an additive
mask (needs a float mask per head, tile × reach × heads), and concatenated features
([q_recent | q_sink] against [k | 0] and [0 | k_sink]), which doubles the head dimension and
runs the CPU kernel 4× slower.
A K/V prefix (P keys every query sees, outside the stream) joins each tile as P more keys: in
the absolute frame prepended to the tile's key band (its mask columns all true) for the one fused
call; in a sink frame as P more explicit scores beside the sinks', with the query rotated at slot
P + min(i, size − 1), merged by the same log-sum-exp. P is small (tens), so a tile then visits
P + tile + reach keys.
Every rotation happens once per call, moving the model's rotated vectors straight into the frame
(:func:`surgery.attention.frame.composite`).

Score biases (ALiBi), head rules (S2-Attn) and query scales (log-n) stay inside the tile: a bias or
a head rule makes the tile's mask float or per head, [B, H, tile, band] (never N × N); the sinks get
their bias at their slots in the t × sinks scores; a query scale multiplies the tile's queries (or,
alone on an unpadded call, the queries of the one fused causal call).

A program whose every rule is block-diagonal (S2-Attn's groups, :meth:`Program.blocks`) and that
changes nothing else is causal attention within each block: on a whole unpadded stream it runs
without tiles or masks, each partition's whole blocks batched into one fused causal call
(:func:`_in_blocks`), which is matrix-multiply speed where the tiled path's masked band is not.

Obligation (tests/attention/test_fast.py and window's obligations): equals
:func:`surgery.attention.reference.attend` on random inputs at lengths that are and are not
multiples of the tile, for every stage combination the registry allows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from surgery.attention import internals
from surgery.attention.frame import Table, composite, real_rotation, rotate, rotate_signed, signed
from surgery.attention.keys import Inputs
from surgery.attention.program import ConsistentFrame, Program, RelativeFrame

TILE = 256  # queries per tile: each query then visits tile + reach keys; large enough for sdpa to be efficient


def attend(program: Program, x: Inputs, tile: int = TILE, rotated=None) -> torch.Tensor:
    """Attention output [B, Tq, H, Dv]. `rotated`: (keys rotated in the recent frame, origin) that
    a cache layer kept from earlier calls, so decoding rotates only its new keys."""
    if _plain(program, x):  # causal attention, no padding: the fused kernel as transformers calls it
        tq, tk = x.q.shape[-2], x.k.shape[-2]
        q, scale = x.q, program.query_scale(x.query_columns()[None])  # without padding, columns are stream indices
        if scale is not None:  # a query scale (log-n) keeps the fused causal kernel: it only multiplies q
            q = q * scale[:, None, :, None].to(q.dtype)
        out = sdpa(q, x.k, x.v, is_causal=tq > 1 and tq == tk, scale=x.scaling, dropout_p=x.dropout,
                   enable_gqa=x.q.shape[1] != x.k.shape[1])
        return out.transpose(1, 2)
    if x.q.shape[-2] == 1 and _steady(program, x, rotated):  # decoding's hot path first (blocks need ≥ 2 queries)
        return _step(program, x, rotated).transpose(1, 2)
    blocks = _blocks(program, x)
    if blocks is not None:  # causal attention within blocks (S2-Attn's groups): fused calls per block
        return _in_blocks(x, blocks).transpose(1, 2)
    if isinstance(program.frame, ConsistentFrame):
        return _consistent(program, x, tile).transpose(1, 2)
    if isinstance(program.frame, RelativeFrame):
        framed = _relative(program, x)
        tiles = [_tile_relative(program, x, a, min(a + tile, x.q.shape[-2]), framed)
                 for a in range(0, x.q.shape[-2], tile)]
    else:
        framed = _framed(program, x, rotated) if program.frame is not None else None
        tiles = [_tile(program, x, a, min(a + tile, x.q.shape[-2]), framed) for a in range(0, x.q.shape[-2], tile)]
    out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=2)
    return out.transpose(1, 2)


def _plain(program: Program, x: Inputs) -> bool:
    tq, tk = x.q.shape[-2], x.k.shape[-2]
    return (not program.rules and not program.head_rules and not program.biased and program.frame is None
            and x.pad is None and x.key_ok is None and x.given is None and x.head == 0 and (tq == tk or tq == 1)
            and x.prefix is None)


def _blocks(program: Program, x: Inputs) -> tuple[tuple[int, int] | None, ...] | None:
    """Each head's blocks (:meth:`Program.blocks`) when this call can run block by block: a whole
    stream from its first token (no cache before it, no K/V prefix, no mask the caller built) and no
    padding — a padding mask of ones is none (a value check, on a whole forward only). A left-padded
    row would shift its blocks by its padding: such calls stay tiled."""
    tq, tk = x.q.shape[-2], x.k.shape[-2]
    if tq != tk or tq < 2 or x.head or x.start or x.given is not None or x.prefix is not None:
        return None
    blocks = program.blocks(x.q.shape[1])
    if blocks is None or (x.pad is not None or x.key_ok is not None) and (
            torch.compiler.is_exporting()  # the value check would be a data-dependent branch in the graph
            or (x.pad is not None and bool(x.pad.any())) or (x.key_ok is not None and not bool(x.key_ok.all()))):
        return None
    return blocks


def _in_blocks(x: Inputs, blocks: tuple[tuple[int, int] | None, ...]) -> torch.Tensor:
    """[B, H, N, Dv]: each head causal within its blocks. The heads sharing a partition run together,
    their KV heads expanded to them (a share of the heads need not align with grouped-query heads)."""
    heads = x.q.shape[1]
    groups = heads // x.k.shape[1]
    by_partition: dict = {}
    for h, partition in enumerate(blocks):
        by_partition.setdefault(partition, []).append(h)
    outs, order = [], []
    for partition, members in by_partition.items():
        index = torch.tensor(members, device=x.q.device)
        q = x.q.index_select(1, index)
        k, v = x.k.index_select(1, index // groups), x.v.index_select(1, index // groups)
        size, shift = partition if partition is not None else (x.q.shape[-2], 0)
        outs.append(_causal_blocks(q, k, v, size, shift, x.scaling, x.dropout))
        order += members
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if order != list(range(heads)):
        out = out.index_select(1, torch.tensor(order, device=out.device).argsort())
    return out


def _causal_blocks(q, k, v, size: int, shift: int, scaling: float, dropout: float) -> torch.Tensor:
    """Causal attention within blocks ⌊(i + shift)/size⌋ of the stream ([B, h, N, D] each, as many KV
    heads as query heads): the first block (size − shift tokens, when shift > 0) and the last (what
    is left) each in one fused call, the whole blocks between them in one call as a batch of
    B·(count) streams of `size` tokens. Memory O(N·size) forward and backward (autograd through sdpa),
    never N × N. Nothing wraps around: a token only ever sees its own block's earlier tokens."""
    n = q.shape[-2]
    first = min((size - shift) % size, n)
    count = (n - first) // size
    cut = first + count * size
    outs = []
    if first:
        outs.append(sdpa(q[..., :first, :], k[..., :first, :], v[..., :first, :], is_causal=True, scale=scaling,
                         dropout_p=dropout))
    if count:
        def blocked(t):  # [B, h, count·size, D] → [B·count, h, size, D]
            return t[..., first:cut, :].unflatten(2, (count, size)).transpose(1, 2).flatten(0, 1)

        out = sdpa(blocked(q), blocked(k), blocked(v), is_causal=True, scale=scaling, dropout_p=dropout)
        outs.append(out.unflatten(0, (q.shape[0], count)).transpose(1, 2).flatten(2, 3))
    if cut < n:
        outs.append(sdpa(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], is_causal=True, scale=scaling,
                         dropout_p=dropout))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _steady(program: Program, x: Inputs, rotated) -> bool:
    """A decoding step that sees its whole key band unmasked: window stages only, no padding (a mask
    of ones is none) and no caller mask, and — with a sink frame — the cache past its first eviction (sinks at positions
    0 … sinks − 1, every later position a recent key) with its keys kept in the recent frame."""
    if x.given is not None or not program.only_windows:
        return False
    # generate() always passes an attention mask; one without padding (every row starts at column
    # 0, every key real) is no padding. A value check, but only ever on a single decoding query.
    if (x.pad is not None or x.key_ok is not None) and not (
            x.unpadded if x.unpadded is not None else
            not (x.pad is not None and bool(x.pad.any())) and (x.key_ok is None or bool(x.key_ok.all()))):
        return False
    frame = program.frame
    return frame is None or (rotated is not None and rotated[0] is not None and x.k_raw and x.head == frame.sinks
                             and x.end - 1 - min(x.end - 1, frame.size - 1) >= rotated[1])


def _step(program: Program, x: Inputs, rotated) -> torch.Tensor:
    """One query (a decoding step) in the steady state of :func:`_steady`: one fused call over the
    key band, no mask, no merge ([B, H, 1, Dv]).

    With a sink frame both frames become one: the query sits at its cache slot m = min(i, size − 1)
    and sink s at slot s, so score = R(m)q·R(s)k_s = R(i − o)q·R(s + i − m − o)k_s; putting the
    sinks' pre-RoPE keys at s + i − m − o (≥ 0 by the cache's choice of origin o) places them in the
    recent frame, where the cache already keeps the recent keys at column − o."""
    lo, hi = _band(program, x, 0, 1)
    frame = program.frame
    if frame is None:
        k, v = x.k[..., lo:hi, :], x.v[..., lo:hi, :]
        return sdpa(x.q, k, v, scale=x.scaling, enable_gqa=x.q.shape[1] != k.shape[1])
    keys2, origin = rotated
    i, sinks = x.end - 1, frame.sinks
    offset = sink_offset(i, frame.size, origin)

    def rotations():  # the same for every layer of the cache in this call (cache.Shared)
        at = torch.arange(offset, offset + sinks, device=x.k.device)
        c, s = composite(*x.table.at(torch.tensor([i - origin], device=x.q.device), bound=i - origin + 1),
                         x.cos.float(), x.sin.float())
        sink_c, sink_s = x.table.at(at, bound=offset + sinks)
        return (sink_c, signed(sink_s)), (c[:, None], signed(s[:, None]))

    (sink_c, sink_s), (c, s) = rotations() if x.shared is None else x.shared[0].per_call(
        x.shared[1], ("step", id(x.table), i, origin, sinks), rotations)
    sink_keys = rotate_signed(x.k[..., :sinks, :].float(), sink_c, sink_s)
    q = rotate_signed(x.q.float(), c, s)
    if lo == sinks and not keys2.requires_grad:
        # The cache's frame keys hold the sinks at positions the band never uses: put them there.
        keys2[..., :sinks, :] = sink_keys
        k, v = keys2[..., :hi, :], x.v[..., :hi, :].float()
    else:
        k = torch.cat([sink_keys, keys2[..., max(lo, sinks):hi, :]], dim=-2)
        v = torch.cat([x.v[..., :sinks, :], x.v[..., max(lo, sinks):hi, :]], dim=-2).float()
    out = sdpa(q, k, v, scale=x.scaling, enable_gqa=q.shape[1] != k.shape[1])
    return out.to(x.v.dtype)


def ring_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, rotation=None) -> torch.Tensor:
    """A steady decoding step on a cache written in place (:class:`surgery.attention.cache.Ring`):
    the one query against every stored key, unmasked, in one fused call ([B, 1, H, Dv]). The keys
    are in slot order, not column order, which an unmasked softmax does not see. With a sink frame
    `k` holds the frame keys (the recent ones at column − origin, the sinks moved into that frame
    as in :func:`_step`) and `rotation` moves the model's query there (cache.ProgramLayer._rotations)."""
    dtype = v.dtype
    if rotation is not None:  # frame keys are float32
        q = torch.matmul(q if q.dtype == rotation.dtype else q.float(), rotation)
        v = v if v.dtype == q.dtype else v.float()
    out = sdpa(q, k, v, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    return (out if out.dtype == dtype else out.to(dtype)).transpose(1, 2)


def sink_offset(i: int, size: int, origin: int) -> int:
    """Where sink 0 sits in the recent frame (keys at column − origin) for query column i: its slot
    0 plus i − min(i, size − 1), the query's column minus its slot (see :func:`_step`)."""
    return i - min(i, size - 1) - origin


def _band(program: Program, x: Inputs, a: int, b: int) -> tuple[int, int]:
    """Key positions [lo, hi) that the query tile [a, b) (indices into the call's queries) may see."""
    hi = x.head + (x.q_start + b) - x.start
    reach = program.reach(x.q.shape[1])
    if reach is None:
        return 0, hi
    first = max(x.q_start + a - reach + 1, 0)  # the earliest column any query of the tile reaches
    return (first if first < x.head else x.head + max(first, x.start) - x.start), hi


def frame_keys(table: Table, keys: torch.Tensor, columns: torch.Tensor, origin: int, end: int, cos=None, sin=None):
    """Keys rotated in the recent frame, at column − origin; `cos`/`sin`: the model's rotation of
    `keys` (None: pre-RoPE keys); `end` bounds the columns (a Python int)."""
    c, s = composite(*table.at(columns - origin, bound=end - origin), cos, sin)
    return rotate(keys.float(), c, s)


def _framed(program: Program, x: Inputs, rotated):
    """Per call: queries in the recent and the sink frame, keys in the recent frame, the sinks."""
    frame, table = program.frame, x.table
    pad = x.pads()
    q_cols = x.query_columns()
    cos, sin = x.cos.float(), x.sin.float()                                 # [B, Tq, D]
    if rotated is not None:
        keys2, origin = rotated
    else:
        origin = 0
        keys2 = frame_keys(table, x.k, x.key_columns(), 0, x.end, *((None, None) if x.k_raw else (cos[:, None], sin[:, None])))
    c, s = composite(*table.at(q_cols - origin, bound=x.end - origin), cos, sin)
    slots = (q_cols[None, :] - pad[:, None]).clamp(0, frame.size - 1)      # the query's cache slot
    cs, ss = composite(*table.at(slots, bound=frame.size), cos, sin)
    q = x.q.float()
    q_prefix = None
    if x.prefix is not None:  # the prefix sits in the P slots before the sinks
        cp, sp = composite(*table.at(slots + x.prefix[0].shape[-2], bound=frame.size + x.prefix[0].shape[-2]), cos, sin)
        q_prefix = rotate(q, cp[:, None], sp[:, None])
    return (rotate(q, c[:, None], s[:, None]), rotate(q, cs[:, None], ss[:, None]), keys2, _sinks(program, x),
            q_prefix)


def _sinks(program: Program, x: Inputs):
    """(keys rotated at their slots [B, Hkv, S, D], values, present [B, S]): every row's sinks,
    columns pad_b … pad_b + S − 1."""
    frame = program.frame
    s = torch.arange(frame.sinks, device=x.k.device)
    columns = x.pads()[:, None] + s[None]                                  # [B, S]
    stored = (columns < x.head) | ((columns >= x.start) & (columns < x.end))  # seen, and not evicted
    present = stored & (columns < x.end)
    positions = x.position_of(columns).clamp(0, x.k.shape[-2] - 1)
    index = positions[:, None, :, None]
    keys = torch.gather(x.k, 2, index.expand(-1, x.k.shape[1], -1, x.k.shape[-1]))
    values = torch.gather(x.v, 2, index.expand(-1, x.v.shape[1], -1, x.v.shape[-1]))
    if x.key_ok is not None:
        present = present & torch.gather(x.key_ok, 1, positions)
    given = (None, None)
    if not x.k_raw:  # model-rotated keys (a full forward): the model's rotation at those columns
        at = (columns - x.q_start).clamp(0, x.cos.shape[1] - 1)[..., None].expand(-1, -1, x.cos.shape[-1])
        batch = (columns.shape[0], -1, -1)  # position ids may be shared by the batch ([1, T])
        given = (torch.gather(x.cos.float().expand(*batch), 1, at)[:, None],
                 torch.gather(x.sin.float().expand(*batch), 1, at)[:, None])
    c, si = composite(*x.table.at(s, bound=frame.sinks), *given)
    return rotate(keys.float(), c, si), values, present


def _tile(program: Program, x: Inputs, a: int, b: int, framed) -> torch.Tensor:
    lo, hi = _band(program, x, a, b)
    device = x.q.device
    k_pos = torch.arange(lo, hi, device=device)
    k_cols = torch.where(k_pos < x.head, k_pos, k_pos - x.head + x.start)
    q_cols = torch.arange(x.q_start + a, x.q_start + b, device=device)
    pad = x.pads()[:, None, None]
    i = q_cols[None, :, None] - pad                                        # [B, t, 1]
    j = k_cols[None, None, :] - pad                                        # [B, 1, n]
    heads = x.q.shape[1]
    visible = (program.visible(i, j) & (j >= 0))[:, None]                 # [B, 1|H, t, n]
    per_head = program.head_visible(i, j, heads)
    if per_head is not None:
        visible = visible & per_head
    if x.key_ok is not None:
        visible = visible & x.key_ok[:, lo:hi][:, None, None, :]
    if program.frame is not None:
        visible = visible & (j >= program.frame.sinks)[:, None]           # sinks come through their own frame
    if x.pad is not None:
        visible = visible | ((i < 0) & (q_cols[:, None] == k_cols[None, :]))[:, None]
    given = None
    if x.given is not None:
        given = x.given[..., a:b, :][..., lo:hi]
        if given.dtype == torch.bool:
            visible, given = visible & given, None
    bias = program.bias(i, j, heads)                                       # [B|1, H|1, t, n] or None
    if given is not None:
        bias = given.float() if bias is None else bias + given.float()
    scale = program.query_scale(i[..., 0])                                # [B, t] or None
    if program.frame is None:
        q, k, v = x.q[..., a:b, :], x.k[..., lo:hi, :], x.v[..., lo:hi, :]
        if scale is not None:
            q = q * scale[:, None, :, None].to(q.dtype)
        mask = visible if bias is None else torch.where(visible, bias.to(q.dtype), float("-inf"))
        if x.prefix is not None:  # [prefix; band], the prefix columns visible to every query
            pk, pv = x.prefix_kv()
            k, v = torch.cat([pk.to(k.dtype), k], dim=-2), torch.cat([pv.to(v.dtype), v], dim=-2)
            lead = (*mask.shape[:-1], pk.shape[-2])
            if x.prefix_weight is not None:  # a gate: log g_i on query i's prefix columns (float mask)
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, dtype=q.dtype, device=device).masked_fill_(~mask, float("-inf"))
                weight = x.prefix_weight[:, a:b].to(q.dtype)[:, None, :, None]
                mask = torch.cat([weight.expand(-1, mask.shape[1], -1, lead[-1]), mask], dim=-1)
            else:
                mask = torch.cat([mask.new_ones(lead) if mask.dtype == torch.bool else mask.new_zeros(lead), mask],
                                 dim=-1)
        return sdpa(q, k, v, attn_mask=mask, scale=x.scaling, dropout_p=x.dropout, enable_gqa=q.shape[1] != k.shape[1])
    q_rec, q_sink, keys, (sink_k, sink_v, present), q_prefix = framed
    q_rec, q_sink = q_rec[..., a:b, :], q_sink[..., a:b, :]
    if scale is not None:
        q_rec, q_sink = q_rec * scale[:, None, :, None], q_sink * scale[:, None, :, None]
    B, H, t, D = q_sink.shape
    hkv, S = sink_k.shape[1], program.frame.sinks
    groups = H // hkv
    s = torch.arange(S, device=device)[None, None, :]                      # sink s is stream index s
    sink_ok = (present[:, None, :] & program.visible(i, s))[:, None]       # [B, 1|H, t, S]: sink s exists for query i
    if per_head is not None:
        sink_ok = sink_ok & program.head_visible(i, s, heads)
    # Sinks: explicit scores in their frame (t × S per head, small).
    scores = (q_sink.view(B, hkv, groups, t, D) @ sink_k[:, :, None].transpose(-1, -2)).view(B, H, t, S) * x.scaling
    sink_bias = program.bias(i.clamp(max=program.frame.size - 1), s, heads)  # at the query's slot and the sink's
    if sink_bias is not None:
        scores = scores + sink_bias
    scores = scores.masked_fill(~sink_ok, float("-inf"))
    if q_prefix is not None:  # the prefix: P more explicit scores, always visible, merged with the sinks'
        pk, pv = x.prefix_kv()
        P = pk.shape[-2]
        q_pre = q_prefix[..., a:b, :]
        if scale is not None:
            q_pre = q_pre * scale[:, None, :, None]
        q_pre = q_pre.reshape(B, hkv, groups, t, D)
        prefix_scores = (q_pre @ pk.float()[:, :, None].transpose(-1, -2)).view(B, H, t, P) * x.scaling
        if x.prefix_weight is not None:  # a gate: log g_i on query i's prefix scores
            prefix_scores = prefix_scores + x.prefix_weight[:, a:b].float()[:, None, :, None]
        scores, S = torch.cat([scores, prefix_scores], dim=-1), S + P
        sink_v = torch.cat([sink_v, pv.to(sink_v.dtype)], dim=-2)
    # Recent band: the fused kernel, which also returns its log-sum-exp.
    band = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(~visible, float("-inf"))
    if bias is not None:
        band = band + bias
    k_band = keys[..., lo:hi, :].repeat_interleave(groups, dim=1) if groups > 1 else keys[..., lo:hi, :]
    v_band = x.v[..., lo:hi, :].float()
    v_band = v_band.repeat_interleave(groups, dim=1) if groups > 1 else v_band
    out, lse = internals.sdpa_with_lse(q_rec, k_band, v_band, band, x.scaling)
    empty = ~visible.any(-1)                                              # a query whose band is all masked (only sinks)
    lse = lse.masked_fill(empty, float("-inf"))
    out = out.masked_fill(empty[..., None], 0.0)
    # Log-sum-exp merge: softmax over the union of both parts, exactly.
    top = torch.maximum(lse, scores.amax(-1)).clamp(min=torch.finfo(torch.float32).min)[..., None]
    w_band = torch.exp(lse[..., None] - top)                              # [B, H, t, 1]
    w_sink = torch.exp(scores - top)                                      # [B, H, t, S]
    sinks = w_sink.view(B, hkv, groups, t, S) @ sink_v.float()[:, :, None]
    merged = (w_band * out + sinks.view(B, H, t, -1)) / (w_band + w_sink.sum(-1, keepdim=True))
    return merged.to(x.v.dtype)


# ------------------------------------------------------------------------------ ReRoPE's two frames
#
# RelativeFrame (ReRoPE, Leaky ReRoPE): key j is *near* query i when d = i − j < w, else *far*.
# Near keys and queries are rotated in the table frame at column − origin (origin: the first
# column any query of the call sees as near), so a near score is the model's RoPE at distance d.
# Far keys are rotated at j'/k and queries at w + (i' − w)/k (j', i' stream indices; ReRoPE: keys at
# 0, queries at w), so a far score sees position w + (d − w)/k. Each tile runs the fused kernel once
# per frame, over the near band (≤ tile + w keys) and over the far keys, and the two results are
# merged exactly by their log-sum-exps. The keys' layout is contiguous (a PreRope cache evicts
# nothing): key position p holds column p.


def _relative(program: Program, x: Inputs):
    """Per call: (origin, queries and keys in the near frame, queries and keys in the far frame)."""
    frame: RelativeFrame = program.frame
    table, w = x.table, frame.window
    pad, end = x.pads(), x.end
    cos, sin = x.cos.float(), x.sin.float()                                 # [B|1, Tq, D] the model's rotation of q
    q = x.q.float()
    q_cols = x.query_columns()
    origin = max(0, x.q_start - w + 1)                                      # no query of the call sees a column before it as near
    given_k = (None, None) if x.k_raw else (cos[:, None, origin - x.q_start:], sin[:, None, origin - x.q_start:])
    k_near = frame_keys(table, x.k[..., origin:, :], torch.arange(origin, end, device=q.device), origin, end, *given_k)
    c, s = composite(*table.at(q_cols - origin, bound=end - origin), cos, sin)
    q_near = rotate(q, c[:, None], s[:, None])
    far = max(0, end - w)                                                   # columns a query of the call may see as far
    k_far = q_far = None
    if far:
        given = (None, None) if x.k_raw else (cos[:, None, :far], sin[:, None, :far])
        leak = frame.leak(x.lengths().to(q.device))                           # [B] or None (ReRoPE)
        if leak is None:  # every far key at position 0, every query at w
            ck, sk = composite(*table.at(torch.zeros(far, dtype=torch.long, device=q.device), bound=1), *given)
            cq, sq = composite(*table.at(torch.full_like(q_cols, w), bound=w + 1), cos, sin)
        else:
            j = (torch.arange(far, device=q.device)[None] - pad[:, None]).clamp(min=0)   # [B, far] stream index
            i = (q_cols[None] - pad[:, None]).clamp(min=0)
            ck, sk = composite(*(t[:, None] for t in real_rotation(table, j / leak[:, None])), *given)
            cq, sq = composite(*real_rotation(table, w + (i - w) / leak[:, None]), cos, sin)
            cq, sq = cq[:, None], sq[:, None]
        k_far = rotate(x.k[..., :far, :].float(), ck, sk)
        q_far = rotate(q, cq if cq.ndim == 4 else cq[:, None], sq if sq.ndim == 4 else sq[:, None])
    return origin, q_near, k_near, q_far, k_far


def _tile_relative(program: Program, x: Inputs, a: int, b: int, framed) -> torch.Tensor:
    origin, q_near, k_near, q_far, k_far = framed
    w = program.frame.window
    lo, hi = _band(program, x, a, b)                                       # what the rules let the tile see
    device = x.q.device
    q_cols = torch.arange(x.q_start + a, x.q_start + b, device=device)
    pad = x.pads()[:, None, None]
    groups = x.q.shape[1] // x.k.shape[1]

    def part(q, keys, first: int, last: int, near: bool):
        """(out, lse) of the tile against key columns [first, last) in one frame; None if empty."""
        if last <= first:
            return None
        visible, mask = _visibility(program, x, a, b, first, last)
        i, j = q_cols[None, :, None] - pad, torch.arange(first, last, device=device)[None, None, :] - pad
        near_or_far = (i - j < w) if near else (i - j >= w)
        visible = visible & near_or_far                                     # a padding query's own key is near
        mask = mask.masked_fill(~visible, float("-inf"))
        v = x.v[..., first:last, :].float()
        if groups > 1:
            keys, v = keys.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out, lse = internals.sdpa_with_lse(q[..., a:b, :], keys, v, mask[:, None], x.scaling)
        empty = ~visible.any(-1)[:, None]                                  # [B, 1, t]: nothing visible here
        return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))

    near_first = max(lo, x.q_start + a - w + 1)
    near = part(q_near, k_near[..., near_first - origin:hi - origin, :], near_first, hi, near=True)
    far_last = min(hi, x.q_start + b - w)
    far = part(q_far, k_far[..., lo:far_last, :], lo, far_last, near=False) if q_far is not None else None
    parts = [p for p in (near, far) if p is not None]
    if len(parts) == 1:
        return parts[0][0].to(x.v.dtype)
    (out1, lse1), (out2, lse2) = parts
    # Log-sum-exp merge: softmax over the union of both frames' keys, exactly.
    top = torch.maximum(lse1, lse2).clamp(min=torch.finfo(torch.float32).min)[..., None]
    w1, w2 = torch.exp(lse1[..., None] - top), torch.exp(lse2[..., None] - top)
    return ((w1 * out1 + w2 * out2) / (w1 + w2)).to(x.v.dtype)


def _visibility(program: Program, x: Inputs, a: int, b: int, first: int, last: int):
    """(visible [B, t, n] bool, additive float mask [B, t, n]) of the query tile [a, b) against key
    positions [first, last) of a contiguous layout: causality, the rules, padding (a padding query
    sees itself), and a 4D mask the caller gave."""
    device = x.q.device
    q_cols = torch.arange(x.q_start + a, x.q_start + b, device=device)
    k_cols = torch.arange(first, last, device=device)
    pad = x.pads()[:, None, None]
    i, j = q_cols[None, :, None] - pad, k_cols[None, None, :] - pad
    visible = program.visible(i, j) & (j >= 0)
    if x.key_ok is not None:
        visible = visible & x.key_ok[:, first:last][:, None, :]
    if x.pad is not None:
        visible = visible | ((i < 0) & (q_cols[:, None] == k_cols[None, :]))
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=device)
    if x.given is not None:
        given = x.given[..., a:b, first:last]
        if given.dtype == torch.bool:
            visible = visible & given[:, 0]
        else:
            mask = mask + given[:, 0].float()
    return visible, mask


# ------------------------------------------------------------------------------ consistent dynamic NTK
#
# ConsistentFrame: query i and its keys rotated with θ(n_i), n_i = p_i + 1 (p the position: the
# row's stream index plus the offset its position ids carry). Tiles whose every query has n ≤ L
# share plain RoPE: keys rotated once, the fused kernel. Past L each query has its own base, so its
# scores are formed explicitly by :func:`consistent_scores`, in chunks of queries whose scores
# [B, H, chunk, keys] stay within MEMORY floats.

MEMORY = 1 << 22
STEP = 64      # d = a·STEP + b: cos/sin of d·θ composed from those of a·STEP·θ and b·θ
QUERIES = 8    # queries per angle table
KEYS = 512     # keys per block: a block's table and rotated keys stay in cache


def _within(x: Inputs, L: int, positions: torch.Tensor, end: int | None = None) -> bool:
    """Whether every query at `positions` (those before column q_start + `end`) has n ≤ L. Without
    position ids positions are stream indices ≤ columns, so Python ints decide (torch.export then
    sees no data-dependent branch)."""
    if x.positions is None:
        return x.q_start + (x.q.shape[-2] if end is None else end) <= L
    return bool((positions < L).all())


def _turns(steps: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of s·θ for every step s [m] and query frequencies θ [B, t, D/2]: [B, t, m, D/2]."""
    angles = steps.float()[:, None] * theta[:, :, None, :]
    return angles.cos(), angles.sin()


def consistent_scores(rotary, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """R_n(i′)q_i · R_n(j′)k_j with n = i′ + 1, for raw q [B, H, t, D] and raw k [B, H/G, n, D] (each
    KV head serving G consecutive query heads, not repeated), positions q_pos [B, t] and k_pos [B, n]
    of one call's layout (consecutive, the same q_pos − k_pos in every row): [B, H, t, n] (float32,
    or float64 for float64 inputs; unscaled). Prefill chunks and decoding steps both come here.

    Rotations compose, R(a)q·R(b)k = q·R(b − a)k, so with d = i′ − j′ and, per frequency θ = θ(n_i)
    (D/2 of them; rotate_half's pairs are (x_lo, x_hi)), c = cos(d·θ), s = sin(d·θ):

        score = q_lo·(c⊙k_lo + s⊙k_hi) + q_hi·(c⊙k_hi − s⊙k_lo) = q · k̂_ij

    The table (c, s) depends on positions only: it is shared by every head, and k̂ is formed once per
    KV head, [t, n, D], the G query heads of its group taking their scores in one batched product
    over the queries, [G, D] @ [D, n] (the dense formula of reference.py rotates every query head
    against a table of both halves). The table itself needs no trigonometry per entry: d = a·STEP + b
    (0 ≤ b < STEP) gives c = c_a·c_b − s_a·s_b and s = s_a·c_b + c_a·s_b from the cos/sin of a·STEP·θ
    and b·θ (a few per query). The decomposition depends on d alone (and θ(n) has the same bits for
    n alone or among others, :meth:`ConsistentNtkRope.frequencies_at`), so a query gets the same
    table whether it is scored in a chunk or alone (decoding equals the full forward); it differs from the
    oracle's cos(fl32(d·θ)) by float32 rounding of the angles (~ulp(d·θ)), as two roundings of one
    exact angle do. A block of queries sees its keys along anti-diagonals of the table (d falls by one
    per key), so each query's row is a strided view of one [queries, d, D/2] table: no gather.
    Everything runs in blocks of QUERIES × KEYS into preallocated buffers, so tables and rotated keys
    stay in cache (measured: the same work on fresh, large tensors runs several times slower)."""
    batch, heads, t, dim = q.shape
    kv, n, half = k.shape[1], k.shape[-2], dim // 2
    groups = heads // kv
    acc = torch.promote_types(q.dtype, torch.float32)
    low, high = k[..., :half].contiguous(), k[..., half:].contiguous()
    grouped = q.unflatten(1, (kv, groups)).transpose(2, 3)                    # [B, kv, t, G, D]
    theta = rotary.frequencies_at(q_pos + 1).float()                          # [B, t, D/2]
    base = int(q_pos[0, 0] - k_pos[0, 0])                                     # d of query 0, key 0
    out = torch.empty(batch, kv, groups, t, n, dtype=acc, device=q.device)
    fine = torch.arange(STEP - 1, -1, -1, device=q.device)                    # b, descending
    tq, nk = min(t, QUERIES), min(n, KEYS)
    # flat buffers, viewed at each block's shape (contiguous, so bmm needs no copies)
    tables = torch.empty(2, batch, tq * ((nk + tq) // STEP + 2) * STEP * half, device=q.device)
    rotated, part, scores = (torch.empty(batch * kv * tq * size, dtype=acc, device=q.device)
                             for size in (nk * dim, nk * half, groups * nk))
    for s in range(0, t, QUERIES):
        e = min(s + QUERIES, t)
        # Table row m of query u holds d = top − 1 − m: key j sits at m = top − 1 − base − s − u + j.
        top = ((base + e - 1) // STEP + 1) * STEP                             # above every d of these queries
        bottom = ((base + s - (n - 1)) // STEP) * STEP                        # at or below every d
        coarse = torch.arange(top - STEP, bottom - 1, -STEP, device=q.device)  # a·STEP, descending
        cos_a, sin_a = _turns(coarse, theta[:, s:e])
        cos_b, sin_b = (f[:, :, None] for f in _turns(fine, theta[:, s:e]))
        queries = grouped[:, :, s:e].reshape(-1, groups, dim)                 # [B·kv·t′, G, D]
        for lo in range(0, n, KEYS):
            hi = min(lo + KEYS, n)
            first = top - 1 - base - s + lo                                   # m of query s, key lo
            a0, a1 = (first - (e - s - 1)) // STEP, (first + hi - lo - 1) // STEP + 1
            rows = (a1 - a0) * STEP
            cos, sin = (b[:, :(e - s) * rows * half].view(batch, e - s, a1 - a0, STEP, half) for b in tables)
            ca, sa = cos_a[:, :, a0:a1, None], sin_a[:, :, a0:a1, None]
            torch.mul(ca, cos_b, out=cos).addcmul_(sa, sin_b, value=-1)
            torch.mul(sa, cos_b, out=sin).addcmul_(ca, sin_b)
            size, stride = (batch, 1, e - s, hi - lo, half), (cos.stride(0), 0, (rows - 1) * half, half, 1)
            c, sn = (f.as_strided(size, stride, f.storage_offset() + (first - a0 * STEP) * half) for f in (cos, sin))
            shape = (batch, kv, e - s, hi - lo)
            r = rotated[:batch * kv * (e - s) * (hi - lo) * dim].view(*shape, dim)
            p = part[:batch * kv * (e - s) * (hi - lo) * half].view(*shape, half)
            k_lo, k_hi = low[:, :, None, lo:hi], high[:, :, None, lo:hi]
            torch.mul(c, k_lo, out=r[..., :half]).add_(torch.mul(sn, k_hi, out=p))
            torch.mul(c, k_hi, out=r[..., half:]).sub_(torch.mul(sn, k_lo, out=p))
            block = scores[:batch * kv * (e - s) * groups * (hi - lo)].view(-1, groups, hi - lo)
            torch.bmm(queries, r.view(-1, hi - lo, dim).transpose(1, 2), out=block)
            out[:, :, :, s:e, lo:hi] = block.view(batch, kv, e - s, groups, hi - lo).transpose(2, 3)
    return out.view(batch, heads, t, n)


def _consistent(program: Program, x: Inputs, tile: int) -> torch.Tensor:
    rotary = program.frame.rotary()
    if not x.k_raw and _within(x, rotary.trained, x.query_columns()[None] - x.pads()[:, None] + x.position_offset()):
        # The whole call within L and keys as the model rotated them (plain RoPE there): exactly the
        # program without this frame — the same kernels as the untouched model.
        unframed = Program(tuple(dataclasses.replace(s, frame=None) for s in program.stages))
        return attend(unframed, x, tile).transpose(1, 2)
    q, k = x.raw()
    groups = q.shape[1] // k.shape[1]
    pad, offset = x.pads(), x.position_offset()
    q_pos = x.query_columns()[None] - pad[:, None] + offset                   # [B, Tq] positions
    k_pos = x.key_columns()[None] - pad[:, None] + offset
    values = x.v.float()
    v = values.repeat_interleave(groups, dim=1) if groups > 1 else values
    plain = None
    outs = []
    for a in range(0, q.shape[-2], tile):
        b = min(a + tile, q.shape[-2])
        lo, hi = _band(program, x, a, b)
        visible, mask = _visibility(program, x, a, b, lo, hi)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None]           # [B, 1, t, n]
        # Every query of the tile has n ≤ L: plain RoPE, fused. Without position ids, positions are
        # stream indices ≤ columns, so Python ints decide (torch.export sees no data-dependent branch).
        if _within(x, rotary.trained, q_pos[:, a:b], b):
            if plain is None:  # the model rotated q (and k, unless cached raw) with plain RoPE there already
                inv = rotary.inv_freq.float()

                def at(pos, inv=inv):
                    angles = pos.float()[..., None] * inv
                    angles = torch.cat((angles, angles), dim=-1)[:, None]
                    return angles.cos(), angles.sin()

                rotated = rotate(k, *at(k_pos.clamp(min=0))) if x.k_raw else x.k.float()
                plain = (x.q.float(), rotated.repeat_interleave(groups, dim=1) if groups > 1 else rotated)
            out = sdpa(plain[0][..., a:b, :], plain[1][..., lo:hi, :], v[..., lo:hi, :], attn_mask=mask,
                       scale=x.scaling, dropout_p=x.dropout)
        else:
            chunk = max(1, min(b - a, MEMORY // max(1, q.shape[0] * q.shape[1] * (hi - lo))))
            pieces = []
            for s in range(a, b, chunk):
                e = min(s + chunk, b)
                scores = consistent_scores(rotary, q[..., s:e, :], k[..., lo:hi, :], q_pos[:, s:e], k_pos[:, lo:hi])
                weights = torch.softmax(scores.mul_(x.scaling).add_(mask[:, :, s - a:e - a]), dim=-1)
                # the G query heads of a KV head as one [G·t, n] @ [n, Dv] product: v is read once per group
                grouped = weights.unflatten(1, (k.shape[1], groups)).flatten(2, 3) @ values[..., lo:hi, :]
                pieces.append(grouped.unflatten(2, (groups, e - s)).flatten(1, 2))
            out = torch.cat(pieces, dim=2)
        outs.append(out)
    return torch.cat(outs, dim=2).to(x.v.dtype)
