"""The sublayer anchor: where attention and MLP blocks begin and end, found by role-map data, and how
steps compose there (`+`, `|`) without replacing any of the model's modules."""

import copy
import re

import pytest
import torch
from torch import nn

from surgery import anchors
from surgery.anchors.sublayer import ATTR, SublayerPar, SublayerSeq, composition, locate
from surgery.apply import apply_plan
from surgery.arch import architectures, detect
from surgery.arch.select import RoleIndex, resolve
from surgery.models import TINY_ARCHS, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.adapter import BottleneckAdapter
from surgery.transforms.registry import REGISTRY, Anchor, Params, obligation, transform

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def found(selector, model):
    index = RoleIndex(model, detect(model))
    regions = [resolve(s, index) for s in parse(f"{selector}: x").rules[0].selectors]
    return [(t.path, t.role, t.layer) for t in anchors.kind(Anchor.SUBLAYER).find("x", regions, index)]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_role_map_says_where_attention_and_mlp_begin_and_end(arch):
    model = tiny(arch)
    assert set(detect(model).sublayers) == {"attn", "mlp"}
    targets = found("*", model)
    assert [(role, layer) for _, role, layer in targets] == [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    for path, role, layer in targets:
        source, sink = locate(model, anchors.sublayer.Target(path, role, layer))
        assert sink is model.get_submodule(path)
        assert next(source.parameters(), None) is not None or source is sink


def test_every_architecture_file_has_sublayers_that_are_roles():
    for arch in architectures().values():
        assert set(arch.sublayers) <= set(arch.layer), arch.name


@pytest.mark.parametrize("selector, paths", [
    ("attn", ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    ("attn.*", ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    ("layers[1]", ["model.layers.1.self_attn", "model.layers.1.mlp"]),
    ('"model.layers.0.mlp"', ["model.layers.0.mlp"]),
    ("mlp.down", []),   # a projection is not a block
    ("attn.q", []),
    ("embed", []),
])
def test_selectors_reach_sublayers_through_their_roles(selector, paths):
    assert [p for p, _, _ in found(selector, tiny("llama"))] == paths


def test_bert_blocks_end_before_the_residual_layer_norm():
    assert found("layers[0].attn, layers[0].mlp", tiny("bert")) == [
        ("bert.encoder.layer.0.attention.output.dropout", "attn", 0),
        ("bert.encoder.layer.0.output.dropout", "mlp", 0)]


# A second sublayer transform, for composition: h' = h + b with a learned vector b.
class ShiftParams(Params):
    pass


class Shift(nn.Module):
    def __init__(self, hidden, like):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(hidden, dtype=like.dtype, device=like.device))

    def delta(self, x, h):
        return self.b.expand_as(h)

    def forward(self, x, h):
        return h + self.b


@pytest.fixture
def shift():
    class ShiftTransform:
        def sublayer_adapter(self, p, target, hidden, like):
            return Shift(hidden, like)

        @obligation("none", 0.0)
        def none(self, p, check):
            return 0.0

    transform("shift", params=ShiftParams, anchor=Anchor.SUBLAYER, reference="test")(ShiftTransform)
    yield
    REGISTRY.pop("shift")


def built(spec, arch="llama", seed=0):
    model = tiny(arch)
    plan = build_plan(parse(spec), model)
    apply_plan(plan, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".surgery_sublayer." in name and not name.endswith("down.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, plan


def after_sublayer(model, target):
    """The output of sublayer `target` once every hook on it ran (a hook registered later runs last)."""
    seen = {}
    hook = locate(model, target)[1].register_forward_hook(lambda m, a, o: seen.update(h=o))
    with torch.no_grad():
        model(input_ids=IDS)
    hook.remove()
    return seen["h"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_sequence_and_parallel_compose_at_one_sublayer(shift, arch):
    base = tiny(arch)
    target = build_plan(parse("layers[0].mlp: shift"), base).steps[0].targets[0]
    seen = {}
    source, sink = locate(base, target)
    hooks = [source.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
             sink.register_forward_hook(lambda m, a, o: seen.update(h=o))]
    with torch.no_grad():
        base(input_ids=IDS)
    for hook in hooks:
        hook.remove()
    x, h = seen["x"], seen["h"]

    def f(adapter, z):
        return adapter.up(adapter.act(adapter.down(z)))

    for spec, kind, expect in [
        ("layers[0].mlp: adapter(parallel) + shift", SublayerSeq, lambda a, s: h + 4 * f(a, x) + s.b),
        ("layers[0].mlp: shift + adapter(houlsby)", SublayerSeq, lambda s, a: (h + s.b) + f(a, h + s.b)),
        ("layers[0].mlp: adapter(houlsby) | shift", SublayerPar, lambda a, s: h + f(a, h) + s.b),
    ]:
        model, plan = built(spec, arch)
        tree = composition(model, target)
        assert isinstance(tree, kind) and len(tree) == 2
        got = after_sublayer(model, target)
        with torch.no_grad():
            want = expect(*tree)
        assert (want - h).abs().max() > 1e-2, spec
        assert (got - want).abs().max().item() <= 1e-5, spec


def test_rules_on_one_sublayer_compose_in_rule_order(shift):
    model, plan = built("mlp: adapter(houlsby); layers[0].mlp: shift")
    assert isinstance(composition(model, plan.steps[1].targets[0]), SublayerSeq)
    assert isinstance(composition(model, plan.steps[0].targets[1]), BottleneckAdapter)  # layer 1: alone


def test_the_same_transform_twice_at_a_sublayer_is_a_conflict():
    with pytest.raises(Exception, match=re.escape("adapter is applied twice to model.layers.0.mlp")):
        build_plan(parse("mlp: adapter(houlsby) | adapter(parallel)"), tiny("llama"))


def test_attention_tuple_output_keeps_its_weights_and_keyword_inputs_are_found():
    # Llama calls self_attn(hidden_states=…) by keyword and gets (output, weights) back.
    base = tiny("llama")
    base.set_attn_implementation("eager")  # so that the weights are returned
    model = copy.deepcopy(base)
    apply_plan(build_plan(parse("layers[0].attn: adapter(parallel)"), model), model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.bias.fill_(0.5)
    results = []
    for m in (base, model):
        module = m.get_submodule("model.layers.0.self_attn")
        hook = module.register_forward_hook(lambda m, a, o: results.append(o))  # runs after ours
        with torch.no_grad():
            m(input_ids=IDS, output_attentions=True)
        hook.remove()
    (out0, weights0), (out, weights) = results
    assert weights is not None and torch.equal(weights, weights0)
    assert torch.allclose(out, out0 + 4 * 0.5)  # parallel: h + s·f(x), f(x) = b_up here
    assert module.surgery_sublayer_input.value is None  # the input is let go after the call


def test_no_module_of_the_model_is_replaced_and_rollback_restores_everything():
    model = tiny("gpt2")
    before = {n: m for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    plan = build_plan(parse("layers: adapter(houlsby) + lora(r=2)"), model)
    edit = apply_plan(plan, model)
    after = dict(model.named_modules())
    kept = {n for n in before if not n.startswith("transformer.h.") or ("c_" not in n)}
    assert all(after[n] is before[n] for n in kept)  # only the linear layers LoRA wraps were replaced
    assert sum(hasattr(m, ATTR) for m in after.values()) == 4
    edit.rollback()
    assert dict(model.named_modules()).keys() == before.keys()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
