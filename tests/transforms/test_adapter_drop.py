"""AdapterDrop: the lowest layers' adapters are not built (layers=), or dropped at random per training
step (p=); the obligations on Llama and BERT and SmolLM2, the drops' rate, seed and resumption."""

import copy
import json

import pytest
import torch

import surgery
from surgery.apply import apply_plan
from surgery.errors import SpecErrors
from surgery.models import load_model, tiny
from surgery.train import Schedules, load
from surgery.transforms.adapter import BottleneckAdapter
from surgery.transforms.adapter_drop import AdapterDrop, RandomDrop, RandomDropSchedule
from surgery.verify import verify
from tests.helpers import draw_adapters, logits, plan_for, spec_error

OBLIGATION = "perturbed: equals the model built without the dropped layers' adapters"
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


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
    (error,) = spec_error(spec, tiny("llama"), SpecErrors).errors  # once, though it is wrong at every block it selects
    assert message in error.message and error.span.column == column


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


# ---------------------------------------------------------------- p=: random drops while training

RANDOM_EVAL = "p=: in eval mode equals the model with every adapter"


def perturbed(model):
    return draw_adapters(model, 1, ("up.weight", "up.bias"))


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("spec", [
    "layers: adapter(houlsby) + adapter_drop(p=0.5)",
    "layers: adapter(houlsby); mlp: adapter_drop(p=0.25, seed=3)",  # a later rule; attention keeps its adapters
])
def test_random_drop_obligations_hold(arch, spec):
    model = tiny(arch, num_hidden_layers=3)
    report = verify(plan_for(spec, model), model)
    assert report.ok, report.text()
    assert {OBLIGATION, RANDOM_EVAL} <= {m.obligation for m in report.measurements}


def test_eval_keeps_every_adapter_and_training_drops_the_steps_layers():
    base = tiny("llama", num_hidden_layers=4)
    full = perturbed(surgery.compile(copy.deepcopy(base), "layers: adapter(houlsby)").model)
    result = surgery.compile(copy.deepcopy(base), "layers: adapter(houlsby) + adapter_drop(p=0.5, seed=7)")
    model = perturbed(result.model)
    schedules = Schedules(result)
    assert torch.equal(logits(model, IDS), logits(full, IDS))  # eval: nothing dropped
    (schedule,) = schedules.hooks.values()
    seen = set()
    for step in range(6):
        dropped = schedule.drops(step)
        seen.add(frozenset(dropped))
        reference = surgery.compile(copy.deepcopy(base), "layers: adapter(houlsby) + adapter_drop(layers="
                                    f"{sorted(dropped)})").model if dropped else copy.deepcopy(full)
        reference.load_state_dict({k: v for k, v in full.state_dict().items() if k in reference.state_dict()})
        model.train()
        with torch.no_grad():
            trained = model(input_ids=IDS).logits  # tiny Llama has no dropout: training mode is deterministic
        model.eval()
        assert torch.equal(trained, logits(reference, IDS)), (step, dropped)
        schedules.after_optimizer_step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert len(seen) > 2  # the drops change from step to step


def test_the_drops_follow_p_and_the_seed():
    model = tiny("llama", num_hidden_layers=8)
    result = surgery.compile(model, "layers: adapter(pfeiffer) + adapter_drop(p=0.3, seed=1)")
    (schedule,) = Schedules(result).hooks.values()
    draws = [schedule.drops(t) for t in range(2000)]
    rate = sum(len(d) for d in draws) / (2000 * 8)
    assert abs(rate - 0.3) < 3 * (0.3 * 0.7 / 16000) ** 0.5  # within three standard deviations
    per_layer = [sum(layer in d for d in draws) / 2000 for layer in range(8)]
    assert max(abs(r - 0.3) for r in per_layer) < 0.05  # every layer, not only on average
    again = Schedules(surgery.compile(tiny("llama", num_hidden_layers=8),
                                      "layers: adapter(pfeiffer) + adapter_drop(p=0.3, seed=1)"))
    other = Schedules(surgery.compile(tiny("llama", num_hidden_layers=8),
                                      "layers: adapter(pfeiffer) + adapter_drop(p=0.3, seed=2)"))
    assert [next(iter(again.hooks.values())).drops(t) for t in range(50)] == draws[:50]
    assert [next(iter(other.hooks.values())).drops(t) for t in range(50)] != draws[:50]


