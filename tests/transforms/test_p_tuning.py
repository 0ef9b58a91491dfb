"""P-tuning: obligations on four architectures with both encoders (and that they can fail), the encoder
against PEFT's, training, save/load bit-exact, PEFT's P_TUNING format loaded by PEFT, SmolLM2."""

import json

import pytest
import safetensors.torch
import torch

import surgery
import surgery.transforms.p_tuning as ptu
import surgery.transforms.prompt_tuning as pt
from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import load_model, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import verify

N = 4  # virtual tokens
OBLIGATIONS = {"length 0 is the identity", "equals feeding the virtual embeddings by hand",
               "prefill + decode equals the full forward", "left-padded batch equals each row alone",
               "the exported embeddings reproduce the outputs"}


def surgered(arch, text=f"embed: p_tuning({N})"):
    model = tiny(arch)
    plan = build_plan(parse(text), model)
    apply_plan(plan, model)
    return model, plan


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def failures(arch="llama", text=f"embed: p_tuning({N}, encoder=lstm)"):
    model = tiny(arch)
    report = verify(build_plan(parse(text), model), model)
    return {m.obligation.split(" [crashed")[0] for m in report.failures}


# ------------------------------------------------------------------------------- obligations


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_obligations_hold(arch, encoder):
    model = tiny(arch)
    report = verify(build_plan(parse(f"embed: p_tuning({N}, encoder={encoder}, hidden=16)"), model), model)
    assert report.ok, report.text()
    assert {m.obligation for m in report.measurements} == OBLIGATIONS
    assert all(m.error <= 1e-5 for m in report.measurements if m.not_applicable is None)
    assert [m.not_applicable is not None for m in report.measurements].count(True) == (arch == "bert")


def test_obligations_catch_an_lstm_run_on_no_virtual_token(monkeypatch):
    # Without its n = 0 guard the encoder feeds the LSTM an empty sequence, which torch refuses.
    def unguarded(self):
        u = self.embedding.weight
        if self.lstm_head is not None:
            u = self.lstm_head(u.unsqueeze(0))[0][0]
        return self.mlp_head(u)

    monkeypatch.setattr(ptu.PromptEncoder, "embeddings", unguarded)
    assert failures() == {"length 0 is the identity"}


def test_obligations_catch_an_export_of_the_encoder_inputs(monkeypatch):
    # What PEFT's own inference-mode save writes (its ``embedding`` table): U, not f(U).
    monkeypatch.setattr(ptu.PTuning, "peft_tensors",
                        lambda self, model: {"prompt_embeddings": pt.find_prompt(model).embedding.weight.detach()})
    assert failures("gpt2") == {"the exported embeddings reproduce the outputs"}


def test_obligations_catch_a_prompt_prepended_on_decode_steps_too(monkeypatch):
    # The shared hooks, seen through p-tuning: a hook that ignores the cache re-prepends f(U) at each step.
    real = pt._hooks

    def hooks():
        before, after = real()

        def every_call(module, args, kwargs):
            cache = kwargs.pop("cache", None)
            args, kwargs = before(module, args, kwargs)
            return args, {**kwargs, "cache": cache}

        return every_call, after

    monkeypatch.setattr(pt, "_hooks", hooks)
    # Both obligations that decode see it; the full-forward ones do not.
    assert failures() == {"prefill + decode equals the full forward", "left-padded batch equals each row alone"}


# ------------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_encoder_computes_what_peft_s_prompt_encoder_computes(encoder):
    """PEFT's PromptEncoder (training mode, where it runs the encoder) with our weights gives our f(U):
    the same formulas and the same tensor names."""
    from peft import PromptEncoder, PromptEncoderConfig

    model, _ = surgered("llama", f"embed: p_tuning(5, encoder={encoder}, hidden=12, layers=2)")
    ours = pt.find_prompt(model)
    perturb(model)
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=64,
                                 num_transformer_submodules=1, encoder_reparameterization_type=encoder.upper(),
                                 encoder_hidden_size=12, inference_mode=False)
    theirs = PromptEncoder(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        expected = theirs(torch.arange(5).unsqueeze(0))[0]
        assert ours.embeddings().shape == (5, 64)
        assert torch.equal(ours.embeddings(), expected)


def test_every_virtual_token_of_the_lstm_depends_on_all_inputs():
    model, _ = surgered("llama", "embed: p_tuning(3, encoder=lstm)")
    encoder = pt.find_prompt(model)
    for i in range(3):  # d f(U)_i / d U_j is non-zero for every j: bidirectional over the whole sequence
        encoder.zero_grad()
        encoder.embeddings()[i].sum().backward()
        assert (encoder.embedding.weight.grad.abs().sum(dim=1) > 0).all()


def test_hidden_defaults_to_the_model_width_and_mlp_has_three_layers():
    model, _ = surgered("qwen2")
    encoder = pt.find_prompt(model)
    d = model.config.hidden_size
    assert [tuple(layer.weight.shape) for layer in encoder.mlp_head if hasattr(layer, "weight")] == [(d, d)] * 3
    assert encoder.lstm_head is None


def test_only_the_encoder_trains_and_each_step_moves_the_prompt():
    model, _ = surgered("llama", "embed: p_tuning(4, encoder=lstm, hidden=8)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.surgery_prompt.") for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"embedding", "lstm_head", "mlp_head"}
    ids = tokens()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    # The encoder runs at every forward: the output equals the untouched model fed today's f(U).
    original = tiny("llama")
    with torch.no_grad():
        prompt = pt.find_prompt(model).embeddings()
        fed = torch.cat([prompt.expand(2, -1, -1), original.get_input_embeddings()(ids)], dim=1)
        assert (model(input_ids=ids).logits - original(inputs_embeds=fed).logits[:, 4:]).abs().max() <= 1e-5


