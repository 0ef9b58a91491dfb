"""Programs: rules combine by AND, exclusive slots clash (and the planner reports both spans),
train-only stages drop out at inference."""

import pytest
import torch

from surgery.attention.program import Bounded, Program, SinkFrame, Stage, WindowRule, clashes
from surgery.errors import SpecErrors
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms import registry
from surgery.transforms.registry import Anchor, Params, obligation, transform


def test_rules_combine_by_and_with_causality():
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    both = Program((Stage("a", rules=(WindowRule(6),)), Stage("b", rules=(WindowRule(8, 2),))))
    want = (j <= i) & (i - j < 6) & ((i - j < 6) | (j < 2))
    assert torch.equal(both.visible(i, j), want)
    assert both.reach() == 6


def test_exclusive_slots_clash_and_rules_do_not():
    a = Stage("window(8, sinks=2)", rules=(WindowRule(8, 2),), frame=SinkFrame(8, 2, None), cache=Bounded(8, 2))
    b = Stage("other_cache()", cache=Bounded(4))
    c = Stage("mask_only()", rules=(WindowRule(4),))
    assert [(x.slot, x.first.owner, x.second.owner) for x in clashes([a, c, b])] == [
        ("cache", "window(8, sinks=2)", "other_cache()")]
    with pytest.raises(ValueError, match="other_cache\\(\\) and window\\(8, sinks=2\\) both set the attention cache"):
        Program((a, c)).then(b)


def test_train_only_stages_act_only_in_training():
    shift = Stage("s2attn()", rules=(WindowRule(4),), train_only=True)
    program = Program((Stage("window(8)", rules=(WindowRule(8),)), shift))
    assert program.active(training=True) is program
    assert [s.owner for s in program.active(training=False).stages] == ["window(8)"]


def test_planner_reports_a_clash_with_both_spans():
    class BoundedParams(Params):
        size: int

    @transform("fake_bounded", params=BoundedParams, anchor=Anchor.ATTENTION, positional=("size",),
               reference="test")
    class FakeBounded:
        def stage(self, p, span=None):
            return Stage(f"fake_bounded({p.size})", span, cache=Bounded(p.size))

        def apply(self, p, model, targets, edit):  # planning never gets here: the clash is refused first
            raise AssertionError("a clashing plan was applied")

        @obligation("none", tol=0.0)
        def nothing(self, p, check):
            return 0.0

    try:
        with pytest.raises(SpecErrors) as e:
            build_plan(parse("attn: window(8)\nlayers[1].attn: fake_bounded(4)"), tiny("llama"))
        message = str(e.value)
        assert "fake_bounded(4) and window(8) both set the attention cache" in message
        assert "<spec>:2:17" in message and "<spec>:1:7" in message  # both spans
        build_plan(parse("layers[0].attn: window(8)\nlayers[1].attn: fake_bounded(4)"), tiny("llama"))  # disjoint: fine
    finally:
        registry.REGISTRY.pop("fake_bounded", None)


def test_biases_add_scales_multiply_and_unrotated_claims_the_frame():
    i, j = torch.arange(5)[None, :, None], torch.arange(5)[None, None, :]
    first = lambda i, j, heads: (i - j)[:, None].float().expand(-1, heads, -1, -1)  # noqa: E731
    second = lambda i, j, heads: torch.ones(1, heads, 1, 1)  # noqa: E731
    program = Program((Stage("a", bias=(first,), scale=(lambda i: i.float() + 1,)),
                       Stage("b", bias=(second,), scale=(lambda i: torch.full(i.shape, 2.0),))))
    assert torch.equal(program.bias(i, j, 3), (i - j)[:, None].float().expand(-1, 3, -1, -1) + 1)
    assert torch.equal(program.query_scale(torch.arange(4)), torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert Program().bias(i, j, 3) is None and Program().query_scale(i) is None
    assert program.biased and not Program((Stage("w", rules=(WindowRule(4),)),)).biased
    drop = Stage("alibi(rope=drop)", unrotated=True)
    assert drop.claims() == ("frame",)
    assert [c.slot for c in clashes([drop, Stage("window(8, sinks=2)", frame=SinkFrame(8, 2, None))])] == ["frame"]


def test_head_rules_apply_to_their_share_of_heads_and_bound_the_reach():
    from fractions import Fraction

    from surgery.attention.program import HeadRule

    half = Fraction(1, 2)
    program = Program((Stage("s", rules=(HeadRule(WindowRule(2), 0, half), HeadRule(WindowRule(3), half, 1))),))
    assert program.rules == () and len(program.head_rules) == 2
    i, j = torch.arange(6)[None, :, None], torch.arange(6)[None, None, :]
    seen = program.head_visible(i, j, 5) & program.visible(i, j)[:, None]      # heads 0, 1 | 2, 3, 4
    assert seen.shape == (1, 5, 6, 6)
    assert seen[0, 1, 5].nonzero().flatten().tolist() == [4, 5] and seen[0, 2, 5].nonzero().flatten().tolist() == [3, 4, 5]
    assert program.reach() is None and program.reach(5) == 3     # without the head count: unbounded
    only_some = Program((Stage("s", rules=(HeadRule(WindowRule(2), 0, half),)),))
    assert only_some.reach(4) is None                            # heads 2, 3 see everything


def test_block_diagonal_rules_give_each_heads_blocks_and_nothing_else_does():
    """S2-Attn on 9 heads: 4 in groups of 8, 5 in groups shifted by 4; a head rule on some heads only
    leaves the others plain causal (None); a window, a bias, a scale, two partitions on one head, or
    a rule that does not say it is block-diagonal make the program not blocked (None)."""
    from fractions import Fraction

    from surgery.attention.program import HeadRule
    from surgery.transforms.alibi import AlibiBias
    from surgery.transforms.logn import LogScale
    from surgery.transforms.s2attn import GroupRule, s2attn_stage

    groups = Program((s2attn_stage(8),))
    assert groups.blocks(9) == ((8, 0),) * 4 + ((8, 4),) * 5
    assert Program((Stage("g", rules=(GroupRule(5, 7),)),)).blocks(2) == ((5, 2), (5, 2))  # shift mod size
    assert Program((Stage("g", rules=(HeadRule(GroupRule(6), Fraction(1, 2)),)),)).blocks(4) == (None, None, (6, 0), (6, 0))
    for other in (Stage("window", rules=(WindowRule(16),)), Stage("alibi", bias=(AlibiBias(),)),
                  Stage("logn", scale=(LogScale(8),)), Stage("again", rules=(GroupRule(6),)),
                  Stage("local", rules=(HeadRule(lambda i, j: j <= i),))):
        assert groups.then(other).blocks(9) is None, other.owner


@pytest.mark.parametrize("other", ["alibi()", "logn(8)", "s2attn(group=4)", "prefix_tuning(2)"])
def test_relative_frame_refuses_the_fields_its_executor_does_not_take(other):
    """ReRoPE's executor has no bias, scale, head-rule or prefix path: planning says so with the span."""
    with pytest.raises(SpecErrors, match="cannot share an attention module"):
        build_plan(parse(f"attn: rerope(window=4) + {other}"), tiny("llama"))
