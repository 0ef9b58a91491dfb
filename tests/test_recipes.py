"""The recipes in specs/recipes/ compose existing transforms into the papers' methods: each plans,
verifies and trains (its loss falls over a few steps while the base stays frozen)."""

from pathlib import Path

import pytest
import torch

import surgery
from surgery.models import tiny

RECIPES = Path(__file__).resolve().parent.parent / "specs" / "recipes"


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
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for key, value in base.items():                            # the base is frozen
        assert torch.equal(model.state_dict()[key], value)
