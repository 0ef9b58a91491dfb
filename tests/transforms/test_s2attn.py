"""s2attn(group=g): LongLoRA's shifted sparse attention in training, without the roll's leak; eval is
untouched. On tiny llama/qwen2/gpt2 and SmolLM2."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.attention import fast
from surgery.attention.program import Program
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms import s2attn
from surgery.verify import verify

LEAK = "no information flows from a later token to an earlier one (training)"
BLOCKS = "each head sees exactly its group (block mask, training; rel.)"
EVAL = "eval mode equals the untouched model (rel.)"
DENSE = "program equals its dense reference (training; rel.)"


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [
    ("llama", "attn: s2attn(group=8)"),
    ("qwen2", "layers[1].attn: s2attn(5)"),       # odd g: shifted by 2
    ("gpt2", "attn: s2attn(group=64)"),           # obligations run with g = 8; GPT-2's dropout is switched off
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 5


def test_groups_and_shifted_groups_without_the_roll():
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    plain, shifted = s2attn.GroupRule(4), s2attn.GroupRule(4, 2)
    causal = j <= i
    assert (plain.visible(i, j) & causal)[5].nonzero().flatten().tolist() == [4, 5]
    assert (shifted.visible(i, j) & causal)[5].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert (shifted.visible(i, j) & causal)[1].nonzero().flatten().tolist() == [0, 1]  # a short first group
    # LongLoRA's roll by −g/2 puts tokens 0, 1 after 6, 7 in the last group: causal in that order, token 0
    # sees tokens 6 and 7, its future. Ours never does.
    order = torch.roll(torch.arange(8), -2)                     # [2, 3, 4, 5, 6, 7, 0, 1]
    rank = torch.empty(8, dtype=torch.long)
    rank[order] = torch.arange(8)
    rolled = (rank[:, None] // 4 == rank[None, :] // 4) & (rank[None, :] <= rank[:, None])
    assert rolled[0].nonzero().flatten().tolist() == [0, 6, 7]
    assert not (shifted.visible(i, j) & causal & (j > i)).any()


def _failures(text, arch="llama"):
    model = tiny(arch)
    return {m.obligation for m in verify(_plan(text, model), model).failures}


@pytest.mark.parametrize("path", ["tiled", "per_group"])
def test_attention_within_groups_in_both_directions_fails_the_leak_check(monkeypatch, path):
    # a group mask without causality: what a roll-and-reshape without the causal mask would give, on
    # the tiled path (the per-group path off) and on the per-group path (its fused calls not causal)
    if path == "tiled":
        monkeypatch.setattr(Program, "visible", lambda self, i, j: torch.ones_like(j <= i))
        monkeypatch.setattr(fast, "_blocks", lambda program, x: None)
    else:
        real = fast.sdpa
        monkeypatch.setattr(fast, "sdpa", lambda *a, is_causal=False, **k: real(*a, is_causal=False, **k))
    assert LEAK in _failures("attn: s2attn(group=8)")


def test_per_group_path_with_groups_shifted_by_one_fails_the_obligations(monkeypatch):
    """The obligations run on the per-group path: its groups off by one token fail them."""
    real = fast._causal_blocks
    monkeypatch.setattr(fast, "_causal_blocks", lambda q, k, v, size, shift, *a: real(q, k, v, size, shift + 1, *a))
    assert {BLOCKS, DENSE} <= _failures("attn: s2attn(group=8)")


def test_shifting_every_head_fails_the_block_mask(monkeypatch):
    from surgery.attention.program import HeadRule

    monkeypatch.setattr(HeadRule, "heads", lambda self, count: range(0, count))
    assert BLOCKS in _failures("attn: s2attn(group=8)")


def test_acting_in_eval_mode_fails(monkeypatch):
    monkeypatch.setattr(Program, "active", lambda self, training: self)
    assert EVAL in _failures("attn: s2attn(group=8)")


def test_training_gradients_equal_the_dense_reference():
    model = tiny("llama")
    apply_plan(_plan("attn: s2attn(group=6)", model), model)
    model.train()
    ids = _ids(29, batch=2)
    grads = []
    for options in ({"surgery_tile": 5}, {"surgery_reference": True}):
        model.zero_grad()
        model(input_ids=ids, labels=ids, **options).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() < 1e-5 and grads[0].abs().max() > 1e-4


def test_training_visits_a_band_of_g_keys(monkeypatch):
    seen = []
    real = fast.sdpa

    def spy(q, k, v, **kwargs):
        seen.append(k.shape[-2])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fast, "sdpa", spy)
    model = tiny("llama")
    apply_plan(_plan("attn: s2attn(group=8)", model), model)
    model.train()
    model(input_ids=_ids(200), surgery_tile=16)
    assert seen and max(seen) <= 16 + 8


def _sdpa_calls(monkeypatch) -> list:
    """(query length, key length, is_causal, with a mask) of every fused call of the fast path."""
    seen = []
    real = fast.sdpa

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], is_causal, attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(fast, "sdpa", spy)
    return seen


def test_training_runs_causal_attention_per_group(monkeypatch):
    """203 tokens in groups of 8: per layer, the plain heads' 25 whole groups in one call and the 3
    tokens left; the shifted heads' first 4, 24 whole groups, the 7 left. Each call causal, unmasked,
    over one group's keys (N × g, never N × N); a tiled run would pass masks."""
    seen = _sdpa_calls(monkeypatch)
    model = tiny("llama")
    apply_plan(_plan("attn: s2attn(group=8)", model), model)
    model.train()
    model(input_ids=_ids(203, batch=2), attention_mask=torch.ones(2, 203, dtype=torch.long))  # ones: no padding
    assert seen == [(8, 8, True, False), (3, 3, True, False), (4, 4, True, False), (8, 8, True, False),
                    (7, 7, True, False)] * 2


