"""T-Few's losses against a hand computation, and ia3(loss=tfew) as a schedule."""

import math

import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.models import tiny
from surgery.train import Schedules
from surgery.train.losses import tfew_loss, tfew_losses

# Two examples (B = 2) with two choices each (C = 2), vocabulary 3, three positions; the prompt is
# one token (label −100) and each choice two tokens, except the last choice, one (its end is padding).
LOGITS = [
    [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]],
    [[0.0, 1.0, 3.0], [1.0, 1.0, -2.0], [0.0, 0.0, 0.0]],
    [[-1.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]],
    [[1.0, 2.0, 0.5], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
]
LABELS = [[-100, 1, 2], [-100, 0, 1], [-100, 2, 0], [-100, 1, -100]]
ANSWER = [1, 0]  # example 0's answer is its second choice (row 1), example 1's its first (row 2)


def p(row, position, token):
    z = LOGITS[row][position]
    return math.exp(z[token]) / sum(math.exp(v) for v in z)


def by_hand():
    probs = {row: [p(row, t - 1, label) for t, label in enumerate(LABELS[row]) if label != -100] for row in range(4)}
    correct, wrong = [1, 2], [0, 3]
    lm = -sum(math.log(q) for r in correct for q in probs[r]) / sum(len(probs[r]) for r in correct)
    ul = -sum(math.log(1 - q) for r in wrong for q in probs[r]) / sum(len(probs[r]) for r in wrong)
    beta = [sum(math.log(q) for q in probs[r]) / len(probs[r]) for r in range(4)]
    ln = -(beta[1] - math.log(math.exp(beta[0]) + math.exp(beta[1]))
           + beta[2] - math.log(math.exp(beta[2]) + math.exp(beta[3]))) / 2
    return {"lm": lm, "ul": ul, "ln": ln}


def test_the_losses_equal_a_hand_computation():
    got = tfew_losses(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(ANSWER))
    want = by_hand()
    assert {k: v.item() for k, v in got.items()} == pytest.approx(want, rel=1e-6)
    assert tfew_loss(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(ANSWER)).item() == pytest.approx(
        sum(want.values()), rel=1e-6)


def test_ia3_with_tfew_replaces_the_models_loss():
    model = tiny("llama")
    result = surgery.compile(model, "attn.k, attn.v, mlp.down: ia3(loss=tfew)", check=False)
    schedules = Schedules(result)
    assert schedules.batch_keys == {"answer"}
    ids = torch.randint(1, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100  # a three-token prompt, then the choice
    answer = torch.tensor([1, 0])
    outputs = model(input_ids=ids, labels=labels)
    loss = schedules.loss({"input_ids": ids, "labels": labels, "answer": answer}, outputs)
    assert loss.item() == pytest.approx(tfew_loss(outputs.logits, labels, answer).item(), rel=1e-6)
    assert loss.item() != pytest.approx(outputs.loss.item())
    loss.backward()  # it trains the vectors
    assert model.model.layers[0].self_attn.k_proj.adapter.ia3_l.grad.abs().sum() > 0
    with pytest.raises(SurgeryError, match="multiple-choice batches"):
        schedules.loss({"input_ids": ids, "labels": labels}, outputs)


def test_ia3_without_a_loss_option_schedules_nothing():
    result = surgery.compile(tiny("llama"), "attn.k: ia3", check=False)
    assert not Schedules(result)
