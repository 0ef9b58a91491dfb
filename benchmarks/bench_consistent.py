"""Consistent dynamic NTK's prefill past the trained length, on SmolLM2-135M's shapes at N = 16,384.

    python benchmarks/bench_consistent.py [--queries 128] [--old-queries 8] [--repeats 2]

Under ``attn.*: rope(ntk_consistent, scale=2)`` (L = 8,192) the 8,192 queries past L each get their
own base, so each layer scores them explicitly (:func:`surgery.attention.fast.consistent_scores`);
the queries within L run the untouched model's kernels. Past-L queries see 12,288 keys on average,
so a slice of queries ending at column 12,288 + queries/2 (all keys before it) costs, per query,
the layer's average; times 8,192 it is the layer's past-L attention.

Each line is a ratio against the anchor, one untouched SmolLM2 decoder layer (attention and MLP)
over 16,384 tokens, timed in the same process and alternating with the candidates (fastest run of
each), so the machine's load cancels:

* ``fast``: the fast path (``fast.attend`` on the slice);
* ``dense``: the formula the fast path replaced, every query head rotated against a [t, n, D] table
  of both halves (``reference.consistent_scores``, heads repeated, in chunks of 2^24 floats as
  before), then softmax and weights @ v.

A 16k forward costs about 30 × (anchor + past-L attention − the untouched attention of those
queries), so 1 + ratio bounds it from above, in units of the untouched forward.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from surgery.attention import fast, reference
from surgery.attention.keys import Inputs
from surgery.attention.program import ConsistentFrame, PreRope, Program, Stage
from surgery.models import smollm2_dir
from surgery.transforms.rope import RopeParams, build_rope

N, L = 16384, 8192


def dense(rotary, q, k, v, q_pos, k_pos, scaling):
    """The replaced computation: per chunk of queries, [chunk, keys, D] angles for every query head."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    visible = q_pos[:, :, None] >= k_pos[:, None, :]
    chunk = max(1, (1 << 24) // (q.shape[1] * k.shape[-2] * k.shape[-1]))
    outs = []
    for s in range(0, q.shape[-2], chunk):
        scores = reference.consistent_scores(rotary, q[..., s:s + chunk, :], k, q_pos[:, s:s + chunk], k_pos)
        mask = torch.zeros(visible[:, s:s + chunk].shape).masked_fill(~visible[:, s:s + chunk], float("-inf"))
        scores = scores * scaling + mask[:, None]
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--old-queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    config = model.config
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, N, config.hidden_size, generator=g)
    positions = torch.arange(N)[None]
    embeddings = model.model.rotary_emb(hidden, positions)
    rotary = build_rope(RopeParams(kind="ntk_consistent", scale=2.0, original_max_position=L), config)
    program = Program((Stage("rope(ntk_consistent, scale=2)", frame=ConsistentFrame(lambda: rotary), cache=PreRope()),))
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def slice_of(t):
        end = (L + N) // 2 + t // 2
        q = torch.randn(1, heads, t, dim, generator=g)
        k, v = torch.randn(1, kv, end, dim, generator=g), torch.randn(1, kv, end, dim, generator=g)
        return q, k, v, torch.arange(end - t, end)[None], torch.arange(end)[None]

    q, k, v, q_pos, k_pos = slice_of(args.queries)
    x = Inputs(q, k, v, dim ** -0.5, k_raw=True, cos=torch.ones(1, args.queries, dim), sin=torch.zeros(1, args.queries, dim))
    old = slice_of(args.old_queries)
    with torch.no_grad():
        small = slice_of(4)
        got = fast.consistent_scores(rotary, small[0], small[1], small[3], small[4])
        want = reference.consistent_scores(rotary, small[0], small[1].repeat_interleave(heads // kv, 1), small[3], small[4])
        print(f"check: fast vs dense scores at N/2 + 12k, max |Δ| / max |s| = {(got - want).abs().max() / want.abs().max():.2e}")
        tasks = {
            "anchor": (lambda: layer(hidden, position_embeddings=embeddings), None),
            "fast": (lambda: fast.attend(program, x), args.queries),
            "dense": (lambda: dense(rotary, old[0], old[1], old[2], old[3], old[4], dim ** -0.5), args.old_queries),
        }
        best = dict.fromkeys(tasks, float("inf"))
        for _ in range(args.repeats):
            for name, (task, _) in tasks.items():
                start = time.perf_counter()
                task()
                best[name] = min(best[name], time.perf_counter() - start)
    anchor = best["anchor"]
    print(f"anchor: one untouched decoder layer over {N} tokens, {anchor:.2f} s (this machine, now)")
    per_query = {name: best[name] / tasks[name][1] for name in ("fast", "dense")}
    for name, seconds in per_query.items():
        print(f"{name}: {seconds * 1e3:.2f} ms/query; past-L attention per layer ≈ {seconds * (N - L):.1f} s "
              f"= {seconds * (N - L) / anchor:.2f} × the anchor")
    print(f"dense / fast: {per_query['dense'] / per_query['fast']:.1f}")


if __name__ == "__main__":
    main()
