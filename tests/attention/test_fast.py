"""The fast path equals the dense reference on random inputs: every stage combination the registry
allows (plain, window, window with sinks; composed with a dynamic rope; score biases alone and with
each window; per-head rules; ReRoPE and Leaky ReRoPE (fixed and dynamic k), alone and with a window
rule), lengths that are and are not multiples of the tile, grouped-query heads, left padding, and
bounded-cache key layouts."""

import pytest
import torch

from surgery.attention import fast, reference
from surgery.attention.frame import Table, rotate
from surgery.attention.keys import Inputs
from surgery.attention.program import PreRope, Program, RelativeFrame, Stage, WindowRule
from surgery.models import tiny
from surgery.transforms.alibi import AlibiBias
from surgery.transforms.logn import LogScale
from surgery.transforms.rope import RopeParams, build_rope
from surgery.transforms.s2attn import s2attn_stage
from surgery.transforms.window import window_stage

D = 16


def rotaries():
    model = tiny("llama", hidden_size=64, num_attention_heads=4)
    plain = model.model.rotary_emb
    dynamic = build_rope(RopeParams(kind="ntk_dynamic", scale=4.0), model.config)  # L = 64
    return {"plain": lambda: plain, "ntk_dynamic": lambda: dynamic}


ROTARIES = rotaries()
RELATIVE = {"rerope": (5, None, None), "leaky": (5, 3.0, None), "leaky_dynamic": (7, None, 10)}  # (w, k, L)


SCORES = {  # score-changing stages, by name (each combined with every window kind below)
    "alibi": Stage("alibi()", bias=(AlibiBias(),)),
    "logn": Stage("logn(8)", scale=(LogScale(8),)),   # acts from query 8 on: inside every tested length
    "logn+alibi": Stage("logn(8) + alibi()", bias=(AlibiBias(),), scale=(LogScale(8),)),
    "s2attn": s2attn_stage(6),                          # head rules (the executors ignore train_only)
    "s2attn+alibi": Stage("s2attn(5) + alibi()", rules=s2attn_stage(5).rules, bias=(AlibiBias(),)),
}


def program(kind: str, size: int = 12, sinks: int = 3, rotary: str = "plain") -> Program:
    """`kind`: plain, window or sinks, optionally followed by +NAME, a SCORES stage."""
    if kind in RELATIVE:
        w, k, trained = RELATIVE[kind]
        return Program((Stage(kind, frame=RelativeFrame(w, k, ROTARIES[rotary], trained), cache=PreRope()),))
    base, _, extra = kind.partition("+")
    scored = (SCORES[extra],) if extra else ()
    if base == "plain":
        return Program(scored)
    if base == "window":
        return Program((window_stage(size, 0), *scored))
    return Program((*scored, window_stage(size, sinks, ROTARIES[rotary])))


def inputs(prog: Program, tq: int, tk: int, *, pad=None, head=0, start=0, seed=0, heads=(4, 2)) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], tq, D, generator=g)
    k = torch.randn(2, heads[1], tk, D, generator=g)
    v = torch.randn(2, heads[1], tk, D, generator=g)
    x = Inputs(q, k, v, D ** -0.5, head=head, start=start)
    if pad is not None:
        x.pad = torch.tensor(pad)
        columns = x.key_columns()
        x.key_ok = columns[None, :] >= x.pad[:, None]
    if prog.frame is not None:
        x.table = Table.of(prog.frame.rotary(), prog.frame.size, q)
        # the model's own rotation of q (and k, unless the keys come from a pre-RoPE cache), at
        # positions of its own (here shifted by 5): the frame must not depend on them
        positions = (x.query_columns() + 5)[None].expand(2, -1)
        x.cos, x.sin = ROTARIES["plain"]()(q, positions)
        x.k_raw = tq != tk
    return x


def error(prog, x, tile):
    got, want = fast.attend(prog, x, tile=tile), reference.attend(prog, x)
    assert got.shape == want.shape
    keep = torch.ones(got.shape[:2], dtype=torch.bool)
    if x.pad is not None:  # padding query rows see only themselves: defined, but not compared
        keep = x.query_columns()[None, :] >= x.pad[:, None]
    return (got[keep] - want[keep]).abs().max().item()


