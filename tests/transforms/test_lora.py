"""LoRA: obligations on four architectures, that they can fail, and PEFT as the oracle."""

import peft
import pytest
import torch

from surgery.apply import apply_plan
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.lora import LoraAdapter, LoraParams
from surgery.verify import verify


def plan_for(text, model):
    return build_plan(parse(text), model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_obligations_hold(arch):
    model = tiny(arch)
    report = verify(plan_for("attn.*, mlp.*: lora(r=4, alpha=8)", model), model)
    assert report.ok, report.text()
    assert {m.obligation for m in report.measurements} == {
        "identity at init: layer output unchanged", "identity at init: model logits unchanged",
        "merged == unmerged (B perturbed)", "unmerge restores the weights bit-exactly"}


def test_identity_fails_when_b_does_not_start_at_zero(monkeypatch):
    real = LoraAdapter.__init__

    def nonzero_b(self, *args, **kwargs):
        real(self, *args, **kwargs)
        torch.nn.init.normal_(self.lora_B.weight)

    monkeypatch.setattr(LoraAdapter, "__init__", nonzero_b)
    model = tiny("llama")
    failed = {m.obligation for m in verify(plan_for("attn.q: lora(r=2)", model), model).failures}
    assert failed == {"identity at init: layer output unchanged", "identity at init: model logits unchanged"}


def test_merge_fails_when_the_scale_is_forgotten(monkeypatch):
    monkeypatch.setattr(LoraAdapter, "merge", lambda self, w, b: (w + self.lora_B.weight @ self.lora_A.weight, b))
    model = tiny("llama")
    report = verify(plan_for("attn.q: lora(r=2, alpha=8)", model), model)
    assert [m.obligation for m in report.failures] == ["merged == unmerged (B perturbed)"]


@pytest.mark.parametrize("rslora, scale", [(False, 16 / 4), (True, 16 / 2)])
def test_scale_is_alpha_over_r_or_root_r(rslora, scale):
    assert LoraParams(r=4, alpha=16, rslora=rslora).scaling == scale
    assert LoraParams(r=4).scaling == 1.0  # alpha defaults to r


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_equals_peft_lora_with_the_same_weights(arch, targets):
    ours = tiny(arch)
    apply_plan(plan_for("attn.qkv: lora(r=4, alpha=8)" if arch == "gpt2" else "attn.q, attn.v: lora(r=4, alpha=8)",
                        ours), ours)
    theirs = peft.get_peft_model(tiny(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             fan_in_fan_out=arch == "gpt2")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoraAdapter):
                module.lora_B.weight.normal_(generator=g)
                layer = theirs.base_model.model.get_submodule(name.removesuffix(".adapter"))
                layer.lora_A["default"].weight.copy_(module.lora_A.weight)
                layer.lora_B["default"].weight.copy_(module.lora_B.weight)
        ids = torch.randint(0, 128, (2, 12), generator=g)
        difference = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        moved = (ours(ids).logits - tiny(arch)(ids).logits).abs().max().item()
    assert difference < 1e-5 and moved > 1e-2


def test_dropout_acts_only_in_training():
    model = tiny("llama")
    apply_plan(plan_for("attn.q: lora(r=4, dropout=0.5)", model), model)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapter.lora_B.weight.fill_(1.0)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("r", [65, 9_000_000_000_000])
def test_a_rank_beyond_the_layer_is_refused_at_plan_time_with_its_position(r):
    # Before: r=9e12 reached the allocator at apply time and its C++ message reached the user.
    from surgery.errors import SpecErrors

    with pytest.raises(SpecErrors) as info:
        build_plan(parse(f"attn.q: lora(r={r})"), tiny("llama"))
    message = str(info.value)
    assert "exceeds min(in, out) = 64" in message and "1:9" in message and "alloc" not in message
    assert build_plan(parse("attn.q: lora(r=64)"), tiny("llama")).steps[0].params.r == 64