def test_padding_a_cache_and_a_bias_stay_on_the_tiled_path(monkeypatch):
    """Left padding shifts a row's groups, a cached prefix puts keys before the queries, and a score
    bias changes scores: those calls run tiled (masked), and equal the dense reference."""
    model = tiny("llama")
    apply_plan(_plan("attn: s2attn(group=8)", model), model)
    model.train()
    ids, mask = _ids(30, batch=2), torch.ones(2, 30, dtype=torch.long)
    mask[0, :3] = 0
    seen = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        assert seen and all(masked for *_, masked in seen)
        want = model(input_ids=ids, attention_mask=mask, surgery_reference=True).logits
        assert (got - want)[mask.bool()].abs().max() < 1e-5
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :20], cache=cache, use_cache=True)
        seen.clear()
        model(input_ids=ids[:, 20:], cache=cache, use_cache=True)
        assert seen and all(masked for *_, masked in seen)
    biased = tiny("llama")
    apply_plan(_plan("attn: s2attn(group=8) + alibi()", biased), biased)
    biased.train()
    seen.clear()
    with torch.no_grad():
        biased(input_ids=ids)
    assert seen and all(masked for *_, masked in seen)


def test_eval_generation_is_the_untouched_model():
    model, untouched = tiny("qwen2"), tiny("qwen2")
    apply_plan(_plan("attn: s2attn(group=4)", model), model)
    ids = _ids(12)
    got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, untouched.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0))
    model.train()
    with torch.no_grad():  # and in training it is not
        assert (model(input_ids=got).logits - untouched(input_ids=got).logits).abs().max() > 1e-3


def test_composes_with_a_window_and_alibi():
    model = tiny("llama")
    plan = _plan("attn: s2attn(group=6) + alibi() + window(16, sinks=2)", model)
    report = verify(plan, model)
    assert report.ok, report.text()


@pytest.mark.parametrize("text, arch, message", [
    ("attn: s2attn(group=1)", "llama", "greater than or equal to 2"),
    ("attn: s2attn(group=8)", "bert", "attends in both directions"),
])
def test_spec_errors(text, arch, message):
    with pytest.raises(SpecError) as e:
        _plan(text, tiny(arch))
    assert message in str(e.value)


@pytest.mark.slow
def test_verifies_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)  # 9 heads: 4 in plain groups, 5 shifted
    report = verify(_plan("layers[0:2].attn: s2attn(group=2048)", model), model)
    assert report.ok, report.text()


@pytest.mark.slow
def test_verifies_on_every_layer_of_smollm2(smollm2_dir):
    """LongLoRA's recipe puts s2attn on all 30 layers: the fast path equals the dense reference layer by
    layer there too (the final logits of two float32 runs drift apart by 6e-5 rel. through 30 layers)."""
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    report = verify(_plan("attn: s2attn(group=4096)", model), model)
    assert report.ok, report.text()
