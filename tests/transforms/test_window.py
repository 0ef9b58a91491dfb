"""window(size, sinks=S): sliding-window attention and StreamingLLM, on tiny llama/mistral/qwen2/gpt2."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.attention.cache import ProgramLayer
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import verify


def _plan(text, model):
    return build_plan(parse(text), model)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [
    ("llama", "attn: window(16)"),
    ("mistral", "attn: window(16, sinks=4)"),     # llama with sinks: test_design_card_composes_with_rope
    ("qwen2", "layers[0].attn: window(8)"),   # one layer windowed, the other dispatches to plain sdpa
    ("gpt2", "attn: window(8)"),              # GPT-2 attention goes through the same interface
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 7


def test_eager_attention_is_windowed_too():
    model = tiny("llama", attn_implementation="eager")
    apply_plan(_plan("attn: window(8)", model), model)
    assert model.config._attn_implementation == "surgery"
    n = 24
    i = torch.arange(n)
    visible = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 8)
    mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
    ids = _ids(n)
    reference = tiny("llama", attn_implementation="eager")
    assert (_logits(model, ids) - _logits(reference, ids, attention_mask=mask)).abs().max() < 1e-5


@pytest.mark.parametrize("arch, text", [("llama", "attn: window(16, sinks=4)"), ("mistral", "attn: window(16)")])
def test_generate_keeps_the_cache_bounded(arch, text):
    model = tiny(arch)
    apply_plan(_plan(text, model), model)
    ids = _ids(48)
    out = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    assert out.sequences.shape == (1, 88)
    cache = out.past_key_values
    assert all(isinstance(layer, ProgramLayer) for layer in cache.layers)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [16, 16]
    # (key distances are measured, with surgery_record=True, by the bounded obligation and the next test)
    assert cache.get_seq_length() == 87  # the stream's length, as position ids need
    # Generation with the bounded cache equals the masked full forward over the generated text.
    full = _logits(model, out.sequences[:, :-1])[:, 47:]
    assert (torch.stack(out.logits, dim=1) - full).abs().max() < 1e-4


def test_sinks_keep_every_distance_within_capacity_while_plain_window_does_not_need_to_rotate():
    model = tiny("llama")
    apply_plan(_plan("attn: window(8, sinks=2)", model), model)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = _ids(40)
    with torch.no_grad():
        model(input_ids=ids[:, :30], cache=cache, use_cache=True, surgery_record=True)
        for t in range(30, 40):
            model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True, surgery_record=True)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8
        assert layer.columns().tolist() == [0, 1, 34, 35, 36, 37, 38, 39]  # 2 sinks + the 6 most recent
        assert layer.max_distance == 7  # sink 0 seen from the query's cache position 7


def test_left_padding_is_kept():
    model = tiny("mistral")
    apply_plan(_plan("attn: window(6)", model), model)
    ids = _ids(20)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    # Positions count the padding here, which RoPE does not see (only distances matter).
    got = _logits(model, padded, attention_mask=mask)[:, 5:]
    assert (got - _logits(model, ids)).abs().max() < 1e-5


def test_rollback_restores_implementation_and_removes_hooks():
    model = tiny("llama")
    ids = _ids(40)
    before = _logits(model, ids)
    config_dict = dict(vars(model.config))
    edit = apply_plan(_plan("attn: window(8, sinks=2)", model), model)
    assert model.config._attn_implementation == "surgery"
    assert (_logits(model, ids) - before).abs().max() > 1e-3  # the window changes long-range logits
    edit.rollback()
    assert vars(model.config) == config_dict and model.config._attn_implementation == "sdpa"
    for layer in model.model.layers:
        assert not layer.self_attn._forward_pre_hooks
        assert not hasattr(layer.self_attn, "surgery_attention")
    assert torch.equal(_logits(model, ids), before)


def test_design_card_composes_with_rope():
    model = tiny("llama")
    plan = _plan("attn.*: rope(ntk_dynamic, scale=4) + window(4096, sinks=4)", model)
    assert [s.transform for s in plan.steps] == ["rope", "window"]
    assert [t.path for t in plan.steps[1].targets] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    # The window resolves the rotary module when called, so it uses the rope step's replacement.
    frame = model.model.layers[0].self_attn.surgery_attention.frame
    assert frame.rotary() is model.model.rotary_emb and type(model.model.rotary_emb).__name__ != "LlamaRotaryEmbedding"
    out = model.generate(_ids(8), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16)


@pytest.mark.parametrize("text, message", [
    ("attn: window(4, sinks=4)", "sinks (4) must be smaller than size (4)"),
    ("attn: window(0)", "greater than or equal to 1"),
    ("attn: window(8, sinks=-1)", "greater than or equal to 0"),
])
def test_parameter_errors(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _plan(text, tiny("llama"))


def test_sinks_need_rotary_and_bidirectional_models_are_refused():
    with pytest.raises(SpecError, match="needs rotary position embeddings; gpt2 has none"):
        _plan("attn: window(8, sinks=2)", tiny("gpt2"))
    with pytest.raises(SpecError, match="attends in both directions"):
        _plan("attn: window(8)", tiny("bert"))


# --------------------------------------------------------------------------- serving conditions


def test_left_padded_rows_with_sinks_equal_the_rows_alone():
    """Sinks and windows count from each row's first real token (the padding is not a sink)."""
    model = tiny("llama")
    apply_plan(_plan("attn: window(8, sinks=2)", model), model)
    ids = _ids(37, batch=2, seed=1)
    padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :3] = 0
    got = _logits(model, padded, attention_mask=mask)[:, 3:]
    assert (got - _logits(model, ids)).abs().max() < 1e-5  # the old window: 0.29


