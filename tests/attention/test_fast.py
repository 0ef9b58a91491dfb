"""The fast path equals the dense reference on random inputs: every stage combination the registry
allows (plain, window, window with sinks, ReRoPE and Leaky ReRoPE (fixed and dynamic k), alone and
with a window rule; composed with a dynamic rope), lengths that are and are not multiples of the
tile, grouped-query heads, left padding, and bounded-cache key layouts."""

import pytest
import torch

from surgery.attention import fast, reference
from surgery.attention.frame import Table
from surgery.attention.keys import Inputs
from surgery.attention.program import PreRope, Program, RelativeFrame, Stage, WindowRule
from surgery.models import tiny
from surgery.transforms.rope import RopeParams, build_rope
from surgery.transforms.window import window_stage

D = 16


def rotaries():
    model = tiny("llama", hidden_size=64, num_attention_heads=4)
    plain = model.model.rotary_emb
    dynamic = build_rope(RopeParams(kind="ntk_dynamic", scale=4.0), model.config)  # L = 64
    return {"plain": lambda: plain, "ntk_dynamic": lambda: dynamic}


ROTARIES = rotaries()
RELATIVE = {"rerope": (5, None, None), "leaky": (5, 3.0, None), "leaky_dynamic": (7, None, 10)}  # (w, k, L)


def program(kind: str, size: int = 12, sinks: int = 3, rotary: str = "plain") -> Program:
    if kind == "plain":
        return Program()
    if kind == "window":
        return Program((window_stage(size, 0),))
    if kind in RELATIVE:
        w, k, trained = RELATIVE[kind]
        return Program((Stage(kind, frame=RelativeFrame(w, k, ROTARIES[rotary], trained), cache=PreRope()),))
    return Program((window_stage(size, sinks, ROTARIES[rotary]),))


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


@pytest.mark.parametrize("kind", ["plain", "window", "sinks"])
@pytest.mark.parametrize("n, tile", [(16, 8), (37, 8), (37, 64), (50, 7)])
def test_full_forward(kind, n, tile):
    prog = program(kind)
    assert error(prog, inputs(prog, n, n, seed=n), tile) < 1e-5


@pytest.mark.parametrize("kind", ["plain", "window", "sinks"])
def test_left_padding(kind):
    prog = program(kind)
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5


@pytest.mark.parametrize("kind", ["window", "sinks"])
def test_bounded_cache_layouts(kind):
    # keys: columns 0..2 (head: sinks) then 20..39; queries: the last 4 columns (a decoding chunk)
    prog = program(kind, size=20, sinks=3)
    x = inputs(prog, 4, 3 + 20, head=3 if kind == "sinks" else 0, start=20 if kind == "sinks" else 17, seed=4)
    assert error(prog, x, tile=2) < 1e-5


def test_dynamic_rope_frame_and_single_query():
    prog = program("sinks", size=10, sinks=2, rotary="ntk_dynamic")
    assert error(prog, inputs(prog, 90, 90, seed=5), tile=16) < 1e-5   # the table is extended past 2·size
    assert error(prog, inputs(prog, 1, 90, seed=6), tile=16) < 1e-5


def test_multi_query_heads_equal_grouped():
    prog = program("sinks")
    assert error(prog, inputs(prog, 30, 30, heads=(4, 4), seed=7), tile=8) < 1e-5


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
    for kind in ("window", "sinks"):
        prog = program(kind, size=8, sinks=2)
        fast.attend(prog, inputs(prog, 200, 200), tile=16)
    assert seen and max(k for _, k in seen) <= 16 + 8 + 2 and max(q for q, _ in seen) == 16


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


def test_consistent_frame_padding_decoding_and_a_window_rule():
    prog = consistent_program()
    assert error(prog, inputs(prog, 41, 41, pad=[5, 0], seed=3), tile=8) < 1e-5
    assert error(prog, inputs(prog, 3, 40, seed=4), tile=2) < 1e-5
    prog = prog.then(Stage("window(12)", rules=(WindowRule(12),)))
    assert error(prog, inputs(prog, 45, 45, seed=9), tile=8) < 1e-5
