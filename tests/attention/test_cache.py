"""The bounded cache layer: steady decoding written in place (cache.Ring) equals the full forward."""

import pytest
import torch
from transformers import DynamicCache

from surgery.apply import apply_plan
from surgery.attention import cache, fast
from surgery.attention.cache import Ring
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse


def _model(arch, text):
    model = tiny(arch)
    apply_plan(build_plan(parse(text), model), model)
    return model


def _decode(model, ids, prefill=5, pad=0):
    """Logits of a prefill then one token per call, with the all-ones (or left-padded) mask that
    generate() passes; also the number of calls layer 0 wrote in place, and its storage addresses."""
    cache_ = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    stepped, storage = 0, set()
    with torch.no_grad():
        out = [model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache_, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache_,
                             use_cache=True).logits)
            layer = cache_.layers[0]
            if layer.stepped is not None:
                stepped += 1
                storage.add(layer.keys.data_ptr())
    return torch.cat(out, dim=1), stepped, storage, cache_.layers[0]


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("arch, text, prefill", [
    ("llama", "attn: window(8, sinks=2)", 5),
    ("qwen2", "attn: window(8, sinks=2)", 5),
    ("mistral", "attn: window(8)", 5),
    ("llama", "attn: window(8, sinks=2)", 20),  # a prompt longer than the window: its cache one short of full
    ("mistral", "attn: window(8)", 20),
])
def test_steady_decoding_is_written_in_place_and_equals_the_full_forward(arch, text, prefill):
    """60 tokens through an 8-slot cache: the ring fills, wraps several times and, with sinks, the
    frame is rebased (positions kept within 3·size) several times."""
    model = _model(arch, text)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    got, stepped, storage, layer = _decode(model, ids, prefill=prefill)
    assert stepped == 60 - prefill  # every step after the prefill, while the cache fills and once it is full
    assert len(storage) == 1      # one buffer, written in place
    assert layer.keys.shape[-2] == 8
    if "sinks" in text:
        assert layer.origin > 0   # rebased
    assert _rel(got, full) < 1e-5


def test_a_misplaced_slot_fails():
    model = _model("llama", "attn: window(8)")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    real = Ring.slot
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Ring, "slot", lambda self, column: real(self, column + 1))  # overwrites a key still in view
        assert _rel(_decode(model, ids)[0], full) > 1e-3


@pytest.mark.parametrize("mutation", ["sink offset", "rebase columns"])
def test_misplaced_sinks_or_a_wrong_rebase_fail(mutation, monkeypatch):
    model = _model("llama", "attn: window(8, sinks=2)")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    assert _rel(_decode(model, ids)[0], full) < 1e-5
    if mutation == "sink offset":
        real = fast.sink_offset
        monkeypatch.setattr(fast, "sink_offset", lambda i, size, origin: real(i, size, origin) + 1)
    else:
        real = Ring.columns
        monkeypatch.setattr(Ring, "columns", lambda self, start, end: real(self, start, end) + 1)
    assert _rel(_decode(model, ids)[0], full) > 1e-3


def _padded(text):
    model = _model("llama", text)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids, use_cache=False).logits
    return model, padded, alone


@pytest.mark.parametrize("text", ["attn: window(8)", "attn: window(8, sinks=2)"])
def test_a_padded_batch_takes_the_general_path(text):
    """A left-padded row must not see its padding: the in-place step (no mask) is for unpadded calls."""
    model, padded, alone = _padded(text)
    got, stepped, _, _ = _decode(model, padded, prefill=8, pad=3)
    assert stepped == 0
    assert _rel(got[:, 3:], alone) < 1e-5


def test_padding_taken_for_none_fails(monkeypatch):
    model, padded, alone = _padded("attn: window(8)")
    monkeypatch.setattr(cache, "_unpadded", lambda mask: True)
    got, stepped, _, _ = _decode(model, padded, prefill=8, pad=3)
    assert stepped > 0 and _rel(got[:, 3:], alone) > 1e-3


def test_a_non_steady_call_sees_the_columns_in_order_again():
    """Steps in place, then a 3-token chunk (the general path, columns in order), then steps again."""
    model = _model("llama", "attn: window(8, sinks=2)")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache_ = DynamicCache(config=model.config)
        out = [model(input_ids=ids[:, :5], cache=cache_, use_cache=True).logits]
        t = 5
        while t < 40:
            n = 3 if t == 23 else 1
            out.append(model(input_ids=ids[:, t:t + n], cache=cache_, use_cache=True).logits)
            # every single token is written in place: while the cache fills (t < 8), once it is
            # full, and right after the chunk, which leaves it one short of full
            assert (cache_.layers[0].stepped is not None) == (n == 1)
            t += n
    assert _rel(torch.cat(out, dim=1), full) < 1e-5
