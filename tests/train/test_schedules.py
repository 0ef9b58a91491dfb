"""Schedules: the one-call hook, composition with a scheduler, and state saved with the result."""

import json

import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.models import tiny
from surgery.train import Schedules, load

SPEC = "attn.q, attn.v: relora(r=2, restart_every=3, warmup=2)"


def _run(result, schedules, optimizer, steps, seed=0):
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    result.model.train()
    for _ in range(steps):
        schedules.loss({"input_ids": batch}, result.model(input_ids=batch, labels=batch)).backward()
        schedules.optimizer_step(optimizer)
        optimizer.zero_grad()
    result.model.eval()


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)


def test_state_saved_with_the_result_continues_bit_exactly(tmp_path):
    result = surgery.compile(tiny("llama"), SPEC)
    schedules = Schedules(result)
    _run(result, schedules, _sgd(result.model), 4)  # one restart (after step 2), one step into the warm-up
    result.save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert manifest["schedules"] == {"step": 4, "steps": {"0": {"restarts": 1, "last_restart": 2}}}

    again = load(tmp_path / "out")
    assert again.schedules.state_dict() == schedules.state_dict()
    for (name, a), b in zip(result.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    # SGD keeps no state, so the saved result is all a continuation needs: both go on identically,
    # through the re-warm-up and the next restart (after step 5).
    _run(result, schedules, _sgd(result.model), 3, seed=1)
    _run(again, again.schedules, _sgd(again.model), 3, seed=1)
    assert again.schedules.state_dict() == schedules.state_dict() == {
        "step": 7, "steps": {"0": {"restarts": 2, "last_restart": 5}}}
    for (name, a), b in zip(result.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_result_without_schedules_saves_none(tmp_path):
    result = surgery.compile(tiny("llama"), "attn.q: lora(r=2)")
    assert not Schedules(result)
    result.save(tmp_path / "out")
    assert "schedules" not in json.loads((tmp_path / "out" / "surgery.json").read_text())
    with pytest.raises(SurgeryError, match="no training schedule state"):
        load(tmp_path / "out")


def test_the_scale_multiplies_a_schedulers_rate():
    result = surgery.compile(tiny("llama"), SPEC, check=False)
    schedules = Schedules(result)
    rates = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    optimizer = Recording([p for p in result.model.parameters() if p.requires_grad], lr=0.05)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        result.model(input_ids=batch, labels=batch).loss.backward()
        schedules.optimizer_step(optimizer)
        cosine.step()
        optimizer.zero_grad()
    plain = [0.05 * (1 + torch.cos(torch.tensor(torch.pi * t / 8)).item()) / 2 for t in range(5)]
    assert rates == pytest.approx([plain[0], plain[1], plain[2], plain[3] / 3, plain[4] * 2 / 3])


def test_state_for_another_plan_is_refused():
    result = surgery.compile(tiny("llama"), SPEC, check=False)
    with pytest.raises(SurgeryError, match="saved schedule state is for steps"):
        Schedules(result).load_state_dict({"step": 1, "steps": {"3": {}}})