KINDS = ["plain", "window", "sinks"]
SCORED = [f"{base}+{name}" for name in SCORES for base in KINDS]


@pytest.mark.parametrize("kind", KINDS + SCORED)
@pytest.mark.parametrize("n, tile", [(16, 8), (37, 8), (37, 64), (50, 7)])
def test_full_forward(kind, n, tile):
    prog = program(kind)
    assert error(prog, inputs(prog, n, n, seed=n), tile) < 1e-5


@pytest.mark.parametrize("kind", KINDS + SCORED)
def test_left_padding(kind):
    prog = program(kind)
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5


@pytest.mark.parametrize("kind", ["window", "sinks"] + [k for k in SCORED if not k.startswith("plain")])
def test_bounded_cache_layouts(kind):
    # keys: columns 0..2 (head: sinks) then 20..39; queries: the last 4 columns (a decoding chunk)
    prog = program(kind, size=20, sinks=3)
    sinks = kind.startswith("sinks")
    x = inputs(prog, 4, 3 + 20, head=3 if sinks else 0, start=20 if sinks else 17, seed=4)
    assert error(prog, x, tile=2) < 1e-5


def test_dynamic_rope_frame_and_single_query():
    prog = program("sinks", size=10, sinks=2, rotary="ntk_dynamic")
    assert error(prog, inputs(prog, 90, 90, seed=5), tile=16) < 1e-5   # the table is extended past 2·size
    assert error(prog, inputs(prog, 1, 90, seed=6), tile=16) < 1e-5


@pytest.mark.parametrize("kind", ["window", "sinks"])
@pytest.mark.parametrize("origin, pad", [(0, None), (13, None), (13, [0, 0]), (13, [0, 1])])
def test_decoding_step_in_the_steady_state(kind, origin, pad, monkeypatch):
    """A single query past the first eviction takes the unmasked one-call path (the sinks moved into
    the recent frame) and equals the reference; the cache's origin may be anything ≤ the sinks'
    offset. A mask without padding (generate() always passes one) takes it too; padding does not."""
    prog = program(kind, size=10, sinks=2)
    end = 40
    head, start = (2 + max(pad or [0]), end - 8) if kind == "sinks" else (0, end - 10)
    x = inputs(prog, 1, end - start + head, pad=pad, head=head, start=start, seed=8)
    rotated = None
    if kind == "sinks":
        rotated = (fast.frame_keys(x.table, x.k, x.key_columns(), origin, end), origin)
    steps = []
    monkeypatch.setattr(fast, "_step", lambda *a, real=fast._step: steps.append(1) or real(*a))
    got, want = fast.attend(prog, x, rotated=rotated), reference.attend(prog, x)
    assert steps == ([] if pad and max(pad) else [1])
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["sinks", *SCORED])
def test_multi_query_heads_equal_grouped(kind):
    prog = program(kind)
    assert error(prog, inputs(prog, 30, 30, heads=(4, 4), seed=7), tile=8) < 1e-5


@pytest.mark.parametrize("kind", SCORED)
def test_a_single_decoding_query(kind):
    prog = program(kind)
    assert error(prog, inputs(prog, 1, 40, seed=8), tile=8) < 1e-5


def test_sink_bias_is_taken_at_the_cache_slots():
    """With sinks, ALiBi sees a sink at its slot and the query at min(i, size − 1), not at its
    stream distance: the reference's sink scores must carry exactly that bias."""
    with_bias, without = program("sinks+alibi", size=6, sinks=2), program("sinks", size=6, sinks=2)
    x = inputs(with_bias, 1, 30, seed=9)
    x.q = torch.zeros_like(x.q)          # all scores 0: the weights are the bias alone
    out = reference.attend(with_bias, x)[0, 0, 0]  # head 0 of 4 (slope 2^-2), the last query (i = 29)
    m = 0.25
    # visible: sinks 0, 1 at slots 0, 1 (query at slot 5: distances 5, 4), recent 26..29 (distances 3..0)
    weights = torch.softmax(-m * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]), dim=0)
    v = x.v[0, 0, [0, 1, 26, 27, 28, 29]]
    assert (out - weights @ v).abs().max() < 1e-5
    assert (reference.attend(without, x)[0, 0, 0] - v.mean(0)).abs().max() < 1e-5


