"""AdapterDrop: the lowest layers' adapters are not built; the obligation on Llama and BERT and SmolLM2."""

import copy

import pytest
import torch

import surgery
from surgery.apply import apply_plan
from surgery.errors import SpecErrors
from surgery.models import load_model, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.adapter import BottleneckAdapter
from surgery.transforms.adapter_drop import AdapterDrop
from surgery.verify import verify

OBLIGATION = "perturbed: equals the model built without the dropped layers' adapters"
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def plan_for(text, model):
    return build_plan(parse(text), model)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def adapters(model):
    return sorted(n.partition(".surgery_sublayer")[0] for n, m in model.named_modules()
                  if isinstance(m, BottleneckAdapter))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("spec", [
    "layers: adapter(houlsby) + adapter_drop(layers=1)",        # one rule: drop follows the adapter
    "layers: adapter(houlsby); attn, mlp: adapter_drop([1])",   # a later rule, an explicit list
    "mlp: adapter(parallel); layers[0]: adapter_drop(2)",        # only layer 0 is selected
])
def test_obligation_holds(arch, spec):
    model = tiny(arch, num_hidden_layers=3)
    report = verify(plan_for(spec, model), model)
    assert report.ok, report.text()
    assert OBLIGATION in {m.obligation for m in report.measurements}


@pytest.mark.parametrize("layers, kept", [("2", [2, 3]), ("[0, 2]", [1, 3]), ("[3]", [0, 1, 2])])
def test_the_given_layers_have_no_adapter_and_the_rest_are_untouched(layers, kept):
    model = tiny("llama", num_hidden_layers=4)
    full = copy.deepcopy(model)
    apply_plan(plan_for("layers: adapter(houlsby)", full), full)
    dropped = copy.deepcopy(model)
    result = surgery.compile(dropped, f"layers: adapter(houlsby) + adapter_drop(layers={layers})")
    assert adapters(dropped) == [f"model.layers.{i}.{s}" for i in kept for s in ("mlp", "self_attn")]
    assert result.plan.counts.added == len(kept) * 2 * (2 * 64 * 4 + 4 + 64)
    # Same seeds: the kept adapters are the very ones the full plan built.
    state = full.state_dict()
    for key, value in dropped.state_dict().items():
        assert torch.equal(value, state[key])
    # Layers without adapters compute the base model's layer exactly.
    hidden = {}
    for name, m in (("dropped", dropped), ("base", model)):
        m.get_submodule(f"model.layers.{min(kept) - 1}" if min(kept) else "model.embed_tokens").register_forward_hook(
            lambda mod, a, o, name=name: hidden.update({name: o[0] if isinstance(o, tuple) else o}))
    logits(dropped, IDS)
    logits(model, IDS)
    assert torch.equal(hidden["dropped"], hidden["base"])


def test_obligation_fails_when_the_wrong_layers_are_dropped(monkeypatch):
    model = tiny("llama", num_hidden_layers=3)
    # The plan says layers 0 and 1 are dropped; the installed model drops layer 0 only.
    monkeypatch.setattr(AdapterDrop, "accepts", lambda self, p, target, module: target.layer <= 1)
    plan = plan_for("layers: adapter(houlsby) + adapter_drop(layers=1)", model)
    failed = verify(plan, model).failures
    assert [(m.step, m.obligation) for m in failed] == [(1, OBLIGATION)]


def test_obligation_fails_when_nothing_is_dropped(monkeypatch):
    model = tiny("llama", num_hidden_layers=3)
    plan = plan_for("layers: adapter(houlsby) + adapter_drop(layers=1)", model)
    monkeypatch.setattr(AdapterDrop, "drops", lambda self, p, target: False)
    assert [m.obligation for m in verify(plan, model).failures] == [OBLIGATION]


def test_without_adapters_it_drops_nothing_and_says_so():
    # Alone at a block a drop drops nothing there (Pfeiffer has no attention adapter to drop), but a
    # drop with nothing to drop anywhere is a failed obligation that says why.
    model = tiny("llama")
    failed = verify(plan_for("layers: adapter_drop(1)", model), model).failures
    assert len(failed) == 1 and "drops nothing at model.layers.0.mlp, model.layers.0.self_attn" in failed[0].obligation


@pytest.mark.parametrize("spec, column, message", [
    ("mlp: adapter_drop(1) + adapter(pfeiffer)", 6, "adapter_drop drops the adapters before it at a block, "
     "and the adapters come after it; write adapter(…) + adapter_drop(…), or drop in a later rule"),
    ("mlp: adapter(pfeiffer) | adapter_drop(1)", 26, "adapter_drop drops the adapters before it in a sequence, "
     "so it cannot be a branch of '|'; write adapter(…) + adapter_drop(…)"),
    ("mlp: adapter_drop(1); mlp: adapter(pfeiffer)", 6, "and the adapters come after it"),  # rule order counts
])
def test_a_drop_that_cannot_drop_is_a_plan_error_at_its_call(spec, column, message):
    with pytest.raises(SpecErrors) as e:
        plan_for(spec, tiny("llama"))
    (error,) = e.value.errors  # once, though it is wrong at every block it selects
    assert message in error.message and error.span.column == column


@pytest.mark.parametrize("spec, message", [
    ("layers: adapter_drop(0)", "the number of lowest layers to drop is at least 1"),
    ("layers: adapter_drop([1, 1])", "a list of distinct layer numbers"),
    ("layers: adapter_drop(true)", "adapter_drop() argument 'layers'"),
    ("layers: adapter + adapter_drop([7])", "adapter_drop finds no anchor in layers"),
])
def test_bad_layers_are_spec_errors(spec, message):
    with pytest.raises(SpecErrors) as e:
        plan_for(spec, tiny("llama"))
    assert message in str(e.value)


def test_saves_and_loads(tmp_path):
    model = tiny("bert", num_hidden_layers=3)
    result = surgery.compile(model, "layers: adapter(houlsby) + adapter_drop(layers=2)")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(0, 0.1)
    loaded = surgery.load(result.save(tmp_path / "out"))
    assert adapters(loaded) == adapters(model) == [
        "bert.encoder.layer.2.attention.output.dropout", "bert.encoder.layer.2.output.dropout"]
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.slow
def test_smollm2_verifies(smollm2_dir):
    base = load_model(smollm2_dir)
    result = surgery.compile(base, "layers: adapter(houlsby); layers: adapter_drop(layers=24)")
    assert result.report.ok, result.report.text()
    assert len(adapters(base)) == 2 * (30 - 24)
