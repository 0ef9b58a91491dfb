"""Bottleneck adapters: obligations on a Llama-like decoder, Qwen2, GPT-2 and BERT, the papers'
parameter counts, the adapter math by hand, composition with LoRA, save/load, and SmolLM2."""

import copy

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.anchors.sublayer import composition
from surgery.apply import apply_plan
from surgery.errors import SpecError, SpecErrors
from surgery.layers import SurgeryLinear
from surgery.models import load_model, tiny
from surgery.transforms.adapter import BottleneckAdapter
from surgery.verify import verify
from tests.helpers import draw_adapters, logits, plan_for, spec_error

OBLIGATIONS = {"identity at init: model logits unchanged", "parameters per adapter == 2·d·m + m + d",
               "perturbed: logits == the original with h replaced by the formula at each sublayer, relative"}


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("spec", ["layers: adapter(houlsby)", "mlp: adapter(pfeiffer)",
                                  "attn, mlp: adapter(parallel, reduction=4, act=gelu, scaling=2.0)"])
def test_obligations_hold(arch, spec):
    model = tiny(arch)
    report = verify(plan_for(spec, model), model)
    assert report.ok, report.text()
    assert {m.obligation for m in report.measurements} == OBLIGATIONS


@pytest.mark.parametrize("arch, where", [
    ("llama", ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
    ("gpt2", ["transformer.h.{i}.attn", "transformer.h.{i}.mlp"]),
    # BERT is post-LN: the adapters sit after each block's output dropout, before the residual LayerNorm.
    ("bert", ["bert.encoder.layer.{i}.attention.output.dropout", "bert.encoder.layer.{i}.output.dropout"]),
])
def test_houlsby_is_two_adapters_per_layer_pfeiffer_one_after_the_ffn(arch, where):
    model = tiny(arch)
    houlsby = plan_for("layers: adapter(houlsby)", model).steps[0].targets
    assert [t.path for t in houlsby] == [w.format(i=i) for i in range(2) for w in where]
    assert [t.role for t in houlsby] == ["attn", "mlp"] * 2
    pfeiffer = plan_for("*: adapter(pfeiffer)", model).steps[0].targets
    assert [t.path for t in pfeiffer] == [where[1].format(i=i) for i in range(2)]
    assert [t.path for t in plan_for("layers[1].attn: adapter(parallel)", model).steps[0].targets] == [
        where[0].format(i=1)]


def test_pfeiffer_on_attention_names_where_it_attaches():
    assert str(spec_error("attn: adapter(pfeiffer)", tiny("llama"), SpecErrors)).endswith("adapter finds no anchor in attn; it attaches to sublayer anchors, e.g. mlp")
    with pytest.raises(SpecErrors, match="adapter finds no anchor in mlp.down; it attaches to sublayer anchors"):
        plan_for("mlp.down: adapter", tiny("llama"))


@pytest.mark.parametrize("arch, hidden", [("llama", 64), ("bert", 64)])
@pytest.mark.parametrize("reduction, bottleneck", [(16, 4), (4, 16), (3, 21)])
def test_parameter_count_is_the_papers_formula(arch, hidden, reduction, bottleneck):
    model = tiny(arch)
    result = surgery.compile(model, f"layers: adapter(houlsby, reduction={reduction})")
    per_adapter = 2 * hidden * bottleneck + bottleneck + hidden
    assert result.plan.counts.added == 4 * per_adapter  # two layers, two adapters each
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 4 * per_adapter
    assert all(".surgery_sublayer." in n for n in trainable)  # the base is frozen


def test_plan_counts_on_the_meta_device_match():
    plan = surgery.plan(tiny("llama"), "mlp: adapter(pfeiffer)")
    assert plan.counts.added == 2 * (2 * 64 * 4 + 4 + 64)


def test_a_reduction_beyond_the_width_is_an_error():
    with pytest.raises(SpecError, match=r"leaves no bottleneck on a model of width 64 .*use reduction ≤ 64"):
        apply_plan(plan_for("mlp: adapter(reduction=65)", tiny("llama")), tiny("llama"))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("kind, reads", [("houlsby", "h"), ("parallel", "x")])
def test_each_kind_computes_its_papers_formula(arch, kind, reads):
    model = tiny(arch)
    surgered = copy.deepcopy(model)
    plan = plan_for(f"layers[1].mlp: adapter({kind}, scaling=0.5, act=tanh)", surgered)
    apply_plan(plan, surgered)
    draw_adapters(surgered, 0)
    (target,) = plan.steps[0].targets
    adapter = composition(surgered, target)
    # The sublayer's input x and output h, captured from the untouched model.
    source = "model.layers.1.mlp" if arch == "llama" else "bert.encoder.layer.1.intermediate"
    sink = "model.layers.1.mlp" if arch == "llama" else "bert.encoder.layer.1.output.dropout"
    seen = {}
    h1 = model.get_submodule(source).register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    h2 = model.get_submodule(sink).register_forward_hook(lambda m, a, o: seen.update(h=o))
    logits(model, IDS)
    h1.remove()
    h2.remove()
    z = seen[reads]
    f = torch.tanh(z @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    with torch.no_grad():
        got = adapter(seen["x"], seen["h"])
    assert f.abs().max() > 1e-2
    assert (got - (seen["h"] + 0.5 * f)).abs().max().item() <= 1e-6
    assert (logits(surgered, IDS) - logits(model, IDS)).abs().max().item() > 1e-3


def test_obligations_catch_a_wrong_adapter(monkeypatch):
    model = tiny("llama")
    plan = plan_for("attn, mlp: adapter(parallel)", model)
    # A parallel adapter that reads the sublayer's output instead of its input.
    monkeypatch.setattr(BottleneckAdapter, "delta", lambda self, x, h: (
        self.up(self.act(self.down(h))) * self.scaling))
    assert {m.obligation for m in verify(plan, model).failures} == {
        "perturbed: logits == the original with h replaced by the formula at each sublayer, relative"}
    monkeypatch.undo()

    original_init = BottleneckAdapter.__init__

    def up_not_zero(self, *args):
        original_init(self, *args)
        self.up.bias.data.fill_(1e-3)

    monkeypatch.setattr(BottleneckAdapter, "__init__", up_not_zero)
    assert {m.obligation for m in verify(plan, model).failures} == {"identity at init: model logits unchanged"}
    monkeypatch.undo()

    def no_bias(self, *args):
        original_init(self, *args)
        self.up.bias = None

    monkeypatch.setattr(BottleneckAdapter, "__init__", no_bias)
    assert "parameters per adapter == 2·d·m + m + d" in {m.obligation for m in verify(plan, model).failures}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_composes_with_lora_in_one_spec_and_saves_and_loads(arch, tmp_path):
    model = tiny(arch)
    original = copy.deepcopy(model)
    result = surgery.compile(model, "layers: adapter(houlsby) + lora(r=4); mlp.down: ia3")
    assert result.report.ok, result.report.text()
    assert {s.transform for s in result.plan.steps} == {"adapter", "lora", "ia3"}
    wrapped = [p for p, m in model.named_modules() if isinstance(m, SurgeryLinear)]
    assert len(wrapped) == (2 * 7 if arch == "llama" else 2 * 6)  # every linear layer of the layers
    draw_adapters(model, 0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.1)
    before = logits(model, IDS)
    assert (before - logits(original, IDS)).abs().max().item() > 1e-2
    assert len([m for m in model.modules() if isinstance(m, BottleneckAdapter)]) == 4
    out = result.save(tmp_path / "out")
    loaded = surgery.load(out)
    assert torch.equal(logits(loaded, IDS), before)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_adapter_sees_the_lora_adapted_output():
    """In BERT a LoRA on attn.o changes the attention block's output; the adapter after it must see that."""
    model = tiny("bert")
    surgered = copy.deepcopy(model)
    plan = plan_for("layers[0]: adapter(houlsby) + lora(r=2)", surgered)
    apply_plan(plan, surgered)
    draw_adapters(surgered, 0)
    dense = surgered.get_submodule("bert.encoder.layer.0.attention.output.dense")
    with torch.no_grad():
        dense.adapter.lora_B.weight.normal_(0, 0.1)
    target = plan.steps[0].targets[0]
    adapter = composition(surgered, target)
    seen = {}
    hook = dense.register_forward_hook(lambda m, a, o: seen.update(h=o))
    after = surgered.get_submodule(target.path).register_forward_hook(lambda m, a, o: seen.update(out=o))
    logits(surgered, IDS)
    hook.remove()
    after.remove()
    h = seen["h"]  # the LoRA-adapted projection (dropout is off in eval)
    f = F.silu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    assert (seen["out"] - (h + f)).abs().max().item() <= 1e-6


def test_deep_copies_and_training_mode_use_their_own_adapters():
    model = tiny("llama")
    apply_plan(plan_for("layers: adapter(parallel)", model), model)
    draw_adapters(model, 0)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, IDS), logits(model, IDS))
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.bias.zero_()
                m.up.weight.zero_()
    assert torch.equal(logits(twin, IDS), logits(tiny("llama"), IDS))
    assert not torch.equal(logits(model, IDS), logits(tiny("llama"), IDS))
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_smollm2_verifies_saves_and_loads(smollm2_dir, tmp_path):
    base = load_model(smollm2_dir)
    result = surgery.compile(base, "layers[0:4]: adapter(houlsby); layers[-2:].mlp: adapter(parallel)")
    assert result.report.ok, result.report.text()
    assert {m.obligation for m in result.report.measurements} == OBLIGATIONS
    d, m = 576, 36
    assert result.plan.counts.added == 8 * (2 * d * m + m + d) + 2 * (2 * d * (d // 2) + d // 2 + d)
    draw_adapters(base, 0)
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    before = logits(base, ids)
    loaded = surgery.load(result.save(tmp_path / "out"))
    assert torch.equal(logits(loaded, ids), before)


def test_a_block_whose_projections_are_quantized_gets_a_float_adapter():
    # Llama's attention has no biases: once q/k/v/o are 4-bit the block holds no float parameter, so
    # the adapter must take its dtype before (the linear layers are replaced after every step's add).
    model = tiny("llama")
    result = surgery.compile(model, "layers[0].attn.*: quantize(nf4); layers[0]: adapter(houlsby)")
    assert result.report.ok, result.report.text()
    adapter = model.get_submodule("model.layers.0.self_attn.surgery_sublayer.adapter")
    assert adapter.down.weight.dtype == torch.float32