def test_plain_reference_is_causal_attention():
    """The dense reference of the empty program is torch's causal attention (the oracle's own anchor)."""
    prog = Program()
    x = inputs(prog, 20, 20, heads=(2, 2))
    want = torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scaling)
    assert (reference.attend(prog, x) - want.transpose(1, 2)).abs().max() < 1e-6


def test_memory_is_a_band_not_a_square(monkeypatch):
    """Every sdpa call of a window(8) forward over 200 tokens sees at most tile + 8 keys."""
    seen = []
    real = fast.sdpa

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fast, "sdpa", spy)
    for kind in ("window", "sinks", "window+logn+alibi", "sinks+logn+alibi"):
        prog = program(kind, size=8, sinks=2)
        fast.attend(prog, inputs(prog, 200, 200), tile=16)
    assert seen and max(k for _, k in seen) <= 16 + 8 + 2 and max(q for q, _ in seen) == 16


def test_query_scale_is_a_temperature_per_query():
    """Dense reference of a query scale: row i equals plain causal attention with scaling × s(i)."""
    prog = program("plain+logn")
    x = inputs(prog, 20, 20, heads=(2, 2), seed=10)
    got = reference.attend(prog, x)
    for i in (3, 7, 8, 19):
        s = max(1.0, torch.log(torch.tensor(i + 1.0)).item() / torch.log(torch.tensor(8.0)).item())
        want = torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scaling * s)
        assert (got[:, i] - want.transpose(1, 2)[:, i]).abs().max() < 1e-5


def test_a_bias_without_a_window_is_tiled_too(monkeypatch):
    """alibi over 200 keys: masks are [B, H, tile, ≤ 200] per call, never [200, 200]."""
    seen = []
    real = fast.sdpa

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fast, "sdpa", spy)
    prog = program("plain+logn+alibi")
    fast.attend(prog, inputs(prog, 200, 200), tile=16)
    assert len(seen) == 13 and all(shape[:3] == (2, 4, 16) or shape[2] == 200 % 16 for shape in seen)


def test_a_query_scale_alone_keeps_the_fused_causal_kernel(monkeypatch):
    calls = []
    real = fast.sdpa

    def spy(q, k, v, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fast, "sdpa", spy)
    prog = program("plain+logn")
    assert error(prog, inputs(prog, 40, 40, seed=11), tile=8) < 1e-5
    assert calls == [True]  # one call over all 40 queries, no mask


@pytest.mark.parametrize("kind", list(RELATIVE))
@pytest.mark.parametrize("n, tile", [(16, 8), (37, 8), (37, 64), (50, 7)])
def test_relative_frames_full_forward(kind, n, tile):
    prog = program(kind)
    assert error(prog, inputs(prog, n, n, seed=n), tile) < 1e-5


@pytest.mark.parametrize("kind", list(RELATIVE))
def test_relative_frames_padding_decoding_and_dynamic_rope(kind):
    prog = program(kind)
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5
    assert error(prog, inputs(prog, 3, 40, seed=4), tile=2) < 1e-5        # pre-RoPE keys, a decoding chunk
    prog = program(kind, rotary="ntk_dynamic")
    assert error(prog, inputs(prog, 90, 90, seed=5), tile=16) < 1e-5


def test_relative_frame_with_a_window_rule():
    """ReRoPE's far band respects every rule: window(20) leaves keys 5 ≤ d < 20 in the far frame."""
    prog = program("rerope").then(Stage("window(20)", rules=(WindowRule(20),)))
    assert error(prog, inputs(prog, 50, 50, seed=8), tile=8) < 1e-5


