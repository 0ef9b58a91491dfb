"""UniPELT's gate(…): planned where a gate has a contribution to scale, built at linear, sublayer and
attention (K/V prefix) anchors, its obligations met on two decoders and BERT and able to fail, and
a gated model diffs, saves and reloads bit-exactly."""

import copy
import math

import pytest
import torch

import surgery
from surgery import gating
from surgery.errors import SpecErrors
from surgery.gating import GatedLinear, GatedSublayer, GateNet
from surgery.models import tiny
from surgery.verify import verify

GATE_OBLIGATIONS = {"gate fixed at 1 == the ungated composition (rel.)",
                    "gate fixed at 0 == the model without the gated steps (rel.)",
                    "learned gate == its formula by hand at each gated place (rel.)"}


def errors(spec, model):
    with pytest.raises(SpecErrors) as caught:
        surgery.plan(model, spec)
    return [e.message for e in caught.value.errors]


def gate_rows(report):
    return {m.obligation: m for m in report.measurements if m.transform.startswith("gate(")}


# ------------------------------------------------------------------------------------ planning


def test_a_gate_only_where_there_is_a_contribution_to_scale():
    llama = tiny("llama")
    assert errors("embed: gate(prompt_tuning(4))", llama) == [
        "gate(…) scales a contribution at linear, sublayer or attention anchors; prompt_tuning attaches to "
        "embeddings anchors, where there is none to scale"]
    assert errors("attn: gate(window(8))", llama) == [
        "gate(…) at attention weighs a K/V prefix (prefix_tuning, p_tuning_v2); window adds no prefix to weigh"]
    assert errors("attn.q: gate(gate(lora))", llama) == [
        "a gate inside a gate: gate(…) already scales each branch it holds"]
    assert errors("attn: gate(prefix_tuning(4) | window(8))", llama) == [
        "gate(…) over a K/V prefix holds that prefix alone: write gate(prefix_tuning(…))"]
    assert errors("attn: gate(lora, prefix_tuning(4))", llama)[0].startswith("'gate(…)' UniPELT's learned gates, but")


def test_gate_of_branches_is_one_gate_per_branch_and_a_sequence_has_one():
    model = tiny("llama")
    surgery.compile(model, "attn.v: gate(lora(r=2) | ia3)\nattn.k: gate(lora(r=2) + ia3)", check=False)
    v = model.model.layers[0].self_attn.v_proj.adapter
    assert [type(m).__name__ for m in v] == ["GatedLinear", "GatedLinear"]
    assert [type(m.module).__name__ for m in v] == ["LoraAdapter", "IA3Adapter"]
    q = model.model.layers[0].self_attn.k_proj.adapter
    assert isinstance(q, GatedLinear) and type(q.module).__name__ == "Sequential"


def test_a_plan_shows_its_gates_and_counts_their_parameters():
    """The bug: a plan listed gate(lora(r=8, …)) as lora(r=8, …), so a reviewed plan hid its gates."""
    model = tiny("llama")
    spec = ("attn.q, attn.v: gate(lora(r=8, alpha=8))\nattn: gate(prefix_tuning(4, hidden=32))\n"
            "mlp: gate(adapter(pfeiffer))\nmlp.down: gate(lora(r=2) + ia3)\nattn.k: lora(r=2) | gate(ia3)")
    plan = surgery.plan(model, spec)
    lora = "lora(r={}, alpha={}, dropout=0.0, init=kaiming, rslora=False)"
    assert plan.described_steps() == [
        f"gate({lora.format(8, 8.0)})", "gate(prefix_tuning(length=4, reparam=mlp, hidden=32))",
        "gate(adapter(kind=pfeiffer, reduction=None, act=None, scaling=None))",
        f"gate({lora.format(2, None)} + step 4)", "gate(step 3 + ia3(loss=lm))",  # one gate over the sequence
        lora.format(2, None), "gate(ia3(loss=lm))"]
    # Each gate is a (d + 1)-parameter linear layer on what it reads: d = 64 (q, v, k, the prefix's
    # attention input, the adapter's FFN output), f = 128 (down_proj's input), in each of 2 layers.
    ungated = surgery.plan(model, spec.replace("gate(", "("))
    assert plan.counts.trainable == ungated.counts.trainable + 2 * (5 * (64 + 1) + (128 + 1))
    applied = surgery.compile(model, spec, check=False).model
    assert plan.counts.trainable == sum(p.numel() for p in applied.parameters() if p.requires_grad)
    assert plan.counts.added == plan.counts.total - plan.base_counts.total == plan.counts.trainable


