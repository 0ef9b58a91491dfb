"""alibi(rope=keep|drop): per-head linear distance biases, on tiny llama/qwen2/mistral/gpt2 and SmolLM2."""

import math

import pytest
import torch

from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms import alibi
from surgery.verify import verify


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [
    ("llama", "attn: alibi()"),
    ("qwen2", "attn: alibi(rope=drop)"),
    ("mistral", "layers[1].attn: alibi(rope=drop)"),
    ("gpt2", "attn: alibi"),                 # learned absolute positions stay
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 6


def test_slopes_follow_the_paper_for_any_head_count():
    assert alibi.slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, …)
    assert torch.allclose(alibi.slopes(12)[8:], torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]))
    assert torch.allclose(alibi.slopes(9), torch.cat([alibi.slopes(8), torch.tensor([2 ** -0.5])]))
    for heads in (8, 12, 16, 9, 3, 40):
        bloom = alibi._bloom_slopes(heads)
        assert ((alibi.slopes(heads) - bloom).abs() / bloom).max() < 1e-6


def test_bias_is_minus_slope_times_distance_and_equals_bloom_per_row():
    i, j = torch.arange(6)[None, :, None], torch.arange(6)[None, None, :]
    bias = alibi.AlibiBias()(i, j, 12)                       # [1, 12, 6, 6]
    assert bias[0, 0, 5, 2] == -0.5 * 3 and bias[0, 11, 4, 4] == 0
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 6), 12, torch.float32).view(1, 12, 1, 6)
    # BLOOM adds m·j; ours −m·(i − j): the difference is −m·i, constant along each row.
    diff = bias - bloom
    assert (diff - diff[..., :1]).abs().max() < 1e-6


def _failures(text, arch="llama"):
    model = tiny(arch)
    return {m.obligation for m in verify(_plan(text, model), model).failures}


def test_power_of_two_rule_for_every_head_count_fails_the_bloom_slopes(monkeypatch):
    naive = lambda heads: torch.tensor([2.0 ** (-8 * h / heads) for h in range(1, heads + 1)])  # noqa: E731
    monkeypatch.setattr(alibi, "slopes", naive)
    assert "slopes equal BLOOM's (8, 12, 16, 9 heads and the model's; rel.)" in _failures("attn: alibi()")


def test_bias_of_the_wrong_sign_fails_the_bloom_mask(monkeypatch):
    monkeypatch.setattr(alibi.AlibiBias, "__call__",
                        lambda self, i, j, heads: alibi.slopes(heads)[None, :, None, None] * (i - j)[:, None].float())
    assert "each layer equals the untouched layer given BLOOM's ALiBi mask (rel.)" in _failures("attn: alibi()")


def test_rope_left_on_fails_drop(monkeypatch):
    from surgery.attention.program import Program

    monkeypatch.setattr(Program, "unrotated", property(lambda self: False))
    failed = _failures("attn: alibi(rope=drop)", arch="qwen2")
    assert "each layer equals the untouched layer given BLOOM's ALiBi mask (rel.)" in failed
    assert "zero slopes are the identity (rope=drop: against zero rotary frequencies; rel.)" in failed


def test_drop_caches_unrotated_keys_and_generates_like_the_full_forward():
    model = tiny("llama")
    apply_plan(_plan("attn: alibi(rope=drop)", model), model)
    ids = _ids(20)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    with torch.no_grad():
        full = model(input_ids=out.sequences[:, :-1]).logits[:, 19:]
        # un-rotated: the keys in the cache are k_proj of the layer input itself (layer 0: the embeddings)
        layer0 = model.model.layers[0]
        hidden = layer0.input_layernorm(model.model.embed_tokens(out.sequences[:, :-1]))
        k = layer0.self_attn.k_proj(hidden).view(1, -1, 2, 16).transpose(1, 2)
    assert (torch.stack(out.logits, dim=1) - full).abs().max() < 1e-4
    assert (out.past_key_values.layers[0].keys - k).abs().max() < 1e-5


def test_drop_clashes_with_a_sink_window_but_keep_composes():
    model = tiny("llama")
    with pytest.raises(SpecError) as e:
        _plan("attn: alibi(rope=drop) + window(8, sinks=2)", model)
    assert "both set the attention frame" in str(e.value)
    plan = _plan("attn: alibi() + window(8, sinks=2)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    ids = _ids(30)
    with torch.no_grad():  # the composed program's fast path against its dense reference, several tiles
        fast = model(input_ids=ids, surgery_tile=7).logits
        dense = model(input_ids=ids, surgery_reference=True).logits
    assert (fast - dense).abs().max() < 1e-5
    from surgery.transforms.window import Window

    ids = _ids(40, batch=2, seed=5)  # past the window: sinks at their slots, the bias at the slots too
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert (Window._decode(model, ids, prefill=5) - full).abs().max() < 1e-5


def test_alibi_changes_the_model_and_keep_differs_from_drop():
    ids = _ids(24)
    logits = {}
    for text in ("", "attn: alibi()", "attn: alibi(rope=drop)"):
        model = tiny("llama")
        if text:
            apply_plan(_plan(text, model), model)
        with torch.no_grad():
            logits[text] = model(input_ids=ids).logits
    assert (logits["attn: alibi()"] - logits[""]).abs().max() > 1e-2
    assert (logits["attn: alibi()"] - logits["attn: alibi(rope=drop)"]).abs().max() > 1e-3  # tiny random logits are small


@pytest.mark.parametrize("text, arch, message", [
    ("attn: alibi(rope=drop)", "gpt2", "removes rotary position embeddings, but gpt2 has none"),
    ("attn: alibi()", "bert", "attends in both directions"),
    ("attn: alibi(rope=off)", "llama", "keep"),
])
def test_spec_errors(text, arch, message):
    with pytest.raises(SpecError) as e:
        _plan(text, tiny(arch))
    assert message in str(e.value)


@pytest.mark.slow
def test_verifies_on_smollm2_with_nine_heads(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    assert model.config.num_attention_heads == 9  # not a power of two: the interpolated slopes
    for text in ("layers[0:2].attn: alibi()", "layers[0:2].attn: alibi(rope=drop)"):
        report = verify(_plan(text, model), model)
        assert report.ok, report.text()
    assert math.isclose(alibi.slopes(9)[-1].item(), 2 ** -0.5, rel_tol=1e-7)
