"""window(size, sinks=S): sliding-window attention and StreamingLLM, on tiny llama/mistral/qwen2/gpt2."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.plan import build_plan
from surgery.syntax import parse
from surgery.attention.cache import ProgramLayer
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
