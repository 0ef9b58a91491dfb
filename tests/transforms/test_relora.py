"""ReLoRA: restarts keep the logits, reset or prune the adapter's optimizer state, and grow the update's rank."""

import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.train import Schedules
from surgery.transforms import relora
from surgery.transforms.lora import LoraAdapter
from surgery.verify import verify


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_obligations_hold(arch):
    model = tiny(arch)
    report = verify(build_plan(parse("attn.*: relora(r=2, restart_every=3, reset=0.9)"), model), model)
    assert report.ok, report.text()
    assert {m.obligation for m in report.measurements} >= {
        "merge-and-restart leaves the logits unchanged (B perturbed), relative",
        "a restart resets the adapter's optimizer state to the declared fraction"}


def test_restart_obligation_fails_when_the_scale_is_forgotten(monkeypatch):
    real = relora.restart

    def unscaled(layers, optimizer, reset, restarts):
        for _, layer in layers:
            layer.adapter.scaling = 1.0  # the merge then adds B A, not s · B A
        real(layers, optimizer, reset, restarts)

    monkeypatch.setattr(relora, "restart", unscaled)
    model = tiny("llama")
    report = verify(build_plan(parse("attn.q: relora(r=2, alpha=8, restart_every=3)"), model), model)
    assert [m.obligation for m in report.failures] == [
        "merge-and-restart leaves the logits unchanged (B perturbed), relative"]


def test_state_obligation_fails_when_nothing_is_pruned(monkeypatch):
    monkeypatch.setattr(relora, "prune_state", lambda optimizer, params, reset: None)
    model = tiny("llama")
    report = verify(build_plan(parse("attn.q: relora(r=2, restart_every=3, reset=0.5)"), model), model)
    failed = {m.obligation: m.error for m in report.failures}
    assert failed == {"a restart resets the adapter's optimizer state to the declared fraction": 0.5}


def test_pruning_zeroes_the_smallest_fraction():
    param = torch.nn.Parameter(torch.zeros(1000))
    optimizer = torch.optim.AdamW([param])
    values = torch.randperm(1000).float() + 1  # 1..1000, shuffled
    optimizer.state[param] = {"step": torch.tensor(7.0), "exp_avg": values.clone(), "exp_avg_sq": -values.clone()}
    relora.prune_state(optimizer, [param], 0.99)
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq"):
        kept = state[key][state[key] != 0].abs().sort().values
        assert kept.tolist() == [float(v) for v in range(991, 1001)]  # the 10 largest magnitudes survive
    assert state["step"].item() == 7.0  # Adam's step count is kept
    relora.prune_state(optimizer, [param], 1.0)
    assert state["exp_avg"].count_nonzero() == 0 and state["exp_avg_sq"].count_nonzero() == 0


def _train(model, spec, steps, seed=0, optimizer_cls=torch.optim.AdamW):
    result = surgery.compile(model, spec, check=False)
    schedules = Schedules(result)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return result, schedules, optimizer, batch


def test_restarts_keep_logits_reset_state_and_rewarm_the_learning_rate():
    model = tiny("llama")
    result, schedules, optimizer, batch = _train(model, "attn.q, attn.v: relora(r=2, restart_every=3, warmup=2)", 7)
    rates, gaps, zeroed = [], [], []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    optimizer.step = recording_step
    adapter_params = [p for m in model.modules() if isinstance(m, LoraAdapter) for p in m.parameters()]
    model.train()
    for _ in range(7):
        loss = schedules.loss({"input_ids": batch}, model(input_ids=batch, labels=batch))
        loss.backward()
        schedules.before_optimizer_step(optimizer)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            before = model(batch).logits
        restarting = schedules.step % 3 == 2
        schedules.after_optimizer_step(optimizer)
        with torch.no_grad():
            after = model(batch).logits
        model.train()
        if restarting:
            gaps.append((after - before).abs().max().item() / before.abs().max().item())
            zeroed.append(all(v.count_nonzero() == 0 for p in adapter_params
                              for v in optimizer.state[p].values() if v.dim() > 0))
        optimizer.zero_grad()
        assert optimizer.param_groups[0]["lr"] == 1e-2  # the scale is taken off after each step
    # Restarts after steps 2 and 5; the two steps after each are scaled 1/3 and 2/3 (warm-up 2).
    assert rates == pytest.approx([1e-2, 1e-2, 1e-2, 1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2 / 3])
    assert len(gaps) == 2 and max(gaps) < 1e-5
    assert zeroed == [True, True]
    assert schedules.state_dict() == {"step": 7, "steps": {"0": {"restarts": 2, "last_restart": 5}}}


def test_the_accumulated_update_outgrows_rank_r():
    model = tiny("llama")
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result, schedules, optimizer, batch = _train(model, "attn.q: relora(r=1, restart_every=2)", 6)
    model.train()
    for _ in range(6):
        model(input_ids=batch, labels=batch).loss.backward()
        schedules.optimizer_step(optimizer)
        optimizer.zero_grad()
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.adapter.lora_B.weight) == 0  # restarted after the last step
    delta = layer.base.weight.detach() - original
    assert torch.linalg.matrix_rank(delta).item() == 3  # three restarts of a rank-1 update


def test_a_composition_is_refused():
    model = tiny("llama")
    result = surgery.compile(model, "attn.q: relora(r=2, restart_every=3) | lora(r=2)", check=False)
    with pytest.raises(SurgeryError, match="only adapter"):
        Schedules(result)