# ------------------------------------------------------------------------------------ obligations


SPECS = {
    "lora": "attn.q, attn.v: gate(lora(r=4))",
    "lora|ia3": "attn.v, mlp.down: gate(lora(r=4) | ia3)",
    "adapter": "mlp: gate(adapter(pfeiffer))",
    "parallel": "mlp: gate(adapter(parallel))",
    "prefix": "attn: gate(prefix_tuning(5))",
    "prefix+sinks": "attn.*: window(8, sinks=2)\nattn: gate(prefix_tuning(4))",  # the prefix in a sink frame
    "drop": "layers: gate(adapter(houlsby)) + adapter_drop(layers=1)",
    "qlora": "mlp.down: quantize(nf4) + gate(lora(r=2) | ia3)",
}


@pytest.mark.parametrize("arch, which", [(a, w) for a in ("llama", "qwen2") for w in SPECS]
                         + [("bert", w) for w in ("lora", "lora|ia3", "adapter", "parallel")]
                         + [("gpt2", "prefix")])  # learned positions: gate 0 keeps the stream numbered after P
def test_gate_obligations_hold(arch, which):
    report = surgery.compile(tiny(arch), SPECS[which]).report
    assert report.ok, report.text()
    rows = gate_rows(report)
    assert set(rows) == GATE_OBLIGATIONS and all(math.isfinite(m.error) for m in rows.values())


def test_a_prefix_gate_is_refused_where_prefix_tuning_is():
    assert "attends in both directions" in errors("attn: gate(prefix_tuning(5))", tiny("bert"))[0]


def test_a_gate_that_ignores_its_input_fails_the_formula(monkeypatch):
    """A bug: the gate is constant ½ (never reads z). Fixed gates still agree; the formula does not."""
    def constant(self, z):
        return torch.full((*z.shape[:-1], 1), 0.5 if self.fixed is None else self.fixed, dtype=z.dtype)

    for arch, spec in (("llama", SPECS["lora"]), ("bert", SPECS["adapter"]), ("qwen2", SPECS["prefix"])):
        monkeypatch.setattr(GateNet, "forward", constant)
        monkeypatch.setattr(GateNet, "log", lambda self, z: constant(self, z)[..., 0].float().log())
        failed = {m.obligation for m in verify(surgery.plan(tiny(arch), spec), tiny(arch)).failures}
        assert failed == {"learned gate == its formula by hand at each gated place (rel.)"}, (arch, failed)
        monkeypatch.undo()


def test_a_gate_that_leaks_at_zero_fails_the_zero_obligation(monkeypatch):
    """A bug: a closed gate still lets a hundredth through (as scaling keys by G would for a prefix)."""
    real = GateNet.forward

    def leaky(self, z):
        out = real(self, z)
        return out + 0.01 if self.fixed == 0.0 else out

    monkeypatch.setattr(GateNet, "forward", leaky)
    failed = {m.obligation for m in verify(surgery.plan(tiny("llama"), SPECS["adapter"]),
                                                   tiny("llama")).failures}
    assert failed == {"gate fixed at 0 == the model without the gated steps (rel.)"}


