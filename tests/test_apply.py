"""Apply is transactional: a failure at any step leaves the model exactly as it was."""

import pytest
import torch

import surgery.anchors.linear as linear_anchor
import surgery.apply as apply_mod
from surgery.apply import apply_plan
from surgery.errors import ApplyError, SurgeryError
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse

# Every anchor kind in one plan: linear (lora, ia3, quantize), rotary, attention, embeddings, parameters.
PLANS = {
    "llama": """
        attn.*: lora(r=4) | ia3
        mlp.down: ia3
        attn.*: rope(linear, scale=2) + window(16, sinks=2)
        embed: prompt_tuning(3)
        mlp.up: quantize(nf4) + lora(r=2)
    """,
    "qwen2": """
        model: bitfit
        attn.q, attn.v: lora(r=2)
        attn: window(8)
        mlp.gate: quantize(nf4)
    """,
}


def fingerprint(model):
    """Everything rollback must restore: module objects by path, tensors, flags, hooks, config."""
    return {
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attn": model.config._attn_implementation,
        "attrs": sorted(k for m in model.modules() for k in vars(m) if k.startswith("surgery")),
    }


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before_fp, before_state, ids, before_logits):
    assert fingerprint(model) == before_fp
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before_logits)


@pytest.mark.parametrize("arch", sorted(PLANS))
def test_failure_at_every_step_rolls_back(arch, monkeypatch):
    model = tiny(arch)
    plan = build_plan(parse(PLANS[arch]), model)
    assert len(plan.steps) >= 4
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    fp, st = fingerprint(model), state(model)
    real_run_step = apply_mod._run_step

    for k in range(len(plan.steps)):
        def failing(step, *args, k=k, **kwargs):
            if step.index == k:
                raise RuntimeError(f"injected failure at step {k}")
            return real_run_step(step, *args, **kwargs)

        monkeypatch.setattr(apply_mod, "_run_step", failing)
        with pytest.raises(ApplyError, match=f"step {k} .*injected failure"):
            apply_plan(plan, model)
        assert_untouched(model, fp, st, ids, logits)

    # A failure after every step ran, while the linear wrappers are being put in place.
    monkeypatch.setattr(apply_mod, "_run_step", real_run_step)
    real_linear = linear_anchor.SurgeryLinear
    calls = {"n": 0}

    def failing_linear(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure while wrapping")
        return real_linear(*args, **kwargs)

    monkeypatch.setattr(linear_anchor, "SurgeryLinear", failing_linear)
    with pytest.raises(ApplyError, match="injected failure while wrapping"):
        apply_plan(plan, model)
    assert_untouched(model, fp, st, ids, logits)


@pytest.mark.parametrize("arch", sorted(PLANS))
def test_successful_apply_then_rollback_restores(arch):
    model = tiny(arch)
    plan = build_plan(parse(PLANS[arch]), model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    fp, st = fingerprint(model), state(model)
    edit = apply_plan(plan, model)
    assert fingerprint(model) != fp
    edit.rollback()
    assert_untouched(model, fp, st, ids, logits)


def test_user_errors_during_apply_keep_their_type_and_position(monkeypatch):
    model = tiny("llama")
    plan = build_plan(parse("attn.q: lora(r=2)\nmlp.up: lora(r=2)"), model)
    from surgery.transforms.lora import LoRA

    real = LoRA.adapter

    def failing(self, p, base, target):
        if "mlp" in target.path:
            raise SurgeryError("cannot adapt this layer")
        return real(self, p, base, target)

    monkeypatch.setattr(LoRA, "adapter", failing)
    with pytest.raises(SurgeryError) as info:
        apply_plan(plan, model)
    assert "step 1 (lora at <spec>:2:9) failed: cannot adapt this layer" in str(info.value)


def test_seeded_initialisation_is_reproducible():
    a, b = tiny("llama"), tiny("llama")
    plan = build_plan(parse("attn.*: lora(r=4)"), a)
    apply_plan(plan, a, seed=3)
    apply_plan(plan, b, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = tiny("llama")
    apply_plan(plan, c, seed=4)
    assert not torch.equal(c.state_dict()["model.layers.0.self_attn.q_proj.adapter.lora_A.weight"],
                           a.state_dict()["model.layers.0.self_attn.q_proj.adapter.lora_A.weight"])


@pytest.mark.parametrize("arch", sorted(PLANS))
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interruption_inside_any_step_rolls_back_and_is_reraised_as_is(arch, interruption, monkeypatch):
    """Ctrl-C is not an Exception: rollback must not depend on the step failing 'normally'."""
    model = tiny(arch)
    plan = build_plan(parse(PLANS[arch]), model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    fp, st = fingerprint(model), state(model)
    real_run_step = apply_mod._run_step

    for k in range(len(plan.steps)):
        for after in (False, True):  # before the step touched anything, and after its edits were made
            raised = interruption()

            def interrupted(step, *args, k=k, after=after, raised=raised, **kwargs):
                if step.index == k and after:
                    real_run_step(step, *args, **kwargs)
                if step.index == k:
                    raise raised
                return real_run_step(step, *args, **kwargs)

            monkeypatch.setattr(apply_mod, "_run_step", interrupted)
            with pytest.raises(interruption) as info:
                apply_plan(plan, model)
            assert info.value is raised  # not wrapped in an ApplyError
            assert_untouched(model, fp, st, ids, logits)
    monkeypatch.setattr(apply_mod, "_run_step", real_run_step)
    apply_plan(plan, model)  # the model is plannable and applicable again
    assert fingerprint(model) != fp
