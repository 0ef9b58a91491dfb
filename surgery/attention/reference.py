"""The dense reference execution of an attention program: every score, written out (slow, readable).

For row b, query column i and key column j, with stream indices i' = i − pad_b, j' = j − pad_b:

    visible  = j ≤ i  and  j' ≥ 0  and  key j is real  and  every rule(i', j')  and  head h's rules(i', j')
    score    = q_i · k_j · scaling                          (absolute frame: as the model rotated them)
    score    = R(i)q_i · R(j)k_j · scaling                  (sink frame, recent key: true distance)
    score    = R(min(i', size−1))q_i · R(j')k_j · scaling   (sink frame, sink j' < sinks: cache slots)
    score    = R_n(i')q_i · R_n(j')k_j · scaling             (consistent frame: θ of n = i' + 1 tokens)
    score    = R(P_ij)q_i · R(0)k_j · scaling               (relative frame, P the relative-position
               matrix: P_ij = d if d = i − j < w, else w (ReRoPE) or w + (d − w)/k (Leaky ReRoPE))
    score    = s(i')·score + bias_h(i', j')                 (query scales; biases at the frame's positions:
                                                             bias_h(min(i', size−1), j') for a sink)
    out_i    = softmax over visible j of score, times v_j

With a K/V prefix (keys k_p, values v_p, p < P) every query row also sees all P prefix entries,
unmasked and unrotated:

    score_p  = q_i · k_p · scaling                          (absolute frame: q as the model rotated it)
    score_p  = R(P + min(i', size−1))q_i · k_p · scaling    (sink frame)

(times the query scale s(i'), no bias; plus log g_i where a gate weighs the prefix) and the
softmax runs over [prefix; visible keys]. A padding query row (i' < 0) sees only itself
(and the prefix), so it stays finite. This builds [B, H, Tq, Tk] tensors: it is the obligations'
oracle, never the path a forward takes.
"""

from __future__ import annotations

import torch

from surgery.attention.frame import real_rotation, rotate
from surgery.attention.keys import Inputs
from surgery.attention.program import ConsistentFrame, Program, RelativeFrame