def test_an_ungated_branch_in_a_gate_fails_the_one_obligation(monkeypatch):
    """A bug: the gated linear adds its contribution twice at G = 1 (base counted as a branch)."""
    real = GatedLinear.delta
    monkeypatch.setattr(GatedLinear, "delta", lambda self, x, inner: 2 * real(self, x, inner))
    failed = {m.obligation for m in verify(surgery.plan(tiny("llama"), SPECS["lora"]), tiny("llama")).failures}
    assert "gate fixed at 1 == the ungated composition (rel.)" in failed


# ------------------------------------------------------------------------------------ numbers


def perturb(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_gates_fixed_at_0_and_1_by_hand_on_a_unipelt_model():
    """The three methods gated at once: all gates at 0 is the untouched model (stream numbered after
    the prefix), all at 1 the ungated composition with the same tensors."""
    spec = "attn.q, attn.v: gate(lora(r=4))\nattn: gate(prefix_tuning(5))\nmlp: gate(adapter(pfeiffer))"
    base = tiny("llama")
    gated, plain = copy.deepcopy(base), copy.deepcopy(base)
    surgery.compile(gated, spec, check=False)
    surgery.compile(plain, spec.replace("gate(", "(",), check=False)
    perturb(gated)
    params = {n.replace(".module.", "."): p for n, p in gated.named_parameters()}
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.requires_grad:
                p.copy_(params[name])
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for net in gating.gate_nets(gated):
            net.fixed = 1.0
        assert torch.equal(gated(ids).logits, plain(ids).logits)
        for net in gating.gate_nets(gated):
            net.fixed = 0.0
        untouched = base(ids, position_ids=torch.arange(5, 15)[None].expand(2, -1)).logits
        assert (gated(ids).logits - untouched).abs().max() < 1e-5
        for net in gating.gate_nets(gated):
            net.fixed = None
        learned = gated(ids).logits
    assert (learned - plain(ids).logits).abs().max() > 1e-3 and (learned - untouched).abs().max() > 1e-3


def test_a_gated_prefix_decodes_and_pads_like_the_full_forward():
    """Per-token gates keep prefill + decoding == the full forward and a left-padded row == the row alone."""
    model = tiny("llama")
    surgery.compile(model, SPECS["prefix"], check=False)
    perturb(model, scale=0.5)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, 12):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        padded = model(ids * mask, attention_mask=mask).logits
        assert (padded[0, 4:] - model(ids[:1, 4:]).logits[0]).abs().max() < 1e-5


def test_gates_train_through_every_anchor():
    model = tiny("llama")
    surgery.compile(model, "attn.q, attn.v: gate(lora(r=4))\nattn: gate(prefix_tuning(5))\nmlp: gate(adapter(pfeiffer))")
    perturb(model)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    nets = list(gating.gate_nets(model))
    assert len(nets) == 2 * 2 + 2 + 2  # q and v per layer, a prefix and an adapter per layer
    assert all(net.proj.weight.grad is not None and net.proj.weight.grad.abs().sum() > 0 for net in nets)


# ------------------------------------------------------------------------------------ diff, save, reload


@pytest.mark.parametrize("arch, spec", [("llama", "attn.q, attn.v: gate(lora(r=4))\nattn: gate(prefix_tuning(5))\n"
                                                  "mlp: gate(adapter(pfeiffer))"),
                                        ("bert", "attn.q, attn.v: gate(lora(r=4))\nmlp: gate(adapter(pfeiffer))")])
def test_a_gated_model_diffs_saves_and_reloads_bit_exactly(arch, spec, tmp_path):
    model = tiny(arch)
    result = surgery.compile(model, spec)
    perturb(model, scale=0.3)  # gates and methods as after training
    text = result.diff().text()
    assert "GateNet" in text or "gate" in text
    out = result.save(tmp_path / "out")
    import json

    meta = json.loads((out / "surgery.json").read_text())
    assert meta["peft"] == "not written: PEFT has no gates (gate(…))"
    reloaded = surgery.load(out)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert {n for n, _ in reloaded.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert any(isinstance(m, GatedSublayer) for m in reloaded.modules())