def test_composes_with_nothing_else_at_the_input():
    model, _ = surgered("llama")
    plan = build_plan(parse("embed: prompt_tuning(2)"), model.__class__(model.config))
    with pytest.raises(surgery.SurgeryError, match=r"already has virtual tokens \(p-tuning\)"):
        apply_plan(plan, model)


@pytest.mark.parametrize("text, message", [
    ("embed: p_tuning(4, encoder=gru)", "'encoder'"),
    ("embed: p_tuning(4, layers=3)", "layers and dropout set the LSTM encoder"),
    ("embed: p_tuning(4, encoder=lstm, layers=1, dropout=0.1)", "with layers=1 there is none"),
    ("embed: p_tuning(4, hidden=0)", "'hidden'"),
    ("attn: p_tuning(2)", "attaches to embeddings anchors"),
])
def test_user_errors(text, message):
    with pytest.raises(SpecError, match=message):
        build_plan(parse(text), tiny("llama"))


def test_a_prompt_that_fills_the_position_table_is_refused_by_name():
    with pytest.raises(SpecError, match=r"p_tuning needs a length of at most 63"):
        surgery.compile(tiny("gpt2"), "embed: p_tuning(64)")


# ---------------------------------------------------------------------------- save and PEFT


@pytest.mark.parametrize("arch, encoder", [("llama", "lstm"), ("gpt2", "mlp"), ("bert", "mlp")])
def test_save_load_is_bit_exact_and_peft_loads_the_export(tmp_path, arch, encoder):
    import peft

    model = tiny(arch)
    result = surgery.compile(model, f"embed: p_tuning({N}, encoder={encoder}, hidden=16)")
    perturb(model)
    out = result.save(tmp_path / "out")
    loaded = surgery.load(out)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    ids = tokens()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, ours)

    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING"
    assert (config["encoder_reparameterization_type"], config["encoder_hidden_size"]) == (encoder.upper(), 16)
    saved = safetensors.torch.load_file(str(out / "peft" / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (N, model.config.hidden_size)
    reloaded = peft.PeftModel.from_pretrained(tiny(arch), str(out / "peft")).eval()
    with torch.no_grad():
        theirs = reloaded(input_ids=ids).logits
    assert theirs.shape[1] == N + ids.shape[1]
    assert (theirs[:, N:] - ours).abs().max().item() <= 1e-5


def test_peft_export_is_the_inference_output_even_in_training_mode():
    model, plan = surgered("llama", "embed: p_tuning(4, encoder=lstm, layers=2, dropout=0.5)")
    model.train()
    step = plan.steps[0]
    impl = step.spec.instance()
    first = impl.peft_tensors(model)["prompt_embeddings"]
    assert torch.equal(first, impl.peft_tensors(model)["prompt_embeddings"])  # no dropout in the export
    assert pt.find_prompt(model).training
    assert impl.peft(step.params, step.targets)["encoder_dropout"] == 0.5


# ---------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_verifies_and_peft_agrees(smollm2_dir, tmp_path):
    import peft

    base = load_model(smollm2_dir)
    result = surgery.compile(base, "embed: p_tuning(8, encoder=lstm, hidden=128)")
    assert result.report.ok, result.report.text()
    assert {m.obligation for m in result.report.measurements} == OBLIGATIONS
    out = result.save(tmp_path / "out")
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = base(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(load_model(smollm2_dir), str(out / "peft")).eval()(input_ids=ids).logits
    assert (theirs[:, 8:] - ours).abs().max().item() <= 1e-4