def consistent_scores(rotary, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """R_n(i′)q_i · R_n(j′)k_j = R_n(i′ − j′)q_i · k_j, n = i′ + 1, for raw q [B, H, t, D] and raw k
    [B, H, n, D] (heads repeated), positions q_pos [B, t], k_pos [B, n]: [B, H, t, n] (float32,
    unscaled), every query rotated against a [t, n, D] table (the fast path's
    :func:`surgery.attention.fast.consistent_scores` rotates the keys instead, once per KV head)."""
    theta = rotary.frequencies_at(q_pos + 1).float()                          # [B, t, D/2]
    angles = (q_pos[:, :, None] - k_pos[:, None, :]).float()[..., None] * theta[:, :, None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None]                     # [B, 1, t, n, D]
    rotated = rotate(q[:, :, :, None, :], angles.cos(), angles.sin())
    return (rotated * k[:, :, None, :, :]).sum(-1)


def attend(program: Program, x: Inputs) -> torch.Tensor:
    """Attention output [B, Tq, H, Dv] (transformers' layout)."""
    groups = x.q.shape[1] // x.k.shape[1]
    q, k = x.raw() if program.frame is not None else (x.q, x.k)
    k = k.repeat_interleave(groups, dim=1)
    v = x.v.repeat_interleave(groups, dim=1)
    q_cols, k_cols = x.query_columns(), x.key_columns()
    pad = x.pads()[:, None, None]
    i = q_cols[None, :, None] - pad                         # [B, Tq, 1] stream index of each query
    j = k_cols[None, None, :] - pad                         # [B, 1, Tk] stream index of each key
    heads = q.shape[1]
    visible = (program.visible(i, j) & (j >= 0))[:, None]  # [B, 1|H, Tq, Tk]
    per_head = program.head_visible(i, j, heads)
    if per_head is not None:
        visible = visible & per_head
    if x.key_ok is not None:
        visible = visible & x.key_ok[:, None, None, :]
    visible = visible | ((i < 0) & (q_cols[:, None] == k_cols[None, :]))[:, None]  # padding rows see themselves
    frame = program.frame
    if frame is None:
        scores = q @ k.transpose(-1, -2)
    elif isinstance(frame, ConsistentFrame):
        offset = x.position_offset()
        scores = consistent_scores(frame.rotary(), q, k, i[..., 0] + offset, j[:, 0] + offset)
    elif isinstance(frame, RelativeFrame):
        leak = frame.leak(x.lengths())
        positions = frame.distance(i - j, None if leak is None else leak[:, None, None])   # [B, Tq, Tk]
        cos, sin = real_rotation(x.table, positions)                                        # [B, Tq, Tk, D]
        rotated = rotate(q[:, :, :, None, :], cos[:, None], sin[:, None])                  # [B, H, Tq, Tk, D]
        scores = (rotated * (k * x.table.scale)[:, :, None, :, :]).sum(-1)
    else:
        cos_q, sin_q = x.table.at(q_cols)
        cos_k, sin_k = x.table.at(k_cols)
        recent = rotate(q, cos_q, sin_q) @ rotate(k, cos_k, sin_k).transpose(-1, -2)
        cos_qs, sin_qs = x.table.at(i[..., 0].clamp(0, frame.size - 1))   # [B, Tq, D]
        cos_ks, sin_ks = x.table.at(j[:, 0].clamp(min=0))                 # [B, Tk, D]
        sink = rotate(q, cos_qs[:, None], sin_qs[:, None]) @ rotate(k, cos_ks[:, None], sin_ks[:, None]).transpose(-1, -2)
        scores = torch.where((j < frame.sinks)[:, None], sink, recent)
    acc = torch.promote_types(x.q.dtype, torch.float32)  # float32, or float64 for a float64 model: an oracle keeps its precision
    scores = scores.to(acc) * x.scaling
    scale = program.query_scale(i[..., 0])                  # [B, Tq]
    if scale is not None:
        scores = scores * scale[:, None, :, None]
    bias = program.bias(i, j, heads)
    if bias is not None and frame is not None:             # a sink's bias at its slot, the query's at min(i', size−1)
        bias = torch.where((j < frame.sinks)[:, None], program.bias(i.clamp(max=frame.size - 1), j, heads), bias)
    if bias is not None:
        scores = scores + bias
    if x.given is not None:
        visible = visible & x.given.bool() if x.given.dtype == torch.bool else visible
        if x.given.dtype != torch.bool:
            scores = scores + x.given.to(acc)
    scores = scores.masked_fill(~visible, float("-inf"))
    if x.prefix is not None:  # [prefix; stream]: the prefix columns first, never masked
        keys, values = (t.repeat_interleave(groups, dim=1).to(acc) for t in x.prefix_kv())
        pq = q.to(acc)
        if frame is not None:
            cos_p, sin_p = x.table.at(keys.shape[-2] + i[..., 0].clamp(0, frame.size - 1))
            pq = rotate(q, cos_p[:, None], sin_p[:, None])
        prefix_scores = (pq @ keys.transpose(-1, -2)) * x.scaling
        if scale is not None:
            prefix_scores = prefix_scores * scale[:, None, :, None]
        if x.prefix_weight is not None:  # a gate: log g_i added to query i's prefix scores
            prefix_scores = prefix_scores + x.prefix_weight.to(acc)[:, None, :, None]
        scores = torch.cat([prefix_scores, scores], dim=-1)
        v = torch.cat([values.to(v.dtype), v], dim=-2)
    weights = torch.softmax(scores, dim=-1)
    out = weights @ v.to(acc)
    return out.transpose(1, 2).to(x.q.dtype if frame is None else x.v.dtype)