def test_relative_reference_is_the_explicit_matrix():
    """The dense reference of ReRoPE with w ≥ N is causal RoPE attention; with w = 1 every earlier
    key is at distance 1 (so the score is q·R(1)k for every j < i)."""
    from surgery.attention.frame import rotate

    prog = program("rerope", rotary="plain")
    x = inputs(prog, 12, 12, heads=(2, 2))
    plain = torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scaling)
    wide = Program((Stage("rerope", frame=RelativeFrame(50, None, ROTARIES["plain"]), cache=PreRope()),))
    assert (reference.attend(wide, x) - plain.transpose(1, 2)).abs().max() < 1e-5
    one = Program((Stage("rerope", frame=RelativeFrame(1, None, ROTARIES["plain"]), cache=PreRope()),))
    q, k = x.raw()
    cos, sin = x.table.at(torch.tensor([0, 1]))
    scores = (rotate(q, cos[1], sin[1]) @ rotate(k, cos[0], sin[0]).transpose(-1, -2)) * x.scaling
    diagonal = (q * k).sum(-1) * x.scaling * cos[0, 0] ** 2                   # distance 0 on the diagonal
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    scores = scores.diagonal_scatter(diagonal, dim1=-2, dim2=-1)
    want = (torch.softmax(scores, -1) @ x.v).transpose(1, 2)
    assert (reference.attend(one, x) - want).abs().max() < 1e-5


def consistent_program(trained: int = 20) -> Program:
    from surgery.attention.program import ConsistentFrame

    config = tiny("llama", hidden_size=64, num_attention_heads=4).config
    rotary = build_rope(RopeParams(kind="ntk_consistent", scale=4.0, original_max_position=trained), config)
    return Program((Stage("rope(ntk_consistent)", frame=ConsistentFrame(lambda: rotary), cache=PreRope()),))


@pytest.mark.parametrize("n, tile", [(16, 8), (37, 8), (37, 64), (50, 7)])
def test_consistent_frame_full_forward(n, tile):
    """Tiles within L (fused, plain RoPE) and past it (a base per query) against the dense reference."""
    prog = consistent_program()
    assert error(prog, inputs(prog, n, n, seed=n), tile) < 1e-5


@pytest.mark.parametrize("step, queries, keys", [(fast.STEP, fast.QUERIES, fast.KEYS), (4, 7, 11)])
def test_consistent_scores_equal_the_dense_formula(monkeypatch, step, queries, keys):
    """The fast scores (a composed angle table shared by all heads, keys rotated once per KV head)
    against the reference's (every query head rotated against a table of cos(d·θ) of both halves),
    float64 inputs: two groups of three query heads, queries before and past L = 20, a left-padded
    row (negative positions), and (second case) blocks and angle steps that cut the call unevenly."""
    monkeypatch.setattr(fast, "STEP", step)
    monkeypatch.setattr(fast, "QUERIES", queries)
    monkeypatch.setattr(fast, "KEYS", keys)
    rotary = consistent_program().frame.rotary()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 30, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 48, D, generator=g, dtype=torch.float64)
    k_pos = torch.arange(48)[None] - torch.tensor([[0], [6]])          # row 1: six padding columns
    q_pos = k_pos[:, 18:]
    got = fast.consistent_scores(rotary, q, k, q_pos, k_pos)
    want = reference.consistent_scores(rotary, q, k.repeat_interleave(3, dim=1), q_pos, k_pos)
    assert got.shape == want.shape == (2, 6, 30, 48) and got.dtype == torch.float64
    # the table's float32 angles are rounded differently from the oracle's (~ulp of d·θ)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # past L the base is the query's own: plain RoPE's scores (θ of L) differ there, not before
    plain = consistent_scores_at(rotary, q, k, q_pos, k_pos)
    assert (got[0, :, 0] - plain[0, :, 0]).abs().max() < 1e-5
    assert (got[:, :, 5:] - plain[:, :, 5:]).abs().max() > 1e-2