def test_generate_on_a_left_padded_batch_equals_each_prompt_alone():
    model = tiny("llama")
    apply_plan(_plan("attn: window(8, sinks=2)", model), model)
    short, long = _ids(5, seed=2), _ids(11, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=short.dtype), short], dim=1), long])
    mask = (torch.arange(11)[None] >= torch.tensor([[6], [0]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for row, prompt in ((0, short), (1, long)):
        # an explicit mask: generate() would otherwise take a 0 inside the prompt for padding
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
        assert torch.equal(out[row, 11:], alone[0, prompt.shape[1]:])


def test_dynamic_rope_with_sinks_decodes_like_the_full_forward_past_the_trained_length():
    """rope(ntk_dynamic) + window(16, sinks=4): 300 tokens, L = 64; decoding must not drift."""
    model = tiny("llama")
    apply_plan(_plan("attn.*: rope(ntk_dynamic, scale=4) + window(16, sinks=4)", model), model)
    ids = _ids(300, seed=4)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 300):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        full = model(input_ids=ids, use_cache=False).logits
    assert (torch.cat(steps, dim=1) - full).abs().max() / full.abs().max() < 1e-5


def test_composed_program_has_its_own_obligation_past_the_trained_length():
    model = tiny("qwen2")
    report = verify(_plan("attn.*: rope(ntk_dynamic, scale=4) + window(12, sinks=2)", model), model)
    assert report.ok, report.text()
    composed = [m for m in report.measurements if m.obligation.startswith("program equals its dense reference")]
    assert len(composed) == 1 and composed[0].error < 1e-5


# ----------------------------------------------------------------------------- failing mutations


def _failures(text, arch="llama"):
    model = tiny(arch)
    return {m.obligation for m in verify(_plan(text, model), model).failures}


def test_window_off_by_one_fails_the_reference_mask(monkeypatch):
    from surgery.attention.program import WindowRule

    monkeypatch.setattr(WindowRule, "visible", lambda self, i, j: (i - j <= self.size - self.sinks) | (j < self.sinks))
    for text in ("attn: window(16)", "attn: window(16, sinks=4)"):
        assert "masked forward equals a reference mask (rel.)" in _failures(text)


def test_evicted_sinks_fail_cached_decode(monkeypatch):
    real = ProgramLayer.__init__

    def forgetful(self, *args):
        real(self, *args)
        self.head_span = 0  # keep no head: the sinks are evicted like any old token

    monkeypatch.setattr(ProgramLayer, "__init__", forgetful)
    failed = _failures("attn: window(16, sinks=4)")
    assert "cached decode equals the masked full forward (rel.)" in failed
    assert "cache stays bounded and every key distance ≤ capacity" in failed


def test_keys_cached_without_unrotating_fail_cached_decode(monkeypatch):
    from surgery.attention import cache

    # the un-rotation made the identity: keys cached as the model rotated them
    monkeypatch.setattr(cache, "_inverse", lambda cos, sin: (torch.ones_like(cos.float()).unsqueeze(1),
                                                             torch.zeros_like(sin.float()).unsqueeze(1)))
    assert "cached decode equals the masked full forward (rel.)" in _failures("attn: window(16, sinks=4)")
