"""rerope(window=w) and leaky_rerope(window=w, k=…|dynamic=true), on tiny llama/qwen2/mistral and SmolLM2."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.attention import fast
from surgery.attention.cache import ProgramLayer
from surgery.errors import SpecError, SpecErrors
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import verify


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("arch, text, count", [
    ("llama", "attn: rerope(window=8)", 5),
    ("qwen2", "attn: rerope(12)", 5),
    ("mistral", "attn: leaky_rerope(window=8, k=4)", 6),
    ("qwen2", "attn: leaky_rerope(6, k=2.5)", 6),
    ("llama", "attn: leaky_rerope(6, dynamic=true, original_max_position=20)", 6),
])
def test_obligations_hold(arch, text, count):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == count


def _measure(text, arch="llama"):
    model = tiny(arch)
    return {m.obligation: m.error for m in verify(_plan(text, model), model).measurements}


def test_a_far_band_off_by_one_fails_the_explicit_reference(monkeypatch):
    """Mutation: the fast path places far queries at w + 1: the explicit-matrix reference catches it
    (and the dense reference, which is built from the frame's relative positions, disagrees too)."""
    real = fast._relative

    def shifted(program, x):
        import dataclasses

        from surgery.attention.program import Program
        frame = dataclasses.replace(program.frame, window=program.frame.window + 1)
        origin, q_near, k_near, q_far, k_far = real(Program((dataclasses.replace(program.stages[0], frame=frame),)), x)
        return origin, q_near, k_near, q_far, k_far

    monkeypatch.setattr(fast, "_relative", shifted)
    errors = _measure("attn: rerope(window=8)")
    assert errors["equals a reference from the explicit relative-position matrix (rel.)"] > 1e-4
    assert errors["the fast path equals the dense reference (rel.)"] > 1e-4


def test_keys_cached_after_rope_fail_cached_decode(monkeypatch):
    """Mutation: the cache keeps keys as the model rotated them (no un-rotation): decoding re-rotates
    rotated keys, and 'cached decode equals the full forward' fails."""
    import surgery.attention.cache as cache

    monkeypatch.setattr(cache, "_inverse", lambda cos, sin: (torch.ones_like(cos.float()).unsqueeze(1),
                                                             torch.zeros_like(sin.float()).unsqueeze(1)))
    for text in ("attn: rerope(window=8)", "attn: leaky_rerope(6, dynamic=true, original_max_position=20)"):
        assert _measure(text)["cached decode equals the full forward (rel.)"] > 1e-4


def test_a_constant_leak_fails_the_dynamic_identity_and_decode(monkeypatch):
    """Mutation: dynamic k frozen at 2 instead of max(1, n/L): lengths ≤ L change."""
    from surgery.attention.program import RelativeFrame

    monkeypatch.setattr(RelativeFrame, "leak", lambda self, n: torch.full(n.shape, 2.0, dtype=torch.float64))
    errors = _measure("attn: leaky_rerope(6, dynamic=true, original_max_position=20)")
    assert errors["window ≥ N is the identity (rel.)"] > 1e-4


def test_rerope_changes_long_range_logits_and_keeps_short_ones():
    model = tiny("llama")
    original = tiny("llama")
    apply_plan(_plan("attn: rerope(window=8)", model), model)
    ids = _ids(30)
    got, want = _logits(model, ids), _logits(original, ids)
    assert (got[:, :8] - want[:, :8]).abs().max() < 1e-5     # every distance < 8: plain RoPE
    assert (got[:, 8:] - want[:, 8:]).abs().max() > 1e-3     # distances ≥ 8 are seen at 8


def test_generate_keeps_pre_rope_keys_and_equals_the_full_forward():
    model = tiny("llama")
    apply_plan(_plan("attn: leaky_rerope(window=6, k=3)", model), model)
    ids = _ids(10)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    cache = out.past_key_values
    assert all(isinstance(layer, ProgramLayer) for layer in cache.layers)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [29, 29]  # nothing evicted
    full = _logits(model, out.sequences[:, :-1])[:, 9:]
    assert (torch.stack(out.logits, dim=1) - full).abs().max() < 1e-4


def test_rerope_and_sinks_clash_with_both_spans():
    with pytest.raises(SpecErrors) as e:
        _plan("attn: rerope(window=8)\nattn: window(16, sinks=4)", tiny("llama"))
    message = str(e.value)
    assert "both set the attention frame" in message and "<spec>:1:7" in message


@pytest.mark.parametrize("text, message", [
    ("attn: leaky_rerope(window=8)", "exactly one of k"),
    ("attn: leaky_rerope(window=8, k=2, dynamic=true)", "exactly one of k"),
    ("attn: leaky_rerope(window=8, k=2, original_max_position=16)", r"\(dynamic=true\) only"),
    ("attn: leaky_rerope(window=8, k=0.5)", "greater than or equal to 1"),
])
def test_bad_parameters_are_spec_errors(text, message):
    with pytest.raises((SpecError, SpecErrors), match=message):
        _plan(text, tiny("llama"))


def test_models_without_rope_are_refused():
    with pytest.raises((SpecError, SpecErrors), match="no rotary position embeddings"):
        _plan("attn: rerope(window=8)", tiny("gpt2"))


@pytest.mark.slow
def test_verifies_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    for text in ("attn.*: rerope(window=512)", "attn.*: leaky_rerope(window=512, dynamic=true)"):
        report = verify(_plan(text, model), model)
        assert report.ok, report.text()
