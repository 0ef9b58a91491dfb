"""Prefix tuning and P-tuning v2: obligations on two architectures (and that they can fail), the encoder
against PEFT's, PEFT's PREFIX_TUNING export loaded by PEFT with equal outputs, save/load bit-exact,
training, composition with window and sinks (the prefix never evicted), clashes, SmolLM2."""

import json

import pytest
import safetensors.torch
import torch

import surgery
import surgery.transforms.prefix_tuning as pt
from surgery.apply import apply_plan
from surgery.errors import SpecError
from surgery.models import load_model, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import verify

OBLIGATIONS = {"equals attention over [prefix; keys] by hand (rel.)", "prefill + decode equals the full forward (rel.)",
               "left-padded batch equals each row alone (rel.)", "program equals its dense reference (rel.)",
               "the exported prefix reproduces the outputs"}
SPECS = ["attn: prefix_tuning(4, hidden=16)", "attn: prefix_tuning(3, reparam=none)", "attn: p_tuning_v2(3)"]


def surgered(arch, text="attn: prefix_tuning(4)"):
    model = tiny(arch)
    plan = build_plan(parse(text), model)
    apply_plan(plan, model)
    return model, plan


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(ids, pad=3):
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return mask


def failures(arch="llama", text="attn: prefix_tuning(4)"):
    model = tiny(arch)
    report = verify(build_plan(parse(text), model), model)
    return {m.obligation.split(" [crashed")[0] for m in report.failures}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# ------------------------------------------------------------------------------- obligations


@pytest.mark.parametrize("text", SPECS)
def test_obligations_hold(decoder, text):
    report = verify(build_plan(parse(text), decoder), decoder)
    assert report.ok, report.text()
    assert {m.obligation for m in report.measurements} == OBLIGATIONS


def test_obligations_catch_a_stream_not_numbered_after_the_prefix(monkeypatch):
    # PEFT's prefix sits in the cache before the input, so the input starts at position P; without
    # the shift a query meets the unrotated prefix keys at other positions than PEFT's.
    real = pt._positions
    monkeypatch.setattr(pt, "_positions", lambda kwargs, length, n, device: real(kwargs, length, 0, device))
    assert failures() == {"equals attention over [prefix; keys] by hand (rel.)"}


def test_obligations_catch_positions_counted_from_the_padding(monkeypatch):
    # Numbering a padded row from column 0 (PEFT's numbering without positions) moves its queries
    # relative to the unrotated prefix: the row no longer equals the row alone.
    real = pt._positions
    monkeypatch.setattr(pt, "_positions", lambda kwargs, length, n, device: real(
        {k: v for k, v in kwargs.items() if k != "attention_mask"}, length, n, device))
    assert "left-padded batch equals each row alone (rel.)" in failures()


def test_obligations_catch_a_fast_path_that_drops_the_prefix(monkeypatch):
    from surgery.attention import fast

    real = fast.attend

    def without_prefix(program, x, **kwargs):
        x.prefix = None
        return real(program, x, **kwargs)

    monkeypatch.setattr(fast, "attend", without_prefix)
    assert failures() >= {"equals attention over [prefix; keys] by hand (rel.)",
                          "program equals its dense reference (rel.)"}


# ------------------------------------------------------------------------------- the encoder


