"""The attention program's fast path on SmolLM2-135M: window(…) and window(…, sinks=4) against the
untouched model's sdpa attention, in time and peak memory.

    python benchmarks/bench_attention.py [--only NAME…] [--repeats 3]

Settings (each a ratio ours / untouched, both measured by this run):

* ``prefill4k``: one forward over 4,096 random tokens, with window(512) and window(512, sinks=4);
* ``prefill16k``: one forward over 16,384 tokens with window(4096, sinks=4);
* ``decode``: greedy generate() of 1,500 tokens after a 64-token prompt with window(256, sinks=4)
  (tokens/s), and the process's memory sampled every 256 tokens over a 2,560-token stream (10× the
  cache capacity): flat means the last sample minus the first after one capacity is ~0;
* ``step4k``: one decoding step after a 4,000-token prefill with window(512, sinks=4), and the
  untouched model's step after 64 tokens (the floor: the cost of reading the weights once).

Prefills compute the last position's logits only (``logits_to_keep=1``, as ``generate()`` does), so
the figures are the layers' cost, not a 16k × 49k logits matrix both sides would pay alike.

Method. Time: ours and the untouched model alternate in one process (two copies of the weights),
and the ratio is taken of the fastest runs (load from other processes only adds time).
Memory: torch's CPU allocations are invisible to tracemalloc, so every (model, setting) pair runs
in a fresh subprocess: after loading the model it resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``), runs the task and reads ``VmHWM`` (the peak resident set of the task,
weights included; ``ru_maxrss`` would report model loading's own peak, which is larger). The ratio
is of those peaks; the working set (peak − resident after loading) is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch

SETTINGS = {
    "prefill4k": [("attn: window(512)", 4096), ("attn: window(512, sinks=4)", 4096)],
    "prefill16k": [("attn: window(4096, sinks=4)", 16384)],
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """The resident set's high-water mark since the last reset_peak() (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident set (Linux ≥ 4.0), so the peak
    # measured is the task's, not the model loading's (safetensors briefly holds two copies).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load(spec: str | None):
    import surgery
    from surgery.models import load_model, smollm2_dir

    model = load_model(smollm2_dir())
    if spec:
        surgery.compile(model, spec, check=False)
    return model


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, n: int) -> float:
    x = ids(n)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=x, logits_to_keep=1)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ subprocess side


def child(task: str, spec: str | None, n: int) -> dict:
    """Runs in a fresh process: one task, reports its peak memory."""
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    model = load(spec)
    loaded = rss_mib()
    reset_peak()
    out = {"loaded_mib": loaded}
    if task == "prefill":
        out["seconds"] = prefill(model, n)
    elif task == "stream":  # memory over a stream of n tokens, sampled every 256
        samples = []
        prompt = ids(64)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits
        for t in range(n):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(input_ids=nxt, cache=cache, use_cache=True).logits
            if (t + 1) % 256 == 0:
                samples.append(round(rss_mib(), 1))
                print(f"    stream {t + 1}/{n}: {samples[-1]} MiB", file=sys.stderr, flush=True)
        out["samples_mib"] = samples
        out["cached_keys"] = [layer.keys.shape[-2] for layer in cache.layers][:1]
    out["peak_mib"] = peak_mib()
    return out