def test_consistent_scores_of_a_query_alone_equal_its_row_in_a_chunk():
    """Decoding scores one query at a time, a prefill in chunks: at distances near 16k (where d·θ
    turns one ulp of θ into 1e-4 of a score) both give the same scores, up to float32 rounding of the
    final products: θ(n) and the angle table are the same bits either way."""
    from surgery.transforms.rope import ConsistentNtkRope

    rotary = ConsistentNtkRope(100000.0, 64, 2.0, 8192)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 6, 37, 64, generator=g), torch.randn(1, 2, 16384, 64, generator=g)
    k_pos = torch.arange(16384)[None]
    q_pos = k_pos[:, -37:]
    chunk = fast.consistent_scores(rotary, q, k, q_pos, k_pos)
    alone = torch.cat([fast.consistent_scores(rotary, q[:, :, u:u + 1], k, q_pos[:, u:u + 1], k_pos)
                       for u in range(37)], dim=2)
    assert (alone - chunk).abs().max() < 1e-6 * chunk.abs().max()


def consistent_scores_at(rotary, q, k, q_pos, k_pos):
    """Scores with plain RoPE (rotary.inv_freq) for every query: R(i′)q · R(j′)k."""
    def rotated(x, pos):
        angles = pos.double()[..., None] * rotary.inv_freq.double()
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return rotate(x, angles.cos(), angles.sin())
    return rotated(q, q_pos) @ rotated(k, k_pos).repeat_interleave(3, dim=1).transpose(-1, -2)


def test_consistent_frame_padding_decoding_and_a_window_rule():
    prog = consistent_program()
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5
    assert error(prog, inputs(prog, 3, 40, seed=4), tile=2) < 1e-5
    prog = prog.then(Stage("window(12)", rules=(WindowRule(12),)))
    assert error(prog, inputs(prog, 45, 45, seed=9), tile=8) < 1e-5


@pytest.mark.parametrize("heads", [(4, 2), (9, 3), (6, 6)])   # 9/3: the shifted half (5 heads) splits a KV group
@pytest.mark.parametrize("g, n", [(6, 5), (6, 6), (6, 37), (7, 50), (8, 200)])
def test_s2attn_per_group_path_equals_the_tiled_path_and_the_reference(g, n, heads, monkeypatch):
    """Causal attention within groups, run per group (one fused call per partition's whole groups,
    one for the short first and last): equals the dense reference and the tiled path, outputs and
    gradients of q, k and v, on batch 2, lengths below, at and not at multiples of g, grouped-query heads."""
    prog = Program((s2attn_stage(g),))
    calls = []
    real = fast._in_blocks
    monkeypatch.setattr(fast, "_in_blocks", lambda *a: calls.append(1) or real(*a))

    def run(execute):
        x = inputs(prog, n, n, seed=n, heads=heads)
        for t in (x.q, x.k, x.v):
            t.requires_grad_(True)
        out = execute(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out.detach(), x.q.grad, x.k.grad, x.v.grad

    blocked = run(lambda x: fast.attend(prog, x, tile=8))
    assert calls == [1]
    dense = run(lambda x: reference.attend(prog, x))
    monkeypatch.setattr(fast, "_blocks", lambda program, x: None)
    tiled = run(lambda x: fast.attend(prog, x, tile=8))
    assert calls == [1]
    for got, want, other in zip(blocked, dense, tiled):
        assert (got - want).abs().max() < 1e-5 and (got - other).abs().max() < 1e-5


def test_s2attn_per_group_path_only_for_a_whole_unpadded_stream(monkeypatch):
    """Left padding, a decoding chunk after cached keys and a caller's 4D mask stay tiled; a padding
    mask of ones (no padding) and a plain causal program without padding need no tiles either."""
    calls = []
    real = fast._in_blocks
    monkeypatch.setattr(fast, "_in_blocks", lambda *a: calls.append(1) or real(*a))
    prog = Program((s2attn_stage(6),))
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5
    assert error(prog, inputs(prog, 4, 23, seed=4), tile=2) < 1e-5
    x = inputs(prog, 20, 20, seed=5)
    x.given = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    assert error(prog, x, tile=8) < 1e-5
    assert calls == []
    assert error(prog, inputs(prog, 41, 41, pad=[0, 0], seed=6), tile=8) < 1e-5
    assert calls == [1]