def test_encoder_computes_what_peft_s_prefix_encoder_computes():
    """PEFT's PrefixEncoder (training mode, where it runs the MLP) with our weights gives our table:
    the same formulas, shapes (GQA: token_dim = Hkv·D) and tensor names."""
    from peft import PrefixEncoder, PrefixTuningConfig

    model, _ = surgered("llama", "attn: prefix_tuning(5, hidden=12)")
    ours = pt.find_encoder(model)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=2 * 16, num_layers=2,
                                num_attention_heads=2, encoder_hidden_size=12, prefix_projection=True,
                                inference_mode=False)
    theirs = PrefixEncoder(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(ours.flat(), theirs(torch.arange(5)[None])[0])
        assert ours.kv().shape == (2, 2, 2, 5, 16)  # [L, keys|values, Hkv, P, D]


def test_the_mlp_is_the_reparameterisation_and_none_is_a_plain_table():
    mlp = pt.find_encoder(surgered("qwen2", "attn: prefix_tuning(4)")[0])
    none = pt.find_encoder(surgered("qwen2", "attn: p_tuning_v2(4)")[0])
    width = 2 * 2 * 2 * 16  # L · 2 · Hkv · D
    assert mlp.embedding.weight.shape == (4, 32) and isinstance(mlp.transform[1], torch.nn.Tanh)
    assert [tuple(m.weight.shape) for m in mlp.transform if hasattr(m, "weight")] == [(32, 32), (width, 32)]
    assert none.transform is None and none.embedding.weight.shape == (4, width)


def test_only_the_prefix_trains_and_each_step_lowers_the_loss():
    model, _ = surgered("llama", "attn: prefix_tuning(4, hidden=8)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.surgery_prefix.embedding.weight", "model.surgery_prefix.transform.0.weight",
                         "model.surgery_prefix.transform.0.bias", "model.surgery_prefix.transform.2.weight",
                         "model.surgery_prefix.transform.2.bias"}
    ids = tokens()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0]


# ---------------------------------------------------------------------------- composition


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_composes_with_window_and_sinks_and_the_prefix_is_never_evicted(arch):
    """window(8, sinks=2) + prefix: the bounded cache holds 8 keys while every decoding step past the
    window still sees the prefix (decode equals the full forward, which differs from the window alone);
    the fast path equals the dense reference; a left-padded row equals the row alone."""
    from transformers import DynamicCache

    from surgery.attention.cache import ProgramLayer

    model, _ = surgered(arch, "attn: window(8, sinks=2) + prefix_tuning(4)")
    ids = tokens(length=30, seed=2)
    full = logits(model, ids, use_cache=False)
    cache, steps = DynamicCache(config=model.config), []
    with torch.no_grad():
        steps.append(model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits)
        for t in range(5, 30):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
            assert all(isinstance(layer, ProgramLayer) and layer.keys.shape[-2] == min(t + 1, 8)
                       for layer in cache.layers)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    window_alone, _ = surgered(arch, "attn: window(8, sinks=2)")
    assert (logits(window_alone, ids) - full)[:, 10:].abs().max() > 1e-2  # past the window, the prefix still acts
    mask = left_padded(ids)
    fast = logits(model, ids, attention_mask=mask, surgery_tile=4)
    dense = logits(model, ids, attention_mask=mask, surgery_reference=True)
    assert (fast - dense)[mask.bool()].abs().max() <= 1e-5
    assert (logits(model, ids[:1, 3:]) - fast[:1, 3:]).abs().max() <= 1e-5


@pytest.mark.parametrize("sinks", [0, 2])
def test_a_window_wider_than_the_input_equals_the_prefix_alone(sinks):
    """The sink frame scores the prefix at slot P + min(i, size − 1): P + i while the window is not
    full, the absolute frame's position, so window(64) + prefix equals the prefix alone on 30 tokens."""
    both, _ = surgered("llama", f"attn: window(64, sinks={sinks}) + p_tuning_v2(3)")
    alone, _ = surgered("llama", "attn: p_tuning_v2(3)")
    pt.find_encoder(both).load_state_dict(pt.find_encoder(alone).state_dict())
    ids = tokens(length=30, seed=3)
    assert (logits(both, ids) - logits(alone, ids)).abs().max() <= 1e-5


def test_two_prefixes_on_one_module_are_a_clash_with_both_spans():
    with pytest.raises(SpecError, match=r"both set the attention prefix") as e:
        build_plan(parse("attn: prefix_tuning(4) + p_tuning_v2(2)"), tiny("llama"))
    assert "p_tuning_v2(2)" in str(e.value) and "prefix_tuning(4)" in str(e.value)


def test_a_subset_of_layers_verifies_and_is_not_exported_to_peft(tmp_path):
    model = tiny("qwen2")
    result = surgery.compile(model, "layers[1].attn: p_tuning_v2(2)")
    assert result.report.ok, result.report.text()
    assert pt.find_encoder(model).layers == 1
    untouched = tiny("qwen2")
    ids = tokens()
    # Layer 1's prefix acts; layer 0 only sees its stream numbered from P, which rotary attention ignores.
    assert (logits(model, ids) - logits(untouched, ids)).abs().max() > 1e-3
    out = result.save(tmp_path / "out")
    assert not (out / "peft").exists()
    assert "covers every attention layer" in json.loads((out / "surgery.json").read_text())["peft"]


