"""The decoding anchor: `generate:` selects the model's generation; a step replaces model.generate."""

import copy

import pytest
import torch

import surgery
from surgery.anchors import KINDS
from surgery.anchors.decoding import Generation, GenerationError
from surgery.apply import apply_plan
from surgery.errors import ApplyError, SpecErrors
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.registry import Anchor


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("selector", ["generate", "model", "*"])
def test_generate_and_the_whole_model_hold_the_generation(selector):
    model = tiny("llama")
    step, = _plan(f"{selector}: nbce(chunk=8)", model).steps
    assert step.spec.anchor is Anchor.DECODING and [(t.path, t.role) for t in step.targets] == [("", "generate")]


def test_a_generate_region_holds_no_module_for_other_transforms():
    model = tiny("llama")
    with pytest.raises(SpecErrors, match=r"lora finds no anchor in generate; it attaches to linear anchors"):
        _plan("generate: lora(r=4)", model)
    with pytest.raises(SpecErrors, match=r"nbce finds no anchor in attn; it attaches to decoding anchors, e.g. generate"):
        _plan("attn: nbce(chunk=8)", model)


def test_a_model_that_does_not_generate_has_no_decoding_anchor():
    model = tiny("bert")
    with pytest.raises(SpecErrors, match="has no decoding anchor for recompute anywhere"):
        _plan("generate: recompute(8)", model)


def test_one_generation_strategy_per_model():
    model = tiny("llama")
    with pytest.raises(SpecErrors, match=r"recompute and nbce both decide how the model generates.*other is at <spec>:1:11"):
        _plan("generate: nbce(chunk=8)\ngenerate: recompute(16)", model)


def test_the_step_replaces_generate_and_rollback_restores_it():
    model = tiny("llama")
    edit = apply_plan(_plan("generate: recompute(4)", model), model)
    assert isinstance(model.generate, Generation) and model.surgery_decoding == "recompute(window=4)"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit.rollback()
    assert "generate" not in vars(model) and "surgery_decoding" not in vars(model)
    assert model.generate.__func__ is type(model).generate  # the class's own again
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_failing_plan_leaves_generate_untouched(monkeypatch):
    model = tiny("llama")
    plan = _plan("generate: recompute(4); mlp.down: lora(r=2)", model)
    from surgery.anchors.linear import LinearInstaller

    monkeypatch.setattr(LinearInstaller, "finish", lambda self, trees: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(ApplyError, match="boom"):
        apply_plan(plan, model)
    assert "generate" not in vars(model)


def test_a_deep_copy_generates_with_the_copy():
    model = tiny("llama")
    apply_plan(_plan("generate: recompute(4)", model), model)
    twin = copy.deepcopy(model)
    assert twin.generate.model is twin and twin.generate.strategy is not None
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    ids = _ids(6)
    a = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    b = twin.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert (a.logits[0] - b.logits[0]).abs().max() > 1e-2  # the copy's weights, not the original's


def test_sampling_draws_what_generate_draws():
    """One chunk is the untouched model; seeded sampling with top-k/top-p/temperature picks the same tokens."""
    model, reference = tiny("llama"), tiny("llama")
    apply_plan(_plan("generate: nbce(chunk=16)", model), model)
    context, question = _ids(10, seed=1), _ids(4, seed=2)
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(5)
    got = model.generate(question, context=context, **settings)
    torch.manual_seed(5)
    want = reference.generate(torch.cat([context, question], 1), **settings)
    assert torch.equal(got[0, 4:], want[0, 14:]) and torch.equal(got[0, :4], question[0])


def test_generation_settings_come_from_the_generation_config():
    model = tiny("llama")
    apply_plan(_plan("generate: recompute(64)", model), model)
    model.generation_config.max_new_tokens = 3
    out = model.generate(_ids(5))
    assert out.shape == (1, 8)
    eos = int(out[0, 5])  # stop at the first generated token: rows finished early are padded
    out = model.generate(_ids(5), max_new_tokens=6, eos_token_id=eos, pad_token_id=7)
    assert out.shape == (1, 6) and int(out[0, 5]) == eos


def test_an_argument_the_strategy_does_not_take_is_refused():
    model = tiny("llama")
    apply_plan(_plan("generate: recompute(8)", model), model)
    with pytest.raises(GenerationError, match="recompute generation takes no argument 'context'"):
        model.generate(_ids(4), context=_ids(8), max_new_tokens=2)


def test_saved_and_loaded_the_model_generates_the_same_way(tmp_path):
    model = tiny("llama")
    result = surgery.compile(model, "generate: nbce(chunk=6, beta=0.5)")
    result.save(tmp_path / "out")
    loaded = surgery.load(tmp_path / "out")
    assert isinstance(loaded.generate, Generation) and loaded.surgery_decoding == "nbce(chunk=6, beta=0.5, pool=entropy)"
    question, context = _ids(3, seed=3), _ids(20, seed=4)
    kwargs = dict(context=context, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a, b = model.generate(question, **kwargs), loaded.generate(question, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_the_kind_is_registered():
    assert KINDS[Anchor.DECODING].required and not KINDS[Anchor.DECODING].wraps
