"""IA³: obligations on three architectures, the design-card composition, and PEFT as the oracle."""

import copy

import pytest
import torch
import torch.nn.functional as F

from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.layers import SurgeryLinear, linear_weight
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.ia3 import IA3, IA3Adapter
from surgery.transforms.lora import LoraAdapter, LoraParams
from surgery.verify import verify

EVERYWHERE = "attn.*: ia3; mlp.*: ia3"


def plan_for(text, model):
    return build_plan(parse(text), model)


def perturb(model, seed=0):
    """Draw every IA³ vector around 1 and every LoRA B from N(0, 1), so each branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Adapter):
                m.ia3_l.copy_(1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g))
            elif isinstance(m, LoraAdapter):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_obligations_hold_on_keys_values_and_ffn(arch):
    model = tiny(arch)
    plan = plan_for(EVERYWHERE, model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 8  # two steps × four obligations, all of them measured
    for m in report.measurements:
        assert m.error <= m.tol


def test_obligations_hold_on_gpt2_conv1d_down_projection():
    model = tiny("gpt2")
    plan = plan_for("mlp.*: ia3", model)
    assert [(t.path, t.option) for t in plan.steps[0].targets] == [
        ("transformer.h.0.mlp.c_proj", "in"), ("transformer.h.1.mlp.c_proj", "in")]
    report = verify(plan, model)
    assert report.ok, report.text()


@pytest.mark.parametrize("text, roles", [
    ("attn.*: ia3", {("attn.k", "out"), ("attn.v", "out")}),
    ("mlp.*: ia3", {("mlp.down", "in")}),
    ("layers[0]: ia3", {("attn.k", "out"), ("attn.v", "out"), ("mlp.down", "in")}),
])
def test_selection_picks_keys_values_and_the_down_projection(text, roles):
    plan = plan_for(text, tiny("llama"))
    assert {(t.role, t.option) for t in plan.steps[0].targets} == roles


def test_query_projection_is_a_spec_error_naming_where_ia3_attaches():
    with pytest.raises(SpecError) as e:
        plan_for("attn.q: ia3", tiny("llama"))
    message = str(e.value)
    assert "ia3 finds no anchor in attn.q" in message
    assert message.endswith("it attaches to linear anchors, e.g. attn.k, attn.v, mlp.down")


def test_only_the_vectors_train_and_they_scale_as_the_paper_says():
    # qwen2's k/v projections have biases: the output-side vector must scale the bias too (as PEFT does).
    model = tiny("qwen2")
    original = copy.deepcopy(model)
    apply_plan(plan_for(EVERYWHERE, model), model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".adapter.ia3_l") for n in trainable)
    assert len(trainable) == 6  # k, v, down in each of two layers
    perturb(model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    for i in range(2):
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            layer = model.get_submodule(f"model.layers.{i}.{name}")
            w, b = linear_weight(original.get_submodule(f"model.layers.{i}.{name}"))
            expected = (x @ w.T + b) * layer.adapter.ia3_l
            assert (layer(x) - expected).abs().max().item() <= 1e-6
        layer = model.get_submodule(f"model.layers.{i}.mlp.down_proj")
        w, _ = linear_weight(original.get_submodule(f"model.layers.{i}.mlp.down_proj"))
        expected = (h * layer.adapter.ia3_l) @ w.T
        assert (layer(h) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_design_card_composition_verifies_and_sums_the_deltas(arch):
    model = tiny(arch)
    plan = plan_for("mlp.down: lora(r=16) | ia3", model)
    report = verify(plan, model)
    assert report.ok, report.text()

    surgered = copy.deepcopy(model)
    apply_plan(plan, surgered)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(surgered, ids) - logits(model, ids)).abs().max().item() <= 1e-6

    perturb(surgered)
    for t in plan.steps[0].targets:
        layer = surgered.get_submodule(t.path)
        assert isinstance(layer, SurgeryLinear)
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
        lora, ia3 = layer.adapter  # Parallel(lora, ia3), in the order the spec wrote them
        w, b = linear_weight(model.get_submodule(t.path))
        base = F.linear(x, w, b)
        d_lora = lora.scaling * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
        d_ia3 = F.linear(x * ia3.ia3_l, w) - F.linear(x, w)  # scaling the input leaves the bias out
        assert d_lora.abs().max() > 1e-2 and d_ia3.abs().max() > 1e-2  # both branches really contribute
        with torch.no_grad():
            got = layer(x)
        assert (got - (base + d_lora + d_ia3)).abs().max().item() <= 1e-5
        # ... and the folded weights compute the same sum.
        with torch.no_grad():
            layer.merge()
            merged = layer(x)
            layer.unmerge()
        assert (merged - got).abs().max().item() / max(1.0, got.abs().max().item()) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: k/v biases, which PEFT scales too
def test_matches_peft_ia3_with_the_same_vectors(arch):
    import peft
    model = tiny(arch)
    ours = copy.deepcopy(model)
    plan = plan_for(EVERYWHERE, ours)
    apply_plan(plan, ours)
    perturb(ours, seed=7)

    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    copied = 0
    with torch.no_grad():
        for path, layer in ours.named_modules():
            if isinstance(layer, SurgeryLinear):
                target = theirs.base_model.model.get_submodule(path)
                l_theirs = target.ia3_l["default"]  # [out, 1] for keys/values, [1, in] for the FFN
                l_theirs.copy_(layer.adapter.ia3_l.view_as(l_theirs))
                copied += 1
    assert copied == 6
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(theirs, ids)
    assert (logits(ours, ids) - ref).abs().max().item() <= 1e-5
    assert (ref - logits(model, ids)).abs().max().item() > 1e-2  # the vectors really changed the model


def test_peft_config_builds_the_same_adapter_in_peft():
    import peft
    model = tiny("llama")
    plan = plan_for(EVERYWHERE, model)
    fields = {}
    for step in plan.steps:
        for key, value in IA3().peft(step.params, step.targets).items():
            fields[key] = sorted({*fields.get(key, []), *value}) if isinstance(value, list) else value
    assert fields["peft_type"] == "IA3"
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**fields))
    wrapped = {n: m.is_feedforward for n, m in theirs.base_model.model.named_modules() if hasattr(m, "ia3_l")}
    expected = {t.path: t.option == "in" for s in plan.steps for t in s.targets}
    assert wrapped == expected


def test_obligations_catch_a_wrong_transform(monkeypatch):
    model = tiny("qwen2")  # k/v biases make a merge that forgets to scale the bias wrong
    plan = plan_for("attn.k: ia3", model)
    monkeypatch.setattr(IA3Adapter, "merge", lambda self, w, b: (w * self.ia3_l.detach()[:, None], b))
    failed = {m.obligation for m in verify(plan, model).failures}
    assert failed == {"merged == unmerged (vectors perturbed), relative"}

    monkeypatch.undo()
    original_init = IA3Adapter.__init__

    def off_by_a_little(self, *args):
        original_init(self, *args)
        self.ia3_l.data.fill_(1.001)

    monkeypatch.setattr(IA3Adapter, "__init__", off_by_a_little)
    failed = {m.obligation for m in verify(plan, model).failures}
    assert {"identity at init: layer output unchanged", "identity at init: model logits unchanged"} <= failed


def test_lora_and_ia3_export_no_casts_that_change_nothing():
    """A same-dtype ``.to`` is nothing in eager but two nodes under torch.export (cast + metadata check),
    traced by every graph capture; the branches cast only where dtypes differ, and still do there."""
    model = tiny("llama")
    apply_plan(plan_for("mlp.down: lora(r=4) | ia3", model), model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    graph = torch.export.export(layer, (x,), strict=False).graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if op.startswith(("aten.to", "aten._assert_tensor_metadata"))], ops
    assert ops.count("aten.linear.default") == 4   # base, lora_A, lora_B, base on the IA3-scaled input

    lora = LoraAdapter(8, 4, LoraParams(r=2), torch.float32, torch.device("cpu"))
    half = torch.randn(3, 8).to(torch.bfloat16)
    assert lora.delta(half, None).dtype == torch.bfloat16
    scaled = IA3Adapter("in", 8, torch.float32, torch.device("cpu"))
    assert scaled(half, lambda z: z).dtype == torch.bfloat16
    out = IA3Adapter("out", 8, torch.float32, torch.device("cpu"))
    assert out(half, lambda z: z).dtype == torch.bfloat16
