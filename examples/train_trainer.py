"""transformers' Trainer with surgery's callback: ReLoRA restarts inside an ordinary Trainer run.

    python examples/train_trainer.py                  # a tiny random Llama (seconds)
    python examples/train_trainer.py --model smollm2  # the real SmolLM2-135M-Instruct

`SurgeryCallback(result)` runs the steps' schedules from Trainer events (learning-rate scale before
each optimizer step, restarts after it, schedule state into every checkpoint). For a step with a
loss term (`ia3(loss=tfew)`) use `SurgeryTrainer(..., schedules=result)` instead: a callback cannot
change the loss.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import surgery
from surgery.models import load_model, smollm2_dir, tiny
from surgery.train import SurgeryCallback

SPEC = "attn.q, attn.v, mlp.down: relora(r=8, restart_every=4, warmup=2)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    model = tiny("llama") if args.model == "tiny" else load_model(smollm2_dir())
    result = surgery.compile(model, SPEC)
    callback = SurgeryCallback(result)

    # Four sequences seen again and again: something to learn in a few steps.
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=4,
                                     learning_rate=2e-2, lr_scheduler_type="cosine", logging_steps=1,
                                     save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[callback])
        trainer.train()
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step'] - 1}: loss {entry['loss']:.4f}")
        model.eval()
        print(f"schedule state: {callback.schedules.state_dict()}")

        out = result.save(Path(tmp) / "trained")
        reloaded = surgery.load(out)
        with torch.no_grad():
            same = torch.equal(model(ids[:2]).logits, reloaded(ids[:2]).logits)
        print(f"reload bit-exact: {same}")
        assert same


if __name__ == "__main__":
    main()
