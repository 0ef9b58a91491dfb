"""Sliding window with re-computation: every new token from a fresh forward over the last w tokens.

Token t+1 is chosen from the untouched model run, without a cache, on x[t−w+1 … t] at positions
0 … w−1 (fewer tokens while the sequence is shorter than w):

    log p(x_{t+1} | x_{≤t}) ≈ log p_model(x_{t+1} | x_{t−w+1 … t})

Nothing of the model changes and every step is a forward the model was trained for, so this is
the exact-quality baseline StreamingLLM's window with attention sinks (``window(w, sinks=4)``) is
measured against — at the cost of O(w²) attention per token instead of O(w): Xiao et al. report
StreamingLLM up to 22× faster at equal perplexity.

It is a decoding strategy, not a mask: the window slides over the *input* of each forward, and a
window mask over one long forward (``window(w)``) differs from it (there, token t's keys saw their
own windows in lower layers, reaching back up to layers·w tokens). So it lives on the decoding
anchor — ``generate: recompute(4096)`` — rather than as an option of ``window``, which is a stage
of each attention module's program.

A left-padded batch slides each row's window over its real tokens (the attention mask slides
along). Generation settings are ``generate()``'s (:mod:`surgery.anchors.decoding`).

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", §4.1 and Figure 1(c),
https://arxiv.org/abs/2309.17453.

Obligations (log-probabilities compared relative to their scale, tol 1e-5; decoding runs past the
window, with a window of min(w, 8) tokens):

* each step equals the untouched model on the last w tokens, for a batch whose second row is
  left-padded (a fresh forward of that row's last w real tokens alone, positions from 0);
* within the window it is the untouched model's generation: a prompt and answer of at most w
  tokens give the same greedy tokens and log-probabilities as the untouched ``generate()``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from pydantic import Field
from torch import nn

from surgery.anchors.decoding import GenerationError
from surgery.transforms.registry import Anchor, Params, obligation, transform

TESTED_WINDOW = 8  # the window the obligations decode past when the step's is longer


class RecomputeParams(Params):
    window: int = Field(ge=1, description="tokens each step recomputes from scratch")


@transform("recompute", params=RecomputeParams, anchor=Anchor.DECODING, positional=("window",),
           reference="https://arxiv.org/abs/2309.17453")
class Recompute:
    """Sliding window with re-computation: each token from a fresh forward over the last w tokens."""

    def next_token_scores(self, p: RecomputeParams, model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, extra: dict[str, Any]) -> Generator[torch.Tensor, torch.Tensor, None]:
        if extra:
            raise GenerationError(f"recompute generation takes no argument {', '.join(map(repr, sorted(extra)))}")
        ids, mask = input_ids, attention_mask
        while True:
            window, seen = ids[:, -p.window:], mask[:, -p.window:]
            position = (seen.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=window, attention_mask=seen, position_ids=position, use_cache=False).logits
            chosen = yield torch.log_softmax(logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, chosen[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)

    # ---------------------------------------------------------------------------- obligations

    @staticmethod
    def _run(model, p: RecomputeParams, ids, mask, new: int):
        from surgery.anchors.decoding import generate

        out = generate(model, Recompute(), p, ids, mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits, dim=1)

    @obligation("each step equals the untouched model on the last w tokens", tol=1e-5)
    def last_w_tokens(self, p: RecomputeParams, check) -> float:
        w = min(p.window, TESTED_WINDOW)
        ids = check.tokens(batch=2, length=w + 1, salt=1)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # row 1 left-padded: its first windows hold padding, then slide over real tokens
        ids = ids * mask
        sequences, log_probs = self._run(check.surgered, RecomputeParams(window=w), ids, mask, new=2 * w)
        errors = [0.0]
        for row, start in ((0, 0), (1, 3)):
            real = sequences[row, start:]
            for t in range(2 * w):
                end = ids.shape[1] - start + t  # the row's real tokens before step t
                fresh = check.logits(check.original, real[max(0, end - w):end][None])[0, -1]
                errors.append(check.max_rel(log_probs[row, t], torch.log_softmax(fresh, -1)))
        return max(errors)

    @obligation("within the window it is the untouched model's generation", tol=1e-5)
    def within_window(self, p: RecomputeParams, check) -> float:
        w = min(p.window, TESTED_WINDOW)
        prompt = check.tokens(batch=2, length=max(1, w // 2), salt=2)
        new = w - prompt.shape[1]
        sequences, log_probs = self._run(check.surgered, RecomputeParams(window=w), prompt, torch.ones_like(prompt), new)
        with torch.no_grad():
            want = check.original.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                                           output_logits=True, pad_token_id=0)
        if not torch.equal(sequences, want.sequences):
            return float("inf")
        return check.max_rel(log_probs, torch.log_softmax(torch.stack(want.logits, dim=1).float(), -1))
