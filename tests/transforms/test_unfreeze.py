"""unfreeze: the selected modules' own parameters train in full (PEFT's modules_to_save, LongLoRA's
embeddings and norms), selected by role on three architectures; each obligation can fail; beside
LoRA, a trained result saves and reloads bit-exactly with its trained embeddings and norms."""

import copy
import json

import pytest
import torch

import surgery
from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.unfreeze import Unfreeze
from surgery.verify import verify

VALUES = "no value changes: state dict bit-identical"
ONLY = "exactly the region's parameters are trainable"
OUTPUTS = "outputs unchanged: logits max abs diff"

# What `embed, norm.*` names in each role map: the input embeddings, the final norm, every layer's norms.
EXPECTED = {
    "llama": {"model.embed_tokens.weight", "model.norm.weight",
              *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))},
    "gpt2": {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
             *(f"transformer.h.{i}.{n}.{w}" for i in range(2) for n in ("ln_1", "ln_2") for w in ("weight", "bias"))},
    "qwen2": {"model.embed_tokens.weight", "model.norm.weight",
              *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))},
}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def plan_for(text, model):
    return build_plan(parse(text), model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_embeddings_and_norms_by_role_verify_and_are_exactly_the_trainable_ones(arch):
    model = tiny(arch)
    plan = plan_for("embed, norm.*: unfreeze", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 4
    apply_plan(plan, model)
    assert trainable(model) == EXPECTED[arch]


def test_beside_lora_the_adapters_and_the_region_train_and_nothing_else():
    model = tiny("llama")
    result = surgery.compile(model, "attn.q: lora(r=2); embed, norm: unfreeze")
    assert result.report.ok, result.report.text()
    lora = {n for n in trainable(model) if ".lora_" in n or "adapter" in n}
    assert len(lora) == 4  # A and B of two layers' q projections
    assert trainable(model) - lora == {"model.embed_tokens.weight", "model.norm.weight"}


def test_values_and_outputs_are_untouched():
    model = tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    apply_plan(plan_for("model: unfreeze", model), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_a_region_without_parameters_is_a_spec_error():
    with pytest.raises(SpecError) as e:
        plan_for("rotary: unfreeze", tiny("llama"))  # the rotary embedding holds buffers only
    assert "unfreeze finds no anchor" in str(e.value)


def _failed(model, text):
    report = verify(plan_for(text, model), model)
    return {m.obligation for m in report.measurements if not m.ok}


def test_an_extra_trainable_parameter_fails_only_the_region_obligation(monkeypatch):
    apply = Unfreeze.apply

    def leaky(self, p, model, targets, edit):  # the bug: the output head trains too
        apply(self, p, model, targets, edit)
        edit.requires_grad(model.lm_head.weight, True)

    monkeypatch.setattr(Unfreeze, "apply", leaky)
    assert _failed(tiny("llama"), "norm: unfreeze") == {ONLY}


def test_a_region_parameter_left_frozen_fails_the_region_obligation(monkeypatch):
    apply = Unfreeze.apply

    def partial(self, p, model, targets, edit):  # the bug: only the first target unfreezes
        apply(self, p, model, targets[:1], edit)

    monkeypatch.setattr(Unfreeze, "apply", partial)
    assert _failed(tiny("llama"), "norm.attn: unfreeze") == {ONLY}


def test_a_changed_value_fails_the_value_and_output_obligations(monkeypatch):
    apply = Unfreeze.apply

    def nudging(self, p, model, targets, edit):  # the bug: a weight moves
        apply(self, p, model, targets, edit)
        with torch.no_grad():
            model.model.norm.weight.add_(1e-3)

    monkeypatch.setattr(Unfreeze, "apply", nudging)
    assert _failed(tiny("llama"), "norm: unfreeze") == {VALUES, OUTPUTS}


def test_trained_embeddings_and_norms_save_and_reload_bit_exactly(tmp_path):
    model = tiny("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = surgery.compile(model, "attn.q, attn.v: lora(r=2); embed, norm.*: unfreeze")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    state = model.state_dict()
    kept = base.keys() & state.keys()  # the wrapped q/v weights are renamed under their LoRA layer
    assert len(kept) == len(base) - 4
    moved = {k for k in kept if not torch.equal(state[k], base[k])}
    assert moved == EXPECTED["llama"]  # the region trained; every other original tensor stayed
    result.save(tmp_path / "out")
    loaded = surgery.load(tmp_path / "out")
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert trainable(loaded) == trainable(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)



def _trained(model, spec):
    result = surgery.compile(model, spec)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return result, ids


@pytest.mark.parametrize("tied", [False, True])
def test_peft_loads_the_export_as_modules_to_save_with_equal_outputs(tmp_path, tied):
    from peft import PeftModel

    base = tiny("llama", tie_word_embeddings=tied)
    result, ids = _trained(copy.deepcopy(base), "attn.q, attn.v: lora(r=2); embed, norm.*: unfreeze")
    result.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(config["modules_to_save"]) == {n.removesuffix(".weight") for n in EXPECTED["llama"]}
    assert config.get("ensure_weight_tying", False) == tied
    peft_model = PeftModel.from_pretrained(base, tmp_path / "out" / "peft").eval()
    with torch.no_grad():
        ours, theirs = result.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        untouched = tiny("llama", tie_word_embeddings=tied)(input_ids=ids).logits
    assert (ours - untouched).abs().max() > 1e-2  # trained: the comparison can show a missing tensor
    assert (ours - theirs).abs().max() < 1e-5


def test_a_module_trained_in_full_that_holds_an_adapter_is_not_exported_to_peft(tmp_path):
    result, _ = _trained(tiny("llama"), "attn.q: lora(r=2); attn: unfreeze")
    result.save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["peft"].startswith("not written: model.layers.0.self_attn is trained in full and holds an adapter")
    assert not (tmp_path / "out" / "peft").exists()
