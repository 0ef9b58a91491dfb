"""Inference latency of a LoRA-merged SmolLM2-135M vs the untouched model.

    apply "attn.*, mlp.*: lora(r=16)", perturb every B (so ΔW = s·BA ≠ 0), then build the merged
    model exactly as ``surgery save --merge`` does: io._merged_model(model, plan, merged_steps(…))

Merging folds each adapter into a plain ``nn.Linear`` of the original shape, so the merged model
should cost what the untouched one costs (target ratio 1.00 ± 0.03). Timing: batch × seq random
token ids, eval mode, no grad; merged and untouched forwards alternate, and the ratio is taken of
the minima (load from other processes only adds time; the medians are printed too). Correctness:
the max |logit| difference between the merged model and the unmerged surgered one; the unmerged
one's latency is printed for context.

    python benchmarks/bench_merged_inference.py [--repeats 30] [--batch 1] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import surgery
from surgery.apply import apply_plan
from surgery.io import _merged_model, merged_steps
from surgery.layers import SurgeryLinear
from surgery.models import load_model, smollm2_dir
from surgery.planner import build_plan

SPEC = "attn.*, mlp.*: lora(r=16)"
TARGET, TOLERANCE = 1.00, 0.03


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards of each (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards of each first (default 3)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_grad_enabled(False)

    untouched = load_model(smollm2_dir())
    surgered = copy.deepcopy(untouched)
    plan = build_plan(surgery.parse(SPEC), surgered)
    apply_plan(plan, surgered)
    gen = torch.Generator().manual_seed(0)
    for layer in surgered.modules():
        if isinstance(layer, SurgeryLinear):
            layer.adapter.lora_B.weight.normal_(0.0, 0.02, generator=gen)
    merged_ids = merged_steps(plan, surgered)
    if merged_ids != {s.index for s in plan.steps}:
        raise SystemExit(f"only steps {sorted(merged_ids)} of {len(plan.steps)} are mergeable")
    merged = _merged_model(surgered, plan, merged_ids).eval()
    left = [path for path, m in merged.named_modules() if isinstance(m, SurgeryLinear)]
    if left:
        raise SystemExit(f"the merged model still wraps {len(left)} layers, e.g. {left[0]}")

    ids = torch.randint(0, untouched.config.vocab_size, (args.batch, args.seq), generator=gen)
    logits = {name: m(input_ids=ids).logits for name, m in
              (("untouched", untouched), ("surgered", surgered), ("merged", merged))}
    merge_error = (logits["merged"] - logits["surgered"]).abs().max().item()
    lora_effect = (logits["surgered"] - logits["untouched"]).abs().max().item()

    models = {"merged": merged, "untouched": untouched, "surgered": surgered}
    times = {name: [] for name in models}
    for i in range(args.warmup + args.repeats):
        names = list(models) if i % 2 == 0 else list(reversed(models))
        for name in names:
            elapsed = forward_seconds(models[name], ids)
            if i >= args.warmup:
                times[name].append(elapsed)

    print(f"SmolLM2-135M, {len(plan.linear)} LoRA layers merged; forward batch {args.batch} x {args.seq}, "
          f"{args.repeats} interleaved repeats")
    print(f"max |logit merged - logit unmerged surgered|: {merge_error:.2e}  "
          f"(the perturbed LoRA itself moves logits by up to {lora_effect:.2e})")
    for name, values in times.items():
        print(f"{name:9s}: median {statistics.median(values) * 1e3:7.2f} ms   min {min(values) * 1e3:7.2f} ms")
    # The headline is the ratio of minima: load from other processes only ever adds time.
    ratio = min(times["merged"]) / min(times["untouched"])
    median = statistics.median(times["merged"]) / statistics.median(times["untouched"])
    unmerged = min(times["surgered"]) / min(times["untouched"])
    print(f"ratio of medians merged/untouched {median:.3f}; unmerged surgered/untouched (minima) {unmerged:.3f}")
    print(f"RATIO merged_inference merged/untouched = {ratio:.3f} (target {TARGET:.2f} +- {TOLERANCE})")


if __name__ == "__main__":
    main()
