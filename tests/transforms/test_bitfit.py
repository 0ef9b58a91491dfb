"""BitFit: obligations on three architectures with biases, region selection, errors, rollback; add=true on
Llama and Qwen2 (and SmolLM2): zero biases added where missing, saved plain where a config switch builds them."""

import json

import pytest
import torch
import transformers

import surgery
import surgery.transforms.bitfit as bitfit
from surgery.apply import apply_plan
from surgery.errors import SpecError, SurgeryError
from surgery.models import load_model, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.bitfit import BitFit
from surgery.transforms.lora import LoRA
from surgery.verify import verify

NO_NEW_MODULES = "no new modules: module tree unchanged, parameter names but for the added biases"
OUTPUTS = "outputs unchanged at init: logits max abs diff"
LAYER0 = {"gpt2": "transformer.h.0.", "bert": "bert.encoder.layer.0.", "qwen2": "model.layers.0."}


def plan_for(text, model):
    return build_plan(parse(text), model)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def bias_names(model, prefix=""):
    return {n for n, _ in model.named_parameters() if n.startswith(prefix) and n.rsplit(".", 1)[-1] == "bias"}


@pytest.mark.parametrize("arch", ["gpt2", "bert", "qwen2"])
def test_whole_model_verifies_and_trains_exactly_the_biases(arch):
    model = tiny(arch)
    plan = plan_for("model: bitfit", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 3
    apply_plan(plan, model)
    assert bias_names(model)  # the test means something only if there are biases
    assert trainable(model) == bias_names(model)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "qwen2"])
