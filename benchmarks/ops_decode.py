"""Aten ops and Python calls per layer per decoding step under generate(), the untouched model against a windowed one.

    python benchmarks/ops_decode.py [--spec "attn: window(256, sinks=4)"] [--new 320] [--steps 20] [--what ops calls time]

Time on a shared machine is noisy; the number of ops a decoding step dispatches is not, and on a
small model each op costs about the same few microseconds of Python and dispatch. The script runs
greedy ``generate()`` on SmolLM2-135M (a 64-token prompt, ``--new`` tokens: past the cache's first
eviction, so most steps are in the steady state) under ``torch.profiler`` and counts the top-level
aten ops (those called from Python, not from inside another op) of the last ``--steps`` steps of both models; the difference
divided by layers × steps is what the program adds to each layer's step, and the untouched model's
attention (cache update + sdpa) is about 5 ops.

``--what calls`` counts Python function calls the same way (``cProfile`` over the same last
steps, in a generate() of its own: every Python function and builtin called, torch's bindings
included), the other load-independent part of a step's cost on a small model; the listing then
names the functions whose calls per layer-step differ most.

``--what time`` times the same steady steps, indicative only on a shared machine: both models
generate in one process, each in its own thread, handing a baton to each other every ``--block``
steps so that exactly one computes at any time (A/B blocks interleaved, so a change in the machine's
load hits both alike); a step's time runs from one logits-processor call to the next of the same
model. It reports the median step of each over the last ``--steps`` steps and the median of the
ratios of paired blocks.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import threading
import time
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


class Window:
    """A logits processor that runs `prof` (a cProfile.Profile) over the forwards of `steps` steps."""

    def __init__(self, prof, first: int, steps: int):
        self.prof, self.first, self.last, self.seen = prof, first, first + steps, 0

    def __call__(self, input_ids, scores):
        if self.seen == self.first:
            self.prof.enable()
        elif self.seen == self.last:
            self.prof.disable()
        self.seen += 1
        return scores


def calls(model, prompt, new: int, steps: int) -> collections.Counter:
    """Python calls (functions and builtins, by name) of the forwards of the last `steps` steps."""
    from transformers import LogitsProcessorList

    prof = cProfile.Profile()
    model.generate(prompt, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt),
                   logits_processor=LogitsProcessorList([Window(prof, new - steps - 1, steps)]))
    names: collections.Counter = collections.Counter()
    for (file, line, name), (_, total, *_rest) in pstats.Stats(prof).stats.items():
        names[f"{name} ({file.rsplit('/', 1)[-1]}:{line})" if line else name] += total
    return names


class Baton:
    """A logits processor that records step times and hands the turn to the other model every `block`
    steps (while the other one still runs)."""

    def __init__(self, turn: threading.Semaphore, block: int):
        self.turn, self.block, self.times, self.last = turn, block, [], None
        self.partner: Baton | None = None
        self.finished = False

    def __call__(self, input_ids, scores):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        if len(self.times) % self.block == 0:
            self.hand_over()
        self.last = time.perf_counter()
        return scores

    def hand_over(self) -> None:
        if not self.partner.finished:
            self.partner.turn.release()
            self.turn.acquire()


def timed(models, prompt, new: int, steps: int, block: int) -> dict[str, list[float]]:
    """Per-step times of the last `steps` steps of each model's generate(), interleaved in blocks."""
    from transformers import LogitsProcessorList

    a, b = batons = [Baton(threading.Semaphore(0), block) for _ in models]
    a.partner, b.partner = b, a

    def run(baton: Baton, model) -> None:
        baton.turn.acquire()
        model.generate(prompt, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt), logits_processor=LogitsProcessorList([baton]))
        baton.finished = True
        baton.partner.turn.release()  # the other model's remaining steps

    threads = [threading.Thread(target=run, args=(baton, model)) for baton, (_, model) in zip(batons, models)]
    for thread in threads:
        thread.start()
    a.turn.release()
    for thread in threads:
        thread.join()
    return {name: baton.times[-steps:] for (name, _), baton in zip(models, batons)}


def report(what: str, counts: dict, steps: int, layers: int, top: int) -> None:
    per = {name: sum(c.values()) / (steps * layers) for name, c in counts.items()}
    print(f"{what} per layer per step (the last {steps} steps, {layers} layers): "
          f"untouched {per['untouched']:.1f}, ours {per['ours']:.1f}, added {per['ours'] - per['untouched']:+.1f}")
    diff = counts["ours"].copy()
    diff.subtract(counts["untouched"])
    print("per layer-step, ours − untouched, by name:")
    for name, n in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        if n:
            print(f"  {n / (steps * layers):+6.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="attn: window(256, sinks=4)")
    parser.add_argument("--new", type=int, default=320)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--what", nargs="+", choices=("ops", "calls", "time"), default=["ops", "calls"])
    parser.add_argument("--block", type=int, default=10, help="steps per A/B block (--what time)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    import surgery
    from surgery.models import load_model, smollm2_dir

    base, ours = load_model(smollm2_dir()), load_model(smollm2_dir())
    surgery.compile(ours, args.spec, check=False)
    prompt = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    layers = base.config.num_hidden_layers
    models = (("untouched", base), ("ours", ours))
    if "ops" in args.what:
        report("top-level aten ops", {name: count(model, prompt, args.new, args.steps) for name, model in models},
               args.steps, layers, args.top)
    if "calls" in args.what:
        report("Python calls", {name: calls(model, prompt, args.new, args.steps) for name, model in models},
               args.steps, layers, args.top)
    if "time" in args.what:
        times = timed(models, prompt, args.new, args.steps, args.block)
        blocks = range(0, args.steps - args.block + 1, args.block)
        ratios = [statistics.median(times["ours"][b:b + args.block]) / statistics.median(times["untouched"][b:b + args.block])
                  for b in blocks]
        print(f"step time, median of the last {args.steps} steps (blocks of {args.block}, interleaved): untouched "
              f"{1e3 * statistics.median(times['untouched']):.2f} ms, ours {1e3 * statistics.median(times['ours']):.2f} ms; "
              f"ours ÷ untouched per block pair: median {statistics.median(ratios):.3f} "
              f"(quartiles {' '.join(f'{q:.3f}' for q in statistics.quantiles(ratios, n=4))}); "
              f"sum of the steps ours ÷ untouched {sum(times['ours']) / sum(times['untouched']):.3f}")


if __name__ == "__main__":
    main()
