"""The recipes in specs/recipes/ compose existing transforms into the papers' methods: each plans,
verifies and trains (its loss falls over a few steps while the base stays frozen)."""

from pathlib import Path

import pytest
import torch

import surgery
from surgery.models import tiny

RECIPES = Path(__file__).resolve().parent.parent / "specs" / "recipes"


def train(model, steps: int = 5) -> list[float]:
    """Losses of `steps` AdamW steps (lr 1e-2) on the trainable parameters, one seeded 4 × 16 batch."""
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mam_plans_verifies_and_trains(arch):
    model = tiny(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = surgery.compile(model, RECIPES / "mam.surg")
    assert result.report.ok, result.report.text()
    assert [s.transform for s in result.plan.steps] == ["prefix_tuning", "adapter"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    d, m = model.config.hidden_size, model.config.hidden_size // 2
    layers = model.config.num_hidden_layers
    adapters = layers * (2 * d * m + m + d)                    # one parallel adapter per FFN
    assert sum(p.numel() for p in trainable) > adapters        # … plus the prefix (and its encoder)
    losses = train(model)
    assert losses[-1] < losses[0] - 0.1
    for key, value in base.items():                            # the base is frozen
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unipelt_plans_verifies_and_trains(arch):
    model = tiny(arch)
    base = [(p, p.detach().clone()) for p in model.parameters()]  # LoRA wraps q, v: their keys move
    result = surgery.compile(model, RECIPES / "unipelt.surg")
    assert result.report.ok, result.report.text()
    assert [s.transform for s in result.plan.steps] == ["lora", "prefix_tuning", "adapter"]
    gates = {m.transform: m for m in result.report.measurements if m.transform.startswith("gate(")}
    assert sorted(gates) == ["gate(adapter)", "gate(lora)", "gate(prefix_tuning)"]
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    gate_params = sum(p.numel() for n, p in model.named_parameters() if ".gate.proj." in n or "prefix_gate" in n)
    assert gate_params == layers * 4 * (d + 1)                 # W_G, b_G at q, v, the prefix and the adapter
    losses = train(model)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, before) and not p.requires_grad for p, before in base)  # the base is frozen
    gate_weights = [p for n, p in model.named_parameters() if n.endswith("gate.proj.weight")]
    assert gate_weights and all(p.abs().sum() > 0 for p in gate_weights)  # the gates learned (they start at 0)


@pytest.mark.slow
def test_unipelt_on_smollm2(smollm2_dir):
    from surgery.models import load_model

    model = load_model(smollm2_dir)
    result = surgery.compile(model, RECIPES / "unipelt.surg")
    assert result.report.ok, result.report.text()
    gates = [m for m in result.report.measurements if m.transform.startswith("gate(")]
    assert len(gates) == 9 and max(m.error for m in gates) < 1e-5
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_longlora_plans_verifies_and_trains_lora_embeddings_and_norms(arch):
    model = tiny(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = surgery.compile(model, RECIPES / "longlora.surg")
    assert result.report.ok, result.report.text()
    assert [s.transform for s in result.plan.steps] == ["rope", "s2attn", "lora", "unfreeze"]
    rope = result.plan.steps[0].params
    assert (rope.kind, rope.scale) == ("linear", 2)                # an 8k model trained at 16k tokens
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    region = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")}
    lora = trainable - region
    assert region <= trainable and len(lora) == layers * 4 * 2       # A and B on q, k, v, o of every layer
    losses = train(model)
    assert losses[-1] < losses[0] - 0.1
    state = model.state_dict()
    for key, value in base.items():                             # frozen but for the embeddings and norms
        if key in state:
            assert torch.equal(state[key], value) == (key not in region), key


def test_longlora_groups_attention_while_training_and_not_at_inference():
    """At 2G tokens the training forward groups its attention (S2-Attn) and the eval forward does not."""
    model = tiny("llama")
    surgery.compile(model, RECIPES / "longlora.surg")
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * 4096), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()
        grouped = model(input_ids=ids).logits
        model.eval()
        full = model(input_ids=ids).logits
    assert (grouped[:, :2048] - full[:, :2048]).abs().max() < 1e-5   # the first half-group: the same keys either way
    assert (grouped[:, 4096:] - full[:, 4096:]).abs().max() > 1e-3
