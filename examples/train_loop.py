"""A hand-written training loop with surgery's one-call hook: ReLoRA restarts on a tiny Llama.

    python examples/train_loop.py                  # a tiny random Llama (seconds)
    python examples/train_loop.py --model smollm2  # the real SmolLM2-135M-Instruct

`Schedules(result)` gathers every step's training-time behaviour; `schedules.optimizer_step(optimizer)`
replaces `optimizer.step()`: it scales the learning rate (ReLoRA's re-warm-up), steps, and runs the
after-step actions (ReLoRA's merge-and-restart, with the adapter's optimizer state pruned).
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

import surgery
from surgery.models import load_model, smollm2_dir, tiny
from surgery.train import Schedules, load

SPEC = "attn.q, attn.v, mlp.down: relora(r=8, restart_every=4, warmup=3, reset=0.99)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    model = tiny("llama") if args.model == "tiny" else load_model(smollm2_dir())

    result = surgery.compile(model, SPEC)  # verified (a restart keeps the logits) before it touches the model
    schedules = Schedules(result)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cosine = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=args.steps)
    batch = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(args.steps):
        outputs = model(input_ids=batch, labels=batch)
        loss = schedules.loss({"input_ids": batch, "labels": batch}, outputs)
        loss.backward()
        schedules.optimizer_step(optimizer)  # instead of optimizer.step()
        cosine.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    print(f"schedule state: {schedules.state_dict()}")

    with tempfile.TemporaryDirectory() as tmp:
        out = result.save(Path(tmp) / "trained")  # the schedule state goes into surgery.json
        again = load(out)  # model and schedules, to continue where this run stopped
        with torch.no_grad():
            same = torch.equal(model(batch).logits, again.model(batch).logits)
        same = same and again.schedules.state_dict() == schedules.state_dict()
        print(f"reload bit-exact: {same}")
        assert same


if __name__ == "__main__":
    main()
