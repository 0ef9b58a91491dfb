"""AdaLoRA: obligations, PEFT's AdaLoRA as the oracle for the forward, the budget and the masks, export."""

import peft
import pytest
import torch

import surgery
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.train import Schedules, load
from surgery.transforms.adalora import AdaLoraAdapter
from surgery.verify import verify

SPEC = "attn.q, attn.v: adalora(r_init=4, r_target=2, total_step=8, tinit=1, tfinal=2)"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_obligations_hold(arch):
    model = tiny(arch)
    report = verify(build_plan(parse("attn.*: adalora(4, 2, total_step=10)"), model), model)
    assert report.ok, report.text()
    assert "a zeroed singular value equals the truncated-rank update" in {m.obligation for m in report.measurements}


def test_mask_obligation_fails_when_the_forward_ignores_the_singular_values(monkeypatch):
    def unscaled(self, x, inner):
        return ((x @ (self.lora_A * (self.lora_E != 0)).T @ self.lora_B.T) * self.scaling).to(x.dtype)

    monkeypatch.setattr(AdaLoraAdapter, "delta", unscaled)
    model = tiny("llama")
    report = verify(build_plan(parse("attn.q: adalora(4, 2, total_step=10)"), model), model)
    assert {m.obligation for m in report.failures} == {
        "merged == unmerged (singular values perturbed)", "a zeroed singular value equals the truncated-rank update"}


def _peft_twin(model):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, lora_alpha=4,
                                target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny("llama"), config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, AdaLoraAdapter):
                twin = theirs.base_model.model.get_submodule(name.removesuffix(".adapter"))
                for key in ("lora_A", "lora_E", "lora_B"):
                    getattr(twin, key)["default"].copy_(getattr(module, key))
    return theirs


def test_training_equals_peft_adalora_step_by_step():
    ours = tiny("llama")
    result = surgery.compile(ours, SPEC, check=False)
    with torch.no_grad():  # E away from 0, so the update and the importance are not trivial
        for m in ours.modules():
            if isinstance(m, AdaLoraAdapter):
                m.lora_E.normal_(generator=torch.Generator().manual_seed(1))
    theirs = _peft_twin(ours)
    schedules = Schedules(result)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    ours.train(), theirs.train()
    masked = []
    for step in range(8):
        batch = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(step))
        out_ours = ours(input_ids=batch, labels=batch)
        loss_ours = schedules.loss({"input_ids": batch}, out_ours)
        loss_theirs = theirs(input_ids=batch, labels=batch).loss  # PEFT adds the orthogonality term itself
        assert loss_ours.item() == pytest.approx(loss_theirs.item(), rel=1e-5, abs=1e-6), step
        loss_ours.backward(), loss_theirs.backward()
        schedules.optimizer_step(opt_ours)
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad(), opt_theirs.zero_grad()
        e_ours = torch.cat([m.lora_E.detach().view(-1) for m in ours.modules() if isinstance(m, AdaLoraAdapter)])
        e_theirs = torch.cat([m.lora_E["default"].detach().view(-1) for m in theirs.modules()
                              if hasattr(m, "lora_E") and "default" in getattr(m, "lora_E", {})])
        torch.testing.assert_close(e_ours, e_theirs, rtol=1e-4, atol=1e-6)
        masked.append(int((e_ours == 0).sum()))
    # 4 layers × 4 triplets: the budget is 16 to step tinit = 1, then shrinks (cubic: 12, 9, 8 kept)
    # to 4 × r_target = 8, fixed from total_step − tfinal = 6.
    assert masked == [0, 0, 4, 7, 8, 8, 8, 8]


def test_export_loads_in_peft_with_equal_outputs_and_state_reloads(tmp_path):
    model = tiny("llama")
    result = surgery.compile(model, SPEC)
    schedules = Schedules(result)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(4):
        schedules.loss({"input_ids": batch}, model(input_ids=batch, labels=batch)).backward()
        schedules.optimizer_step(optimizer)
        optimizer.zero_grad()
    model.eval()
    assert sum(int((m.lora_E == 0).sum()) for m in model.modules() if isinstance(m, AdaLoraAdapter)) > 0
    out = result.save(tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), str(out / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch).logits, model(batch).logits, rtol=1e-5, atol=1e-5)
    again = load(out)
    saved, reloaded = schedules.state_dict()["steps"]["0"], again.schedules.state_dict()["steps"]["0"]
    assert reloaded["pattern"] == saved["pattern"] and saved["pattern"] is not None
    assert saved["sensitivity"].keys() == reloaded["sensitivity"].keys() and len(saved["sensitivity"]) == 12  # A, E, B of 4 layers
    for key in saved["sensitivity"]:
        assert torch.equal(saved["sensitivity"][key], reloaded["sensitivity"][key])
        assert torch.equal(saved["uncertainty"][key], reloaded["uncertainty"][key])
