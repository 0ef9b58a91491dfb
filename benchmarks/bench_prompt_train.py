"""One training step (forward + backward + AdamW) on SmolLM2-135M: prefix and prompt tuning, surgery vs PEFT.

    prefix:  surgery.compile(model, "attn: prefix_tuning(20)", check=False)        # the paper's MLP
             PEFT PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True)
    prompt:  surgery.compile(model, "embed: prompt_tuning(20)", check=False)
             PEFT PromptTuningConfig(num_virtual_tokens=20)

PEFT's trainable tensors are overwritten with ours (the same names and layouts: our encoder is PEFT's
``PrefixEncoder`` shape, our prompt table its ``PromptEmbedding``), so both sides train the same
function on the same batches (batch × seq random token ids, labels = ids but
the first, which PEFT's prompt tuning would score from the virtual tokens); the first step's losses
must agree to float noise (later steps drift apart: AdamW turns rounding-level differences in tiny
gradient components into lr-sized updates; the script prints the largest gap). Timing as
in ``bench_lora_train.py``: `warmup` untimed steps, then `steps` timed steps of each, alternating
step by step; the ratio is of the minima (load only adds time), the medians are printed too.

    python benchmarks/bench_prompt_train.py [--only prefix prompt] [--steps 5] [--warmup 2] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from bench_lora_train import Trainer, interleave, step_parser
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

import surgery
from surgery.models import load_model, smollm2_dir
from surgery.transforms.prefix_tuning import find_encoder
from surgery.transforms.prompt_tuning import find_prompt

LENGTH = 20
TARGET_RATIO = 1.0


def prefix(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = copy.deepcopy(base)
    surgery.compile(ours, f"attn: prefix_tuning({LENGTH})", check=False)
    encoder = find_encoder(ours)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH, prefix_projection=True,
                                encoder_hidden_size=encoder.transform[0].out_features)
    theirs = get_peft_model(copy.deepcopy(base), config)
    theirs.prompt_encoder["default"].load_state_dict(encoder.state_dict(), strict=True)
    return ours, theirs


def prompt(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = copy.deepcopy(base)
    surgery.compile(ours, f"embed: prompt_tuning({LENGTH})", check=False)
    theirs = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(find_prompt(ours).prompt_embeddings)
    return ours, theirs


KINDS = {"prefix": prefix, "prompt": prompt}


def run(kind: str, base: torch.nn.Module, args: argparse.Namespace) -> None:
    ours, theirs = KINDS[kind](base)
    trainers = {"ours": Trainer(ours), "peft": Trainer(theirs)}
    n_ours, n_peft = (sum(p.numel() for p in t.params) for t in trainers.values())
    if n_ours != n_peft:
        raise SystemExit(f"{kind}: trainable parameters differ: ours {n_ours:,}, PEFT {n_peft:,}")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)
               for _ in range(args.warmup + args.steps)]
    # PEFT's prompt tuning also scores the first token from the virtual ones; ours scores the input's
    # own next tokens only: that target is masked so both losses are over the same ones.
    times = interleave(trainers, batches, args.warmup, labels=lambda ids: ids.masked_fill(
        torch.arange(ids.shape[1]) == 0, -100))
    first = abs(trainers["ours"].losses[0] - trainers["peft"].losses[0])
    every = max(abs(a - b) for a, b in zip(trainers["ours"].losses, trainers["peft"].losses))
    fastest = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = fastest["ours"] / fastest["peft"]
    print(f"{kind}: SmolLM2-135M, batch {args.batch} x {args.seq}, {LENGTH} virtual tokens, "
          f"{n_ours:,} trainable parameters each")
    print(f"{kind}: losses ours {' '.join(f'{v:.4f}' for v in trainers['ours'].losses)}; "
          f"|loss ours - loss PEFT| first step {first:.2e}, max over {len(batches)} steps {every:.2e}")
    print(f"{kind}: ours {fastest['ours'] * 1e3:.0f} ms, PEFT {fastest['peft'] * 1e3:.0f} ms: ratio {ratio:.3f} "
          f"(medians {median['ours'] / median['peft']:.3f}); target <= {TARGET_RATIO} "
          f"{'OK' if ratio <= TARGET_RATIO else 'MISSED'}")
    # The first step's loss is the same function of the same weights; later steps drift apart by
    # AdamW's normalisation of gradients that differ in float rounding only (tiny components get
    # lr-sized updates), which grows with the batch: reported, not checked.
    if first > 1e-4:
        raise SystemExit(f"{kind}: the two sides do not compute the same loss (first step |dloss| {first:.2e})")


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=list(KINDS), default=list(KINDS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    base = load_model(smollm2_dir())
    for kind in args.only:
        run(kind, base, args)


if __name__ == "__main__":
    main()