def test_a_step_never_drops_every_layer():
    result = surgery.compile(tiny("llama", num_hidden_layers=2), "layers: adapter(pfeiffer) + adapter_drop(p=0.9)")
    (schedule,) = Schedules(result).hooks.values()
    draws = [schedule.drops(t) for t in range(500)]
    assert max(len(d) for d in draws) == 1 and sum(len(d) for d in draws) > 400  # 0.81 of steps would drop both


def _train(result, schedules, steps, seed=0):
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD([p for p in result.model.parameters() if p.requires_grad], lr=0.1)
    drops = []
    result.model.train()
    for _ in range(steps):
        drops.append({m.layer for m in result.model.modules() if isinstance(m, RandomDrop) and m.dropped})
        schedules.loss({"input_ids": batch}, result.model(input_ids=batch, labels=batch)).backward()
        schedules.optimizer_step(optimizer)
        optimizer.zero_grad()
    result.model.eval()
    return drops


def test_a_resumed_run_drops_as_the_uninterrupted_one(tmp_path):
    spec = "layers: adapter(houlsby) + adapter_drop(p=0.5)"
    straight = surgery.compile(tiny("llama", num_hidden_layers=4), spec)
    expected = _train(straight, Schedules(straight), 8)
    first = surgery.compile(tiny("llama", num_hidden_layers=4), spec)
    drops = _train(first, Schedules(first), 5)
    first.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["schedules"] == {
        "step": 5, "steps": {"1": {"step": 5}}}
    resumed = load(tmp_path / "out")
    drops += _train(resumed, resumed.schedules, 3, seed=0)
    assert drops == expected and len({frozenset(d) for d in drops}) > 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_random_drop_obligations_fail_on_realistic_bugs(monkeypatch):
    model = tiny("llama", num_hidden_layers=3)
    plan = plan_for("layers: adapter(houlsby) + adapter_drop(p=0.5)", model)
    # Dropping in eval mode too: the model at inference is not the one with every adapter.
    monkeypatch.setattr(RandomDrop, "forward", lambda self, x, h: h if self.dropped else self.inner(x, h))
    assert [m.obligation for m in verify(plan, model).failures] == [RANDOM_EVAL]
    monkeypatch.undo()
    # The schedule marking the layers it keeps instead of those it drops.
    drops = RandomDropSchedule.drops
    monkeypatch.setattr(RandomDropSchedule, "_set", lambda self: [
        setattr(m, "dropped", layer not in drops(self, self.step)) for layer, ms in self.modules.items() for m in ms])
    assert [m.obligation for m in verify(plan, model).failures] == [OBLIGATION]


@pytest.mark.parametrize("spec, message", [
    ("layers: adapter_drop(0)", "the number of lowest layers to drop is at least 1"),
    ("layers: adapter_drop([1, 1])", "a list of distinct layer numbers"),
    ("layers: adapter_drop(true)", "adapter_drop() argument 'layers'"),
    ("layers: adapter + adapter_drop([7])", "adapter_drop finds no anchor in layers"),
    ("layers: adapter + adapter_drop(2, p=0.5)", "adapter_drop() takes layers=… (always dropped) or p=… "
     "(at random while training), one of them"),
    ("layers: adapter + adapter_drop(seed=1)", "one of them"),
    ("layers: adapter + adapter_drop(1, seed=1)", "seed= goes with p=…"),
    ("layers: adapter + adapter_drop(p=0)", "adapter_drop() argument 'p': Input should be greater than 0"),
    ("layers: adapter + adapter_drop(p=1.0)", "adapter_drop() argument 'p': Input should be less than 1"),
])
def test_bad_layers_or_p_are_spec_errors(spec, message):
    assert message in str(spec_error(spec, tiny("llama"), SpecErrors))