@pytest.mark.parametrize("text, message", [
    ("attn: prefix_tuning(4, reparam=none, hidden=8)", "with reparam=none there is none"),
    ("attn: prefix_tuning(0)", "'length'"),
    ("attn: prefix_tuning(4, reparam=lstm)", "'reparam'"),
    ("embed: p_tuning_v2(2)", "attaches to attention anchors"),
])
def test_user_errors(text, message):
    with pytest.raises(SpecError, match=message):
        build_plan(parse(text), tiny("llama"))


def test_bidirectional_attention_is_refused_by_name():
    with pytest.raises(SpecError, match=r"attends in both directions"):
        build_plan(parse("attn: prefix_tuning(2)"), tiny("bert"))


# ---------------------------------------------------------------------------- save and PEFT


@pytest.mark.parametrize("text", ["attn: prefix_tuning(4, hidden=16)", "attn: p_tuning_v2(3)"])
def test_save_load_is_bit_exact_and_peft_loads_the_export(decoder, tmp_path, text):
    import peft

    arch = decoder.config.model_type
    result = surgery.compile(decoder, text)
    out = result.save(tmp_path / "out")
    loaded = surgery.load(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in decoder.state_dict().items())
    ids = tokens()
    ours = logits(decoder, ids)
    assert torch.equal(logits(loaded, ids), ours)

    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    assert config["prefix_projection"] == ("hidden" in text) and config["inference_mode"]
    saved = safetensors.torch.load_file(str(out / "peft" / "adapter_model.safetensors"))
    n = config["num_virtual_tokens"]
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (n, 2 * 2 * 2 * 16)
    theirs = peft.PeftModel.from_pretrained(tiny(arch), str(out / "peft")).eval()
    assert (logits(theirs, ids) - ours).abs().max().item() <= 1e-5
    # A left-padded batch with generate()'s positions, which PEFT shifts by P as we do.
    mask = left_padded(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = logits(theirs, ids, attention_mask=mask, position_ids=positions)
    got = logits(decoder, ids, attention_mask=mask, position_ids=positions)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_generate_equals_greedy_full_forwards_of_peft_s_model(tmp_path):
    import peft

    model = tiny("llama")
    out = surgery.compile(model, "attn: p_tuning_v2(3)").save(tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), str(out / "peft")).eval()
    ids = tokens(batch=1)
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        greedy = ids
        for _ in range(6):
            greedy = torch.cat([greedy, theirs(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ours, greedy)


# ---------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_verifies_and_peft_agrees(smollm2_dir, tmp_path):
    import peft

    base = load_model(smollm2_dir)
    result = surgery.compile(base, "attn: prefix_tuning(8, hidden=64)")
    assert result.report.ok, result.report.text()
    assert {m.obligation for m in result.report.measurements} == OBLIGATIONS
    out = result.save(tmp_path / "out")
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = base(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(load_model(smollm2_dir), str(out / "peft")).eval()(input_ids=ids).logits
    assert (theirs - ours).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------ learned positions


def test_gpt2_verifies_and_peft_agrees_with_the_prefix_in_the_first_positions(tmp_path):
    """GPT-2 looks positions up in a table: the stream starts at row P, as under PEFT."""
    import peft

    model = tiny("gpt2")
    result = surgery.compile(model, "attn: p_tuning_v2(3)")
    assert result.report.ok, result.report.text()
    out = result.save(tmp_path / "out")
    ids = tokens()
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2"), str(out / "peft")).eval()
    assert (logits(theirs, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_a_stream_past_the_learned_positions_is_refused_by_name():
    with pytest.raises(SpecError, match=r"needs a length of at most 63"):
        surgery.compile(tiny("gpt2"), "attn: prefix_tuning(64)")
    model, _ = surgered("gpt2", "attn: prefix_tuning(4)")
    with pytest.raises(surgery.ModelError, match=r"at most 60 tokens; this one reaches 61"):
        logits(model, tokens(length=61))
