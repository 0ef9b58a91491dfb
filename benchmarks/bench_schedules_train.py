"""Training steps with schedules on SmolLM2-135M: AdaLoRA vs PEFT's AdaLoRA, and ReLoRA's restart step.

AdaLoRA (target: ours ≤ 1.0× PEFT per step):

    ours:  surgery.compile(model, "attn.*, mlp.*: adalora(12, 8, total_step=1000)", check=False);
           loss = Schedules.loss(batch, outputs) (+ the orthogonality term), Schedules.optimizer_step
           (AdamW, then importance, budget and masking)
    PEFT:  PeftModel.from_pretrained on the ``peft/`` directory our save wrote (AdaLoraConfig with the
           same fields and tensors); loss = outputs.loss (PEFT adds the term), optimizer.step() then
           ``base_model.update_and_allocate(step)``

Both start from the same tensors (Λ perturbed, so the update is not zero) and train on the same
batches; every step's loss must agree to float noise (the same function, regulariser and allocation).
tinit = tfinal = 0 and delta_t = 1: importance, budget and masking run after every step, the
technique's most expensive setting. Steps alternate ours/PEFT; the ratio is of the minima (load
only adds time), medians printed too.

ReLoRA (target: a restart step costs under one extra training step): one model with
``relora(r=16, alpha=32, restart_every=2, reset=0.99)`` on the same targets, so every second step
ends with a restart (merge B A into W, redraw A, zero B, prune 99 % of the AdamW state by
magnitude). Its cost is (min restart step − min plain step) / min plain step.

    python benchmarks/bench_schedules_train.py [--steps 6] [--warmup 2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings

import torch
from bench_lora_train import Trainer, interleave, step_parser

import surgery
from surgery.models import load_model, smollm2_dir
from surgery.train import Schedules
from surgery.transforms.adalora import AdaLoraAdapter

ADALORA = "attn.*, mlp.*: adalora(12, 8, total_step=1000, tinit=0, tfinal=0, delta_t=1)"
RELORA = "attn.*, mlp.*: relora(r=16, alpha=32, restart_every=2, reset=0.99)"
TARGET_ADALORA = 1.0
TARGET_RESTART = 1.0


def ours(base: torch.nn.Module, spec: str) -> Trainer:
    model = copy.deepcopy(base)
    result = surgery.compile(model, spec, check=False)
    schedules = Schedules(result)
    return Trainer(model, loss=schedules.loss, optimizer_step=schedules.optimizer_step)


def peft_adalora(base: torch.nn.Module, ours_model: torch.nn.Module, result) -> Trainer:
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        result.save(f"{tmp}/out")
        model = PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/out/peft", is_trainable=True)
    steps = [0]

    def optimizer_step(optimizer):
        optimizer.step()
        model.base_model.update_and_allocate(steps[0])  # PEFT's call: after step(), before zero_grad()
        steps[0] += 1

    return Trainer(model, optimizer_step=optimizer_step)


def adalora(base: torch.nn.Module, batches: list[torch.Tensor], warmup: int) -> None:
    model = copy.deepcopy(base)
    result = surgery.compile(model, ADALORA, check=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Λ = 0 at init: the first step would not see the update at all
        for m in model.modules():
            if isinstance(m, AdaLoraAdapter):
                m.lora_E.normal_(0.0, 0.1, generator=gen)
    schedules = Schedules(result)
    trainers = {"ours": Trainer(model, loss=schedules.loss, optimizer_step=schedules.optimizer_step),
                "peft": peft_adalora(base, model, result)}
    n = [sum(p.numel() for p in t.params) for t in trainers.values()]
    if n[0] != n[1]:
        raise SystemExit(f"trainable parameters differ: ours {n[0]:,}, PEFT {n[1]:,}")
    times = interleave(trainers, batches, warmup)
    every = max(abs(a - b) for a, b in zip(trainers["ours"].losses, trainers["peft"].losses))
    print(f"AdaLoRA: {ADALORA!r}, {n[0]:,} trainable parameters each")
    for name, t in trainers.items():
        print(f"  losses {name}: {' '.join(f'{v:.4f}' for v in t.losses)}")
    print(f"  max |loss ours - loss peft| over {len(batches)} steps: {every:.2e}")
    for name, values in times.items():
        print(f"  {name:5s} x{len(values)}:  median {statistics.median(values) * 1e3:8.1f} ms/step   "
              f"min {min(values) * 1e3:8.1f} ms/step")
    print(f"  ratio of medians {statistics.median(times['ours']) / statistics.median(times['peft']):.3f}")
    print(f"RATIO adalora_train ours/peft = {min(times['ours']) / min(times['peft']):.3f} "
          f"(target <= {TARGET_ADALORA})")
    after = after_step(trainers, calls=6)
    print(f"  the optimizer-step call alone (AdamW + importance, budget, masking), random gradients, min of 6: "
          f"ours {after['ours'] * 1e3:.0f} ms, peft {after['peft'] * 1e3:.0f} ms, "
          f"ratio {after['ours'] / after['peft']:.3f}")


def after_step(trainers: dict[str, Trainer], calls: int) -> dict[str, float]:
    """Min seconds of each trainer's optimizer-step call on seeded random gradients (interleaved): the
    technique's own work per step, without the forward and backward both sides share."""
    gen = torch.Generator().manual_seed(2)
    best = dict.fromkeys(trainers, float("inf"))
    for _ in range(calls):
        for name, trainer in trainers.items():
            for param in trainer.params:
                param.grad = torch.randn(param.shape, generator=gen, dtype=param.dtype) * 1e-3
            start = time.perf_counter()
            trainer.optimizer_step(trainer.opt)
            best[name] = min(best[name], time.perf_counter() - start)
            trainer.opt.zero_grad(set_to_none=True)
    return best


def relora(base: torch.nn.Module, batches: list[torch.Tensor], warmup: int) -> None:
    trainer = ours(base, RELORA)
    plain, restart = [], []
    for i, ids in enumerate(batches):
        elapsed = trainer.step(ids)
        if i >= warmup:
            (restart if i % 2 == 1 else plain).append(elapsed)  # step i ends with a restart when (i + 1) % 2 == 0
    print(f"ReLoRA: {RELORA!r}")
    print(f"  plain   x{len(plain)}: median {statistics.median(plain) * 1e3:8.1f} ms/step   "
          f"min {min(plain) * 1e3:8.1f} ms/step")
    print(f"  restart x{len(restart)}: median {statistics.median(restart) * 1e3:8.1f} ms/step   "
          f"min {min(restart) * 1e3:8.1f} ms/step")
    extra = (min(restart) - min(plain)) / min(plain)
    print(f"RATIO relora_restart extra/plain step = {extra:.3f} (target < {TARGET_RESTART})")


def main() -> None:
    parser = step_parser(__doc__)
    parser.set_defaults(steps=6)
    parser.add_argument("--only", choices=("adalora", "relora"), help="run one of the two")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    base = load_model(smollm2_dir())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)
               for _ in range(args.warmup + args.steps)]
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq}, {args.steps} timed steps after {args.warmup}")
    if args.only in (None, "adalora"):
        adalora(base, batches, args.warmup)
    if args.only in (None, "relora"):
        relora(base, batches, args.warmup)


if __name__ == "__main__":
    main()
