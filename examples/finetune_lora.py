"""Compile a spec onto a model, train the adapters for a few steps, save, and load it back.

    python examples/finetune_lora.py                 # a tiny random Llama (seconds)
    python examples/finetune_lora.py --model smollm2 # the real SmolLM2-135M-Instruct
"""

import argparse
import tempfile
from pathlib import Path

import torch

import surgery
from surgery.models import load_model, smollm2_dir, tiny

SPEC = """
# LoRA on every attention projection; LoRA and IA3 side by side on the FFN down-projection.
attn.*: lora(r=8, alpha=16)
mlp.down: lora(r=8, alpha=16) | ia3
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model = tiny("llama") if args.model == "tiny" else load_model(smollm2_dir())

    result = surgery.compile(model, SPEC)  # verified before it touches the model
    print(result.report.text())
    counts = result.plan.counts
    print(f"trainable {counts.trainable:,} of {counts.total:,} parameters (+{counts.added:,} added)")

    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        out = result.save(Path(tmp) / "adapted")
        reloaded = surgery.load(out)
        with torch.no_grad():
            same = torch.equal(model(batch).logits, reloaded(batch).logits)
        print(f"saved to {out.name}: {sorted(p.name for p in out.iterdir())}; reload bit-exact: {same}")
        assert same


if __name__ == "__main__":
    main()
