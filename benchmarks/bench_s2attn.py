"""S2-Attn in training: the per-group path against the tiled path it replaces and the untouched
model's full attention (the anchor), forward + backward of one SmolLM2-135M attention layer.

    python benchmarks/bench_s2attn.py [--lengths 4096 8192 16384] [--repeats 3]

At each length N the group is g = N/4 (LongLoRA's setting, the recipe's ``G = target / 4``). One
layer (``layers[0].self_attn``, 9 query heads, 3 KV heads, head dim 64) in training mode, on random
hidden states [1, N, 576] that require a gradient (its weights frozen, as LoRA training leaves the
base), rotated as the model rotates them; the time is of ``out = attn(x)`` and ``out.backward(…)``.

* ``full``: the untouched layer (transformers' sdpa attention, causal over all N keys);
* ``groups``: ``s2attn(group=g)``, the per-group path (causal sdpa within each group, batched);
* ``tiled``: the same program with the per-group path switched off (``fast._blocks`` answering
  None), i.e. what training ran before: 256-query tiles, each against its band of g keys with a
  per-head mask.

Method. Time: the three alternate in one process (two copies of the weights) and each figure is the
fastest of its runs (load from other processes only adds time); ratios are against ``full``.
Memory: torch's CPU allocations are invisible to tracemalloc, so each (variant, N) runs in a fresh
subprocess, as in bench_attention.py: after loading the model and making the inputs it resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs forward + backward once and
reads ``VmHWM``; "working" is that peak minus the resident set before the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import warnings

import torch
from bench_attention import peak_mib, reset_peak, rss_mib

VARIANTS = ("full", "groups", "tiled")


def load(variant: str):
    import surgery
    from surgery.models import load_model, smollm2_dir

    model = load_model(smollm2_dir())
    if variant != "full":
        surgery.compile(model, "layers[0].attn: s2attn(group=1024)", check=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def grouped(model, g: int) -> None:
    """Layer 0's program with groups of g (compiled once; the group changes with N)."""
    from surgery.attention import ATTR, Program
    from surgery.transforms.s2attn import s2attn_stage

    setattr(model.model.layers[0].self_attn, ATTR, Program((s2attn_stage(g),)))


@contextlib.contextmanager
def tiled(on: bool):
    """The per-group path switched off: every training call of the program runs tiled, as before it."""
    from surgery.attention import fast

    real = fast._blocks
    if on:
        fast._blocks = lambda program, x: None
    try:
        yield
    finally:
        fast._blocks = real


def inputs(model, n: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, n, model.config.hidden_size, generator=g)
    position_embeddings = model.model.rotary_emb(x, torch.arange(n)[None])
    return x, position_embeddings, torch.randn(1, n, model.config.hidden_size, generator=g)


def step(model, x, position_embeddings, grad) -> float:
    """Seconds of one forward + backward of layer 0's attention."""
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    out = model.model.layers[0].self_attn(x, attention_mask=None, position_embeddings=position_embeddings)[0]
    out.backward(grad)
    seconds = time.perf_counter() - start
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    return seconds


def child(variant: str, n: int) -> dict:
    """Runs in a fresh process: one forward + backward, its peak memory."""
    warnings.filterwarnings("ignore")
    model = load(variant)
    if variant != "full":
        grouped(model, n // 4)
    args = inputs(model, n)
    before = rss_mib()
    reset_peak()
    with tiled(variant == "tiled"):
        seconds = step(model, *args)
    return {"before_mib": before, "peak_mib": peak_mib(), "seconds": seconds}


def in_subprocess(variant: str, n: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps([variant, n])], capture_output=True, text=True)
    if result.returncode != 0:
        return {"failed": result.returncode, "stderr": result.stderr[-400:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[:3]}")
    full, ours = load("full"), load("groups")
    rows = []
    for n in args.lengths:
        grouped(ours, n // 4)
        data = inputs(full, n)
        with torch.no_grad():  # the two paths agree before either is timed
            a = ours.model.layers[0].self_attn(data[0], attention_mask=None, position_embeddings=data[1])[0]
            with tiled(True):
                b = ours.model.layers[0].self_attn(data[0], attention_mask=None, position_embeddings=data[1])[0]
        agree = ((a - b).abs().max() / b.abs().max()).item()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS:
                with tiled(variant == "tiled"):
                    times[variant].append(step(full if variant == "full" else ours, *data))
                print(f"    N={n} g={n // 4} {variant} run {r + 1}/{args.repeats}: {times[variant][-1]:.2f} s", flush=True)
        memory = {v: ({} if args.no_memory else in_subprocess(v, n)) for v in VARIANTS}
        print(f"    memory: {memory}", flush=True)
        best = {v: min(t) for v, t in times.items()}
        rows.append((n, best, memory, agree))
    print("\n| N (g = N/4) | full attention (anchor) | per-group | tiled (before) | per-group ÷ full | "
          "tiled ÷ full | tiled ÷ per-group |\n|---|---:|---:|---:|---:|---:|---:|")
    for n, best, memory, _ in rows:
        def cell(v, memory=memory, best=best):
            peak = memory[v].get("peak_mib")
            working = "" if peak is None else f"; {peak - memory[v]['before_mib']:,.0f} MiB working"
            return f"{best[v]:.2f} s{working}"
        print(f"| {n:,} | {cell('full')} | {cell('groups')} | {cell('tiled')} | **{best['groups'] / best['full']:.3f}** | "
              f"{best['tiled'] / best['full']:.3f} | **{best['tiled'] / best['groups']:.2f}** |")
    print("per-group vs tiled outputs, max rel. difference: " + ", ".join(f"{n:,}: {agree:.1e}" for n, _, _, agree in rows))
    print(f"load average at the end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
