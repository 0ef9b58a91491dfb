"""logn(L): queries past the trained length scaled by log_L(i + 1), on tiny llama/qwen2/gpt2 and SmolLM2."""

import math

import pytest
import torch

from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms import logn
from surgery.verify import verify


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [
    ("llama", "attn: logn"),              # L = 64 > 24: checked with L = 16
    ("qwen2", "layers[0].attn: logn(8)"),
    ("gpt2", "attn: logn(20)"),
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 5


def test_scale_is_one_within_the_trained_length_and_log_beyond():
    s = logn.LogScale(8)(torch.tensor([-3, 0, 6, 7, 8, 63]))
    assert s[:4].tolist() == [1.0, 1.0, 1.0, 1.0]        # i + 1 ≤ 8 (and padding rows)
    assert math.isclose(s[4].item(), math.log(9) / math.log(8), rel_tol=1e-6)
    assert math.isclose(s[5].item(), 2.0, rel_tol=1e-6)  # log_8(64)


def test_default_length_is_the_model_trained_length():
    model = tiny("llama")
    apply_plan(_plan("attn: logn", model), model)
    assert model.model.layers[0].self_attn.surgery_attention.stages[0].scale == (logn.LogScale(64),)
    ids = _ids(100)
    with torch.no_grad():
        out, untouched = model(input_ids=ids).logits, tiny("llama")(input_ids=ids).logits
    assert (out[:, :64] - untouched[:, :64]).abs().max() < 1e-6
    assert (out[:, 64:] - untouched[:, 64:]).abs().max() > 1e-4  # s(99) = log_64(100) ≈ 1.11: small, but there


def _failures(text, arch="llama"):
    model = tiny(arch)
    return {m.obligation for m in verify(_plan(text, model), model).failures}


def test_one_based_index_off_by_one_fails(monkeypatch):
    # log_L(i) instead of log_L(i + 1): still 1 within L, but the rows past L are scaled wrongly
    monkeypatch.setattr(logn.LogScale, "__call__",
                        lambda self, i: (torch.log(i.clamp(min=1).double()) / math.log(self.length)).clamp(min=1).float())
    assert "each layer equals the untouched layer with scaling × s(i) (rel.)" in _failures("attn: logn(8)")


def test_padding_counted_as_stream_fails_padded_rows(monkeypatch):
    from surgery.attention.keys import Inputs

    # query (and key) indices counted from column 0, padding included
    monkeypatch.setattr(Inputs, "pads", lambda self: torch.zeros(self.q.shape[0], dtype=torch.long))
    assert "a left-padded row equals the row alone (rel.)" in _failures("attn: logn(8)")


def test_scale_from_the_call_not_the_stream_fails_cached_decode(monkeypatch):
    from surgery.attention.keys import Inputs

    # queries numbered within the call: a decoding query looks like i = 0
    monkeypatch.setattr(Inputs, "query_columns", lambda self: torch.arange(self.q.shape[-2]))
    assert "cached decode equals the full forward (rel.)" in _failures("attn: logn(8)")


def test_composes_with_alibi_and_a_sink_window():
    model = tiny("llama")
    plan = _plan("attn: logn(8) + alibi() + window(16, sinks=4)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    ids = _ids(50, batch=2)
    with torch.no_grad():
        fast_logits = model(input_ids=ids, surgery_tile=7).logits
        dense = model(input_ids=ids, surgery_reference=True).logits
    assert (fast_logits - dense).abs().max() < 1e-5


@pytest.mark.parametrize("text, arch, message", [
    ("attn: logn(1)", "llama", "greater than or equal to 2"),
    ("attn: logn", "bert", "attends in both directions"),
])
def test_spec_errors(text, arch, message):
    with pytest.raises(SpecError) as e:
        _plan(text, tiny(arch))
    assert message in str(e.value)


@pytest.mark.slow
def test_verifies_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    report = verify(_plan("layers[0:2].attn: logn", model), model)  # L = 8192, checked with L = 16
    assert report.ok, report.text()
