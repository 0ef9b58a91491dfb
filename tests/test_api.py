"""The Python API: compile leaves the model untouched on failure; plan counts on the meta device."""

import pytest
import torch
import transformers

import surgery
from surgery.models import tiny


def test_compile_accepts_text_and_paths(tmp_path):
    path = tmp_path / "a.surg"
    path.write_text("attn.q: lora(r=2)\n")
    for spec in ("attn.q: lora(r=2)", path, str(path)):
        result = surgery.compile(tiny("llama"), spec)
        assert result.report.ok and len(result.plan.steps) == 1
        assert result.plan.counts.added == 2 * (64 * 2 + 2 * 64)
        assert result.plan.counts.trainable == result.plan.counts.added


def test_failed_obligation_leaves_the_model_untouched(monkeypatch):
    from surgery.transforms.lora import LoRA

    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [id(m) for m in model.modules()]
    monkeypatch.setattr(LoRA, "identity_model", lambda self, p, check: 1.0)
    with pytest.raises(surgery.ObligationError, match="identity at init: model logits unchanged") as info:
        surgery.compile(model, "attn.q: lora(r=2)")
    assert info.value.exit_code == 1 and not info.value.report.ok
    assert [id(m) for m in model.modules()] == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_spec_errors_leave_the_model_untouched():
    model = tiny("llama")
    modules = [id(m) for m in model.modules()]
    with pytest.raises(surgery.SpecError):
        surgery.compile(model, "attn.q: lora(r=2); nope: lora")
    assert [id(m) for m in model.modules()] == modules


def test_plan_counts_on_meta_without_weights():
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = surgery.plan(model, "*: lora(r=16)")
    # Llama-2-7B: 4.19M LoRA parameters per layer at r=16 on q,k,v,o (4096→4096) and gate,up,down.
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert plan.counts.added == 32 * per_layer == 39_976_960
    assert plan.counts.trainable == plan.counts.added
    assert plan.base_counts.total == 6_738_415_616
    assert all(p.device.type == "meta" for p in model.parameters())


def test_diff_reports_the_wrapped_layers():
    model = tiny("llama")
    result = surgery.compile(model, "attn.q: lora(r=2)", graph_inputs=torch.randint(0, 128, (1, 8)))
    diff = result.diff()
    assert sorted(diff.wrapped) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert "q_proj" in diff.text() and diff.html().startswith("<!DOCTYPE html>")


def test_plan_qlora_for_a_70b_llama_on_meta(tmp_path):
    """Planning never touches weights: a Llama-3-70B-shaped QLoRA plan from its config alone."""
    from surgery.models import load_model

    transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    plan = surgery.plan(load_model(tmp_path, meta=True), "attn.*, mlp.*: quantize(nf4) + lora(r=16)")
    # Per layer at r=16: q,o 8192→8192; k,v 8192→1024; gate,up,down 8192↔28672.
    lora = 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert plan.counts.added == plan.counts.trainable == lora == 207_093_760
    assert plan.base_counts.total == 70_553_706_496  # 4-bit weights count as the weights they hold
    assert plan.counts.total == plan.base_counts.total + lora


@pytest.mark.parametrize("first", ["attn.q: lora(r=2)", "attn: window(8)", "embed: prompt_tuning(2)",
                                   "attn: rope(linear, scale=2)"])
def test_a_surgered_model_is_not_planned_again(first):
    model = tiny("llama")
    surgery.compile(model, first)
    with pytest.raises(surgery.ModelError, match="already been surgered"):
        surgery.compile(model, "mlp.down: lora(r=2)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_are_verified_in_float32_and_stay_low_precision(dtype):
    model = tiny("llama").to(dtype)
    spec = ("attn.*: rope(ntk_dynamic, scale=2) + window(8, sinks=2); mlp.down: lora(r=4) | ia3; "
            "embed: prompt_tuning(2); mlp.up: quantize(nf4) + lora(r=2)")
    result = surgery.compile(model, spec)
    assert result.report.ok, result.report.text()
    assert model.model.layers[0].mlp.down_proj.base.weight.dtype == dtype
    assert model.model.layers[0].mlp.down_proj.adapter[0].lora_A.weight.dtype == dtype
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 20))).logits).all()


def _fingerprint(model):
    return ([(name, id(m)) for name, m in model.named_modules()],
            [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            model.config._attn_implementation)


@pytest.mark.parametrize("where", ["inside a step", "after the steps ran"])
def test_ctrl_c_during_compile_leaves_the_model_bit_identical(where, monkeypatch):
    import surgery.api as api_mod
    import surgery.apply as apply_mod

    model = tiny("llama")
    spec = "attn.*: lora(r=4); attn: window(8, sinks=2); embed: prompt_tuning(2); mlp.up: quantize(nf4)"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = _fingerprint(model)
    if where == "inside a step":
        real = apply_mod._run_step

        def interrupted(step, *args, **kwargs):
            real(step, *args, **kwargs)
            if step.index == 2:
                raise KeyboardInterrupt
        monkeypatch.setattr(apply_mod, "_run_step", interrupted)
    else:
        real_count, calls = api_mod.count, []

        def interrupted(m):
            calls.append(m)
            if len(calls) == 2:  # the count taken after applying
                raise KeyboardInterrupt
            return real_count(m)
        monkeypatch.setattr(api_mod, "count", interrupted)
    with pytest.raises(KeyboardInterrupt):
        surgery.compile(model, spec, check=False)
    assert _fingerprint(model) == fp
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    monkeypatch.undo()
    assert surgery.compile(model, spec, check=False).plan.counts.added > 0  # not "already surgered"


def test_parse_tells_spec_text_from_a_path(tmp_path, monkeypatch):
    # Spec text that mentions a .surg file is text, not a path to read.
    assert surgery.parse("attn.q: lora  # see x.surg").rules[0].expr.name == "lora"
    assert len(surgery.parse("attn.q: lora; mlp.down: ia3 # x.surg").rules) == 2
    path = tmp_path / "spec"  # an existing file is read whatever its name
    path.write_text("mlp.down: ia3\n")
    monkeypatch.chdir(tmp_path)
    for spec in (str(path), path, "spec", " spec "):
        assert surgery.parse(spec).rules[0].expr.name == "ia3"
    with pytest.raises(surgery.SpecError, match="cannot read spec missing.surg"):
        surgery.parse("missing.surg")