def test_one_layer_trains_only_that_layers_biases(arch):
    model = tiny(arch)
    plan = plan_for("layers[0]: bitfit", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    expected = bias_names(model, LAYER0[arch])
    assert expected and expected != bias_names(model)
    assert trainable(model) == expected


def test_outputs_and_module_tree_are_untouched():
    model = tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    apply_plan(plan_for("model: bitfit", model), model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("text", ["model: bitfit", "layers[0]: bitfit", "attn.q: bitfit"])
def test_a_region_without_biases_is_a_spec_error(text):
    with pytest.raises(SpecError) as e:
        plan_for(text, tiny("llama"))  # llama has no bias anywhere
    assert "bitfit finds no anchor" in str(e.value)


def test_composes_with_lora_and_both_train():
    model = tiny("qwen2")
    plan = plan_for("model: bitfit; attn.q: lora(r=2)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    apply_plan(plan, model)
    names = trainable(model)
    lora = {n for n in names if ".lora_" in n}
    assert len(lora) == 4  # A and B of attn.q in two layers
    assert names - lora == bias_names(model)


def test_a_failing_later_step_restores_every_flag(monkeypatch):
    model = tiny("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed starting state, so "all True" is wrong too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_for("model: bitfit; attn.q: lora(r=2)", model)

    def broken(self, p, base, target):
        raise RuntimeError("adapter construction failed")

    monkeypatch.setattr(LoRA, "adapter", broken)
    with pytest.raises(SurgeryError, match="adapter construction failed"):
        apply_plan(plan, model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_obligations_catch_a_wrong_transform(monkeypatch):
    model = tiny("gpt2")
    plan = plan_for("layers[0]: bitfit", model)
    right = BitFit.apply

    def sloppy(self, p, m, targets, edit):
        right(self, p, m, targets, edit)
        edit.requires_grad(m.transformer.wte.weight, True)  # a non-bias made trainable
        with torch.no_grad():
            m.transformer.h[0].mlp.c_fc.bias.add_(0.1)  # and a value changed

    monkeypatch.setattr(BitFit, "apply", sloppy)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    assert failed["only the region's bias tensors are trainable"] == 1.0
    assert failed[OUTPUTS] > 1e-3

    def too_wide(self, p, m, targets, edit):
        for name, param in m.named_parameters():  # biases outside layer 0 too
            if name.endswith("bias"):
                edit.requires_grad(param, True)

    monkeypatch.setattr(BitFit, "apply", too_wide)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    outside = len(bias_names(model)) - len(bias_names(model, LAYER0["gpt2"]))
    assert failed == {"only the region's bias tensors are trainable": float(outside)}

    def wrapping(self, p, m, targets, edit):
        right(self, p, m, targets, edit)
        path = "transformer.h.0.ln_1"
        edit.replace(path, torch.nn.Sequential(m.get_submodule(path)))  # same function, new module tree

    monkeypatch.setattr(BitFit, "apply", wrapping)
    failed = {m.obligation: m.error for m in verify(plan, model).failures}
    assert list(failed) == [NO_NEW_MODULES]
    assert failed[NO_NEW_MODULES] >= 1


# ------------------------------------------------------------------------------------ add=true

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def linear_biases(model, names=LINEARS):
    block = {n: "self_attn" if n in {"q_proj", "k_proj", "v_proj", "o_proj"} else "mlp" for n in LINEARS}
    return {f"model.layers.{i}.{block[n]}.{n}.bias" for i in range(model.config.num_hidden_layers) for n in names}


def ids(seed=0):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_add_gives_every_linear_layer_a_zero_bias_and_trains_only_biases(arch):
    model = tiny(arch)
    plan = plan_for("model: bitfit(add=true)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert [m.obligation for m in report.measurements] == [
        NO_NEW_MODULES, "only the region's bias tensors are trainable", OUTPUTS]
    kept = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}  # Qwen2's q/k/v
    assert set(kept) == (linear_biases(model, {"q_proj", "k_proj", "v_proj"}) if arch == "qwen2" else set())
    with torch.no_grad():
        reference = model(input_ids=ids()).logits
    apply_plan(plan, model)
    assert trainable(model) == bias_names(model) == linear_biases(model)  # not lm_head: not named
    params = dict(model.named_parameters())
    assert all(params[n] is p for n, p in kept.items())  # existing biases kept, not replaced
    added = linear_biases(model) - set(kept)
    assert all(params[n].abs().sum() == 0 and params[n].dtype == torch.float32 for n in added)
    assert model.lm_head.bias is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, reference)


def test_add_on_one_role_and_one_layer_adds_only_there():
    model = tiny("llama")
    apply_plan(plan_for("attn.q: bitfit(add=true); layers[1].mlp: bitfit(add=true)", model), model)
    assert trainable(model) == {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias",
                                "model.layers.1.mlp.gate_proj.bias", "model.layers.1.mlp.up_proj.bias",
                                "model.layers.1.mlp.down_proj.bias"}


def test_add_on_the_head_only_when_named():
    model = tiny("llama")
    apply_plan(plan_for("lm_head: bitfit(add=true)", model), model)
    assert trainable(model) == {"lm_head.bias"}


def test_add_trains_and_the_biases_move():
    model = tiny("llama")
    apply_plan(plan_for("model: bitfit(add=true)", model), model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_a_region_without_linear_layers_or_biases_still_finds_no_anchor():
    with pytest.raises(SpecError, match="bitfit finds no anchor"):
        plan_for("norm: bitfit(add=true)", tiny("llama"))


def test_a_failing_later_step_removes_the_added_biases(monkeypatch):
    model = tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_for("model: bitfit(add=true); attn.q: lora(r=2)", model)
    monkeypatch.setattr(LoRA, "adapter", lambda self, p, base, target: 1 / 0)
    with pytest.raises(SurgeryError, match="division by zero"):
        apply_plan(plan, model)
    assert all(model.get_submodule(f"model.layers.{i}.self_attn.q_proj").bias is None for i in range(2))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bug, fails", [
    ("random init", OUTPUTS),  # b ~ N(0, 0.02), as if initialised like a weight: not the identity
    ("head too", NO_NEW_MODULES),  # lm_head given a (zero) bias though the region did not name it
])
def test_add_obligations_catch_bugs(monkeypatch, bug, fails):
    model = tiny("llama")  # no bias anywhere: every bias after the step is an added one
    plan = plan_for("model: bitfit(add=true)", model)
    right = BitFit.apply

    def buggy(self, p, m, targets, edit):
        right(self, p, m, targets, edit)
        if bug == "head too":
            edit.set_attr(m.lm_head, "bias", torch.nn.Parameter(torch.zeros(m.lm_head.out_features)))
        else:
            with torch.no_grad():
                for b in bitfit.biases(m):
                    b.normal_(0, 0.02)

    monkeypatch.setattr(BitFit, "apply", buggy)
    assert {m.obligation for m in verify(plan, model).failures} == {fails}


# --------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("spec, flags", [
    ("model: bitfit(add=true)", {"attention_bias": True, "mlp_bias": True}),
    ("attn: bitfit(add=true)", {"attention_bias": True, "mlp_bias": False}),
    ("mlp: bitfit(add=true)", {"attention_bias": False, "mlp_bias": True}),
])
def test_add_saves_a_plain_llama_with_the_bias_switches(tmp_path, spec, flags):
    model = tiny("llama")
    result = surgery.compile(model, spec)
    perturb(model)
    out = result.save(tmp_path / "out")
    meta = json.loads((out / "surgery.json").read_text())
    assert meta["plain"]
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in flags} == flags
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = surgery.load(out)
    for other in (plain, loaded):
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids()).logits, model(input_ids=ids()).logits)


@pytest.mark.parametrize("arch, spec", [
    ("llama", "attn.q: bitfit(add=true)"),    # no switch builds q alone
    ("llama", "layers[0]: bitfit(add=true)"),  # the switches build every layer's
    ("qwen2", "model: bitfit(add=true)"),     # Qwen2 has no switch for o_proj or the MLP
])
def test_add_without_an_exact_switch_saves_the_surgery_format_bit_exactly(tmp_path, arch, spec):
    model = tiny(arch)
    result = surgery.compile(model, spec)
    perturb(model)
    out = result.save(tmp_path / "out")
    assert not json.loads((out / "surgery.json").read_text())["plain"]
    assert (out / "surgery.safetensors").is_file()
    loaded = surgery.load(out)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).logits, model(input_ids=ids()).logits)


@pytest.mark.slow
def test_smollm2_add_verifies_and_saves_a_plain_model(smollm2_dir, tmp_path):
    model = load_model(smollm2_dir)
    result = surgery.compile(model, "model: bitfit(add=true)")
    assert result.report.ok, result.report.text()
    assert trainable(model) == bias_names(model) and len(bias_names(model)) == 7 * model.config.num_hidden_layers
    perturb(model)
    out = result.save(tmp_path / "out")
    assert json.loads((out / "surgery.json").read_text())["plain"]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, model(input_ids=x).logits)
