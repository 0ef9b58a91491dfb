"""BitFit: obligations on three architectures with biases, region selection, errors, rollback."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.errors import SpecError, SurgeryError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.bitfit import BitFit
from surgery.transforms.lora import LoRA
from surgery.verify import verify

LAYER0 = {"gpt2": "transformer.h.0.", "bert": "bert.encoder.layer.0.", "qwen2": "model.layers.0."}


def plan_for(text, model):
    return build_plan(parse(text), model)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def bias_names(model, prefix=""):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix) and n.rsplit(".", 1)[-1] == "bias"}


@pytest.mark.parametrize("arch", ["gpt2", "bert", "qwen2"])
def test_whole_model_verifies_and_trains_exactly_the_biases(arch):
    model = tiny(arch)
    plan = plan_for("model: bitfit", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 3
    apply_plan(plan, model)
    assert bias_names(model)  # the test means something only if there are biases
    assert trainable(model) == bias_names(model)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "qwen2"])
def test_one_layer_trains_only_that_layers_biases(arch):
    model = tiny(arch)
    plan = plan_for("layers[0]: bitfit", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    expected = bias_names(model, LAYER0[arch])
    assert expected and expected != bias_names(model)
    assert trainable(model) == expected


def test_outputs_and_module_tree_are_untouched():
    model = tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    apply_plan(plan_for("model: bitfit", model), model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("text", ["model: bitfit", "layers[0]: bitfit", "attn.q: bitfit"])
def test_a_region_without_biases_is_a_spec_error(text):
    with pytest.raises(SpecError) as e:
        plan_for(text, tiny("llama"))  # llama has no bias anywhere
    assert "bitfit finds no anchor" in str(e.value)


def test_composes_with_lora_and_both_train():
    model = tiny("qwen2")
    plan = plan_for("model: bitfit; attn.q: lora(r=2)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    names = trainable(model)
    lora = {n for n in names if ".lora_" in n}
    assert len(lora) == 4  # A and B of attn.q in two layers
    assert names - lora == bias_names(model)


def test_a_failing_later_step_restores_every_flag(monkeypatch):
    model = tiny("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed starting state, so "all True" is wrong too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_for("model: bitfit; attn.q: lora(r=2)", model)

    def broken(self, p, base, target):
        raise RuntimeError("adapter construction failed")

    monkeypatch.setattr(LoRA, "adapter", broken)
    with pytest.raises(SurgeryError, match="adapter construction failed"):
        apply_plan(plan, model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_obligations_catch_a_wrong_transform(monkeypatch):
    model = tiny("gpt2")
    plan = plan_for("layers[0]: bitfit", model)
    right = BitFit.apply

    def sloppy(self, p, m, targets, edit):
        right(self, p, m, targets, edit)
        edit.requires_grad(m.transformer.wte.weight, True)  # a non-bias made trainable
        with torch.no_grad():
            m.transformer.h[0].mlp.c_fc.bias.add_(0.1)  # and a value changed

    monkeypatch.setattr(BitFit, "apply", sloppy)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    assert failed["only the region's bias tensors are trainable"] == 1.0
    assert failed["outputs unchanged at init: logits max abs diff"] > 1e-3

    def too_wide(self, p, m, targets, edit):
        for name, param in m.named_parameters():  # biases outside layer 0 too
            if name.endswith("bias"):
                edit.requires_grad(param, True)

    monkeypatch.setattr(BitFit, "apply", too_wide)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    outside = len(bias_names(model)) - len(bias_names(model, LAYER0["gpt2"]))
    assert failed == {"only the region's bias tensors are trainable": float(outside)}

    def wrapping(self, p, m, targets, edit):
        right(self, p, m, targets, edit)
        path = "transformer.h.0.ln_1"
        edit.replace(path, torch.nn.Sequential(m.get_submodule(path)))  # same function, new module tree

    monkeypatch.setattr(BitFit, "apply", wrapping)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    assert list(failed) == ["no new modules: module tree and parameter names unchanged"]
    assert failed["no new modules: module tree and parameter names unchanged"] >= 1
