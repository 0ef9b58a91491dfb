"""Aten ops per layer per decoding step under generate(), the untouched model against a windowed one.

    python benchmarks/ops_decode.py [--spec "attn: window(256, sinks=4)"] [--new 320] [--steps 20]

Time on a shared machine is noisy; the number of ops a decoding step dispatches is not, and on a
small model each op costs about the same few microseconds of Python and dispatch. The script runs
greedy ``generate()`` on SmolLM2-135M (a 64-token prompt, ``--new`` tokens: past the cache's first
eviction, so most steps are in the steady state) under ``torch.profiler`` and counts the top-level
aten ops (those called from Python, not from inside another op) of the last ``--steps`` steps of both models; the difference
divided by layers × steps is what the program adds to each layer's step, and the untouched model's
attention (cache update + sdpa) is about 5 ops.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch
from torch.profiler import ProfilerActivity, profile


class Steps:
    """A logits processor that marks each decoding step for the profiler's schedule."""

    def __init__(self, prof):
        self.prof = prof

    def __call__(self, input_ids, scores):
        self.prof.step()
        return scores


def count(model, prompt, new: int, steps: int) -> collections.Counter:
    """Top-level aten ops of the last `steps` decoding steps of a generate() of `new` tokens."""
    from transformers import LogitsProcessorList

    names: collections.Counter = collections.Counter()

    def keep(prof):
        for event in prof.events():
            parent = event.cpu_parent
            if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
                names[event.name] += 1

    schedule = torch.profiler.schedule(wait=new - steps - 1, warmup=1, active=steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule, on_trace_ready=keep) as prof:
        model.generate(prompt, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt), logits_processor=LogitsProcessorList([Steps(prof)]))
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="attn: window(256, sinks=4)")
    parser.add_argument("--new", type=int, default=320)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    import surgery
    from surgery.models import load_model, smollm2_dir

    base, ours = load_model(smollm2_dir()), load_model(smollm2_dir())
    surgery.compile(ours, args.spec, check=False)
    prompt = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    layers = base.config.num_hidden_layers
    counts = {name: count(model, prompt, args.new, args.steps) for name, model in (("untouched", base), ("ours", ours))}
    per = {name: sum(c.values()) / (args.steps * layers) for name, c in counts.items()}
    print(f"top-level aten ops per layer per step (the last {args.steps} of {args.new} new tokens, {layers} layers): "
          f"untouched {per['untouched']:.1f}, ours {per['ours']:.1f}, added {per['ours'] - per['untouched']:+.1f}")
    diff = counts["ours"].copy()
    diff.subtract(counts["untouched"])
    print("per layer-step, ours − untouched, by op:")
    for name, n in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        if n:
            print(f"  {n / (args.steps * layers):+6.2f}  {name}")


if __name__ == "__main__":
    main()
