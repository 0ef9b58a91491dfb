"""One training step (forward + backward + AdamW) on SmolLM2-135M: Houlsby adapters vs LoRA, same layers.

    adapter:  surgery.compile(model, "layers: adapter(houlsby)", check=False)   # after attn and FFN
    lora:     surgery.compile(model, "attn.*, mlp.*: lora(r=16, alpha=32)", check=False)

Both adapt every decoder layer of identical copies of the base model (AdapterHub has no release for
transformers 5, so there is no third-party anchor: this is the figure issue 8 asks to report, not a
target). Each side's zero-initialised half (the adapters' up-projection, LoRA's B) is drawn at random
first, so the step trains a model that differs from the base. Timing: `warmup` untimed steps, then
`steps` timed steps of each, alternating step by step so that load from other processes hits both
alike; the ratio is of the minima (load only adds time), the medians are printed too.

    python benchmarks/bench_adapter_train.py [--steps 5] [--warmup 2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import copy
import statistics
import sys
import warnings

import torch
from bench_lora_train import Trainer, step_parser

import surgery
from surgery.models import load_model, smollm2_dir
from surgery.transforms.adapter import BottleneckAdapter
from surgery.transforms.lora import LoraAdapter

SPECS = {"adapter": "layers: adapter(houlsby)", "lora": "attn.*, mlp.*: lora(r=16, alpha=32)"}


def built(base: torch.nn.Module, spec: str, gen: torch.Generator) -> torch.nn.Module:
    model = copy.deepcopy(base)
    surgery.compile(model, spec, check=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(0.0, 0.01, generator=gen)
            elif isinstance(m, LoraAdapter):
                m.lora_B.weight.normal_(0.0, 0.01, generator=gen)
    return model


def main() -> None:
    parser = step_parser(__doc__)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    base = load_model(smollm2_dir())
    gen = torch.Generator().manual_seed(0)
    trainers = {name: Trainer(built(base, spec, gen)) for name, spec in SPECS.items()}
    vocab = base.config.vocab_size
    del base
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
               for _ in range(args.warmup + args.steps)]
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i, ids in enumerate(batches):
        order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
        for name in order:
            elapsed = trainers[name].step(ids)
            if i >= args.warmup:
                times[name].append(elapsed)
            print(f"step {i + 1}/{len(batches)} {name}: {elapsed * 1e3:.0f} ms", file=sys.stderr, flush=True)

    print(f"SmolLM2-135M, batch {args.batch} x {args.seq}")
    for name, trainer in trainers.items():
        n = sum(p.numel() for p in trainer.params)
        print(f"{name:7s} {SPECS[name]!r}: {n:,} trainable parameters; "
              f"losses {' '.join(f'{v:.4f}' for v in trainer.losses)}")
        print(f"{name:7s} x{len(times[name])}:  median {statistics.median(times[name]) * 1e3:8.1f} ms/step   "
              f"min {min(times[name]) * 1e3:8.1f} ms/step")
    ratio = min(times["adapter"]) / min(times["lora"])
    print(f"ratio of medians {statistics.median(times['adapter']) / statistics.median(times['lora']):.3f}")
    print(f"RATIO adapter_train houlsby/lora(r=16) = {ratio:.3f} (reported, no target)")


if __name__ == "__main__":
    main()
