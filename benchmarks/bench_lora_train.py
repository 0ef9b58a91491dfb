"""One LoRA training step (forward + backward + AdamW) on SmolLM2-135M: surgery vs PEFT.

    ours:  surgery.compile(model, "attn.*, mlp.*: lora(r=16, alpha=32)", check=False)
    PEFT:  get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0,
                          target_modules=[q,k,v,o,gate,up,down]))

Both start from identical copies of the base model; PEFT's ``lora_A``/``lora_B`` are overwritten with
ours (B perturbed, so the update is not zero), so both train exactly the same function on the same
batches (batch × seq random token ids, labels = ids). Correctness sanity check: the two losses on
the first step, and on every later step (which also checks gradients and the AdamW update), must
agree to float noise. Timing: `warmup` untimed steps, then `steps` timed steps of each, alternating
ours/PEFT step by step so that load from other processes hits both alike; the ratio is of the
minima (load only adds time), the medians are printed too.

    python benchmarks/bench_lora_train.py [--steps 5] [--warmup 2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

import surgery
from surgery.layers import SurgeryLinear
from surgery.models import load_model, smollm2_dir

SPEC = "attn.*, mlp.*: lora(r=16, alpha=32)"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 1.0
LR = 1e-3


def ours(base: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    model = copy.deepcopy(base)
    surgery.compile(model, SPEC, check=False)
    return model, "surgery.compile(check=False)"


def peft(base: torch.nn.Module, ours_model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config)
    inner = model.base_model.model
    copied = 0
    with torch.no_grad():
        for path, layer in ours_model.named_modules():
            if isinstance(layer, SurgeryLinear):
                target = inner.get_submodule(path)
                target.lora_A["default"].weight.copy_(layer.adapter.lora_A.weight)
                target.lora_B["default"].weight.copy_(layer.adapter.lora_B.weight)
                theirs, mine = target.scaling["default"], layer.adapter.scaling
                if theirs != mine:
                    raise SystemExit(f"{path}: scaling differs (PEFT {theirs}, ours {mine})")
                copied += 1
    peft_layers = sum(1 for m in inner.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    if copied != peft_layers:
        raise SystemExit(f"ours adapts {copied} layers, PEFT {peft_layers}")
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainer:
    """One model's training steps; `loss` (batch, outputs → loss) and `optimizer_step` (optimizer → None)
    are the loop's two calls a technique may take over (AdaLoRA's regulariser and allocation, ReLoRA's
    restarts: ``Schedules.loss`` / ``Schedules.optimizer_step``); plain AdamW by default."""

    def __init__(self, model: torch.nn.Module, loss=None, optimizer_step=None):
        self.model = model.train()
        self.params = trainable(model)
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        self.losses: list[float] = []
        self.loss = loss or (lambda batch, outputs: outputs.loss)
        self.optimizer_step = optimizer_step or (lambda optimizer: optimizer.step())

    def step(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Seconds one forward + backward + optimizer step takes (labels: `ids` unless given)."""
        start = time.perf_counter()
        batch = {"input_ids": ids, "labels": ids if labels is None else labels}
        loss = self.loss(batch, self.model(**batch))
        loss.backward()
        self.optimizer_step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.losses.append(loss.item())
        return elapsed


def interleave(trainers: dict[str, Trainer], batches: list[torch.Tensor], warmup: int,
               labels: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Each batch through every trainer in turn (the order alternating, so neither always runs right
    after the other's allocations); the seconds of each step after the first `warmup`, per trainer.
    `labels(ids)` gives a batch's labels (default: the ids)."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for i, ids in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            elapsed = trainers[name].step(ids, None if labels is None else labels(ids))
            if i >= warmup:
                times[name].append(elapsed)
            print(f"step {i + 1}/{len(batches)} {name}: {elapsed * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return times


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training-step bench takes: timed and warm-up steps, batch × sequence."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    return parser


def main() -> None:
    parser = step_parser(__doc__)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    base = load_model(smollm2_dir())
    ours_model, how = ours(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # B = 0 at init would make the first-step loss equal to the base model's on both sides.
        for layer in ours_model.modules():
            if isinstance(layer, SurgeryLinear):
                layer.adapter.lora_B.weight.normal_(0.0, 0.01, generator=gen)
    peft_model = peft(base, ours_model)
    del base
    trainers = {"ours": Trainer(ours_model), "peft": Trainer(peft_model)}
    n_ours, n_peft = (sum(p.numel() for p in t.params) for t in trainers.values())
    if n_ours != n_peft:
        raise SystemExit(f"trainable parameters differ: ours {n_ours:,}, PEFT {n_peft:,}")

    vocab = ours_model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
               for _ in range(args.warmup + args.steps)]
    times = interleave(trainers, batches, args.warmup)

    first = abs(trainers["ours"].losses[0] - trainers["peft"].losses[0])
    every = max(abs(a - b) for a, b in zip(trainers["ours"].losses, trainers["peft"].losses))
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq}, {n_ours:,} trainable parameters each; ours via {how}")
    print(f"losses ours: {' '.join(f'{v:.4f}' for v in trainers['ours'].losses)}")
    print(f"losses peft: {' '.join(f'{v:.4f}' for v in trainers['peft'].losses)}")
    print(f"max |loss ours - loss peft|: first step {first:.2e}, all {len(batches)} steps {every:.2e}")
    for name, values in times.items():
        print(f"{name:5s} x{len(values)}:  median {statistics.median(values) * 1e3:8.1f} ms/step   "
              f"min {min(values) * 1e3:8.1f} ms/step")
    # The headline is the ratio of minima: load from other processes only ever adds time.
    ratio = min(times["ours"]) / min(times["peft"])
    print(f"ratio of medians {statistics.median(times['ours']) / statistics.median(times['peft']):.3f}")
    print(f"RATIO lora_train ours/peft = {ratio:.3f} (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