def in_subprocess(task: str, spec: str | None, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([task, spec, n])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"failed": result.returncode, "stderr": result.stderr[-400:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ timing side


def best(fn, repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def time_prefills(spec: str, n: int, repeats: int) -> tuple[float, float]:
    base, ours = load(None), load(spec)
    prefill(base, 256), prefill(ours, 256)  # warm-up
    times = {"base": [], "ours": []}
    for r in range(repeats):
        for name, model in (("base", base), ("ours", ours)):
            times[name].append(prefill(model, n))
            print(f"    {spec} {n}: {name} run {r + 1}/{repeats}: {times[name][-1]:.2f} s", flush=True)
    return min(times["ours"]), min(times["base"])


def generate_seconds(model, prompt, new: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, min_new_tokens=new, max_new_tokens=new, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(prompt))
    return time.perf_counter() - start


def step_seconds(model, n: int, steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = ids(n + steps + 1)
    with torch.no_grad():
        model(input_ids=x[:, :n], cache=cache, use_cache=True, logits_to_keep=1)
        times = []
        for t in range(n, n + steps):
            start = time.perf_counter()
            model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=["prefill4k", "prefill16k", "decode", "step4k"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[:3]}")
    rows = []
    for name in ("prefill4k", "prefill16k"):
        if name not in args.only:
            continue
        for spec, n in SETTINGS[name]:
            print(f"{name}: {spec}, {n} tokens", flush=True)
            mem_ours, mem_base = in_subprocess("prefill", spec, n), in_subprocess("prefill", None, n)
            print(f"    memory: ours {mem_ours}, untouched {mem_base}", flush=True)
            ours, base = time_prefills(spec, n, 1 if n > 8192 else args.repeats)
            rows.append((f"prefill {n:,} `{spec}`", ours / base, mem_ours.get("peak_mib", float("nan")) / mem_base["peak_mib"],
                         f"{ours:.2f} s vs {base:.2f} s; peak {mem_ours.get('peak_mib', float('nan')):.0f} vs "
                         f"{mem_base['peak_mib']:.0f} MiB (working {mem_ours.get('peak_mib', 0) - mem_ours.get('loaded_mib', 0):.0f}"
                         f" vs {mem_base['peak_mib'] - mem_base['loaded_mib']:.0f})"))
            print(f"  => time {rows[-1][1]:.3f}×, peak memory {rows[-1][2]:.3f}×", flush=True)
    if "decode" in args.only:
        spec = "attn: window(256, sinks=4)"
        print(f"decode: {spec}, 1,500 tokens after 64", flush=True)
        base, ours = load(None), load(spec)
        prompt = ids(64, seed=1)
        generate_seconds(base, prompt, 8), generate_seconds(ours, prompt, 8)
        times = {"base": [], "ours": []}
        for r in range(args.repeats):
            for name, model in (("base", base), ("ours", ours)):
                times[name].append(generate_seconds(model, prompt, 1500))
                print(f"    {name} run {r + 1}: {1500 / times[name][-1]:.1f} tokens/s", flush=True)
        speed = min(times["base"]) / min(times["ours"])
        del base, ours
        stream = in_subprocess("stream", spec, 2560)
        samples = stream.get("samples_mib", [])
        growth = samples[-1] - samples[0] if samples else float("nan")
        rows.append((f"decode 1,500 after 64 `{spec}` (tokens/s, ours ÷ untouched)", speed, float("nan"),
                     f"{1500 / min(times['ours']):.1f} vs {1500 / min(times['base']):.1f} tokens/s; RSS over a 2,560-token "
                     f"stream every 256: {samples} MiB (growth {growth:+.1f} MiB), cached keys/layer {stream.get('cached_keys')}"))
        print(f"  => tokens/s {speed:.3f}×, stream growth {growth:+.1f} MiB", flush=True)
    if "step4k" in args.only:
        spec = "attn: window(512, sinks=4)"
        print(f"step4k: {spec}, one step after 4,000", flush=True)
        base, ours = load(None), load(spec)
        t_base = min(step_seconds(base, 4000, 10) for _ in range(max(1, args.repeats - 1)))
        t_ours = min(step_seconds(ours, 4000, 10) for _ in range(max(1, args.repeats - 1)))
        # The floor: the untouched model's step after 64 tokens is the weights' cost (every linear
        # layer reads its whole matrix for one token), which no attention surgery can remove.
        t_floor = min(step_seconds(base, 64, 10) for _ in range(max(1, args.repeats - 1)))
        rows.append((f"one decode step after 4,000 `{spec}`", t_ours / t_base, float("nan"),
                     f"{t_ours * 1e3:.1f} ms vs {t_base * 1e3:.1f} ms; the untouched model's step after 64 tokens "
                     f"(the weights' floor) {t_floor * 1e3:.1f} ms = {t_floor / t_base:.3f}×"))
        print(f"  => step time {rows[-1][1]:.3f}×", flush=True)
    print("\n| setting | time ratio | peak memory ratio | detail |\n|---|---|---|---|")
    for name, t, m, detail in rows:
        print(f"| {name} | **{t:.3f}** | {'' if m != m else f'**{m:.3f}**'} | {detail} |")
    print(f"load average at the end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
