"""Verification on models without per-position logits (backbones, sequence classifiers) and on meta."""

import pytest
import torch
import transformers

import surgery
from surgery.errors import ModelError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.lora import LoraAdapter
from surgery.verify import Check, _per_position_logits, verify

SPEC = "attn.*: lora(r=2) + window(4) + rope(linear, scale=2)"


def headless(kind: str) -> torch.nn.Module:
    """A tiny Llama as a backbone without a head, or as a 3-label sequence classifier."""
    config = tiny("llama").config
    if kind == "backbone":
        model = transformers.LlamaModel(config)
    else:
        config = transformers.LlamaConfig(**{**config.to_dict(), "num_labels": 3, "id2label": None,
                                              "label2id": None, "pad_token_id": 0})
        model = transformers.LlamaForSequenceClassification(config)
    torch.manual_seed(0)
    return model.eval()


@pytest.mark.parametrize("kind", ["backbone", "classifier"])
def test_obligations_apply_to_models_without_per_position_logits(kind):
    # Decoding obligations read per-position logits: they reported a bare "error inf" here.
    model = headless(kind)
    report = verify(build_plan(parse(SPEC), model), model)
    assert report.ok, report.text()
    assert any("cached decode" in m.obligation for m in report.measurements)
    assert all(m.error < 1e-4 for m in report.measurements)
    result = surgery.compile(model, SPEC)
    assert result.report.ok


@pytest.mark.parametrize("kind", ["backbone", "classifier"])
def test_per_position_logits_are_the_models_own_outputs(kind):
    model = headless(kind)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    plan = build_plan(parse("attn.q: lora(r=2)"), model)
    check = Check(model, model, plan.steps[0], 0, _per_position_logits(model))
    shown = check.logits(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids)
    if kind == "backbone":
        assert torch.equal(shown, out.last_hidden_state)
    else:  # before pooling: every position, the last one being the classifier's own (no padding)
        assert shown.shape == (2, 10, 3) and out.logits.shape == (2, 3)
        assert torch.equal(shown[:, -1], out.logits)
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_a_broken_transform_still_fails_on_a_classifier(monkeypatch):
    real = LoraAdapter.__init__

    def nonzero_b(self, *args, **kwargs):
        real(self, *args, **kwargs)
        torch.nn.init.normal_(self.lora_B.weight)

    monkeypatch.setattr(LoraAdapter, "__init__", nonzero_b)
    model = headless("classifier")
    failed = {m.obligation for m in verify(build_plan(parse("attn.q: lora(r=2)"), model), model).failures}
    assert failed == {"identity at init: layer output unchanged", "identity at init: model logits unchanged"}


def test_checking_a_meta_model_is_refused_with_the_reason():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny("llama").config)
    modules = [id(m) for m in model.modules()]
    with pytest.raises(ModelError, match="meta device .* cannot be checked"):
        surgery.compile(model, "attn.q: lora(r=2)")
    assert [id(m) for m in model.modules()] == modules
    assert surgery.compile(model, "attn.q: lora(r=2)", check=False).plan.steps  # planning alone works
