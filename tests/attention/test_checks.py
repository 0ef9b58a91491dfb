"""The shared attention obligation helpers can fail: a fast path that ignores left padding shows in
the layers of a whole-model run, and the correct one does not."""

import copy

import torch

from surgery.apply import apply_plan
from surgery.attention import checks, fast
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import Check


def _check(text="attn: s2attn(group=4)"):
    model = tiny("llama").eval()
    plan = build_plan(parse(text), model)
    surgered = copy.deepcopy(model)
    apply_plan(plan, surgered)
    return Check(model, surgered, plan.steps[0], 0, plan=plan), surgered


def _padded_ids(check):
    ids = check.tokens(length=13, salt=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def test_layers_in_model_agree_for_the_real_fast_path():
    check, model = _check()
    ids, mask = _padded_ids(check)
    with checks.mode(model, True):
        assert checks._layers_in_model(check, model, ids, mask, tile=3) < 1e-6


def test_layers_in_model_catch_a_fast_path_that_ignores_padding(monkeypatch):
    check, model = _check()
    ids, mask = _padded_ids(check)
    attend = fast.attend

    def unpadded(program, x, **kwargs):  # the bug: row 0's three padding tokens become real keys
        x.pad, x.key_ok = None, None
        return attend(program, x, **kwargs)

    monkeypatch.setattr(fast, "attend", unpadded)
    with checks.mode(model, True):
        assert checks._layers_in_model(check, model, ids, mask, tile=3) > 1e-3
