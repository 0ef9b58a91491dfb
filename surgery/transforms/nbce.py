"""NBCE, naive-Bayes context extension: a context longer than the model's split into chunks, decoded as a batch.

Given a question T (the prompt) and a context S split into n consecutive chunks S_1 … S_n of
``chunk`` tokens (the last may be shorter), naive Bayes (the chunks independent given T) gives

    log p(T | S_1 … S_n) = Σ_k log p(T | S_k) − (n − 1) · log p(T) + const,

which Su generalises, with a pooling of the n conditional distributions and a weight β, to

    log p(x | S, T) = (1 + β) · pool_k log p(x | S_k, T) − β · log p(x | T)     (normalised over x)

for the next token x: ``pool=mean`` averages the n log-probability vectors (β = n − 1 is naive
Bayes exactly), ``pool=entropy`` takes the one chunk whose distribution has the least entropy (the
chunk most certain of the answer: Su's later choice). Each step runs n + 1 rows as one batch —
chunk k followed by the question and the tokens generated so far, and one row of the question and
those tokens alone (p(x | T), needed only when β ≠ 0) — with a KV cache; every row gets the chosen
token. No row ever sees more than ``chunk`` + question + answer tokens, so the positions stay
within what the model was trained on, whatever the context's length.

One chunk (a context of at most ``chunk`` tokens, or none) has nothing to combine: naive Bayes
with n = 1 is p(x | S_1, T) itself, so decoding is the untouched model's on context + question,
whatever β. The correction −β·log p(x | T) only applies for n ≥ 2.

Usage, once ``generate: nbce(chunk=…)`` is applied (batch 1: the batch is the chunks)::

    out = model.generate(question_ids, context=context_ids, max_new_tokens=32)   # question + answer

``input_ids`` is the question (every row ends with it; put any special tokens where the model
expects them); ``context`` ([Lc] or [1, Lc] token ids) is what gets split. Without ``context`` the
prompt is generated from as the untouched model would, and a prompt longer than ``chunk`` is
refused (pass its context apart). Greedy and sampling settings are ``generate()``'s
(:mod:`surgery.anchors.decoding`); logits processors see the question and the answer, not the context.

Known weaknesses (stated by Su): the chunks are an unordered set — NBCE ignores the order of the
context, so "which came first" questions fail; each chunk sees only itself, so facts spread over
two chunks are not combined. Su's reference also nudges the entropy choice towards the previous
step's chunk and keeps the pooled scores where log p(x | T) is below −100; neither is done here.

Su 2023, "NBCE: 使用朴素贝叶斯扩展LLM的Context处理长度", https://kexue.fm/archives/9617
(https://github.com/bojone/NBCE).

Obligations (log-probabilities compared relative to their scale, tol 1e-5; decoding checks use a
chunk of min(chunk, 8) tokens so that a few chunks stay cheap on any model):

* one chunk equals the untouched model: the same greedy tokens and log-probabilities as the
  untouched ``generate()`` on context + question, with the step's own β.
* n identical chunks with β = 0 equal the untouched model on one chunk + question.
* β = 0 with mean pooling equals averaging by hand: each step's log-probabilities equal the mean,
  renormalised, of fresh (uncached, unpadded) forwards of every chunk + question + answer so far.
* the step's own β and pooling equal the formula by hand, the same way (with the unconditioned row).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from surgery.anchors.decoding import GenerationError
from surgery.transforms.registry import Anchor, Params, obligation, transform

TESTED_CHUNK = 8  # the chunk the decoding obligations use when the step's is longer


class NBCEParams(Params):
    chunk: int = Field(ge=1, description="context tokens per row of the batch")
    beta: float = Field(0.25, ge=0, description="weight of the correction by the unconditioned distribution")
    pool: Literal["entropy", "mean"] = Field("entropy", description="how the chunks' distributions combine")


def chunks_of(context: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """`context` ([Lc] or [1, Lc]) as consecutive pieces of `chunk` tokens (the last may be shorter)."""
    if context.dim() == 2:
        if context.shape[0] != 1:
            raise GenerationError(f"nbce takes one context per call ([Lc] or [1, Lc]), got shape {tuple(context.shape)}")
        context = context[0]
    return list(context.split(chunk)) if context.numel() else []


def combine(log_probs: torch.Tensor, n: int, beta: float, pool: str) -> torch.Tensor:
    """Rows 0..n−1 conditioned on a chunk, row n (when β ≠ 0 and n ≥ 2) the question alone → [V], normalised."""
    if n <= 1:
        return log_probs[0]
    conditioned = log_probs[:n]
    if pool == "mean":
        pooled = conditioned.mean(0)
    else:
        entropy = -(conditioned.exp() * conditioned).sum(-1)
        pooled = conditioned[entropy.argmin()]
    if beta:
        pooled = (1 + beta) * pooled - beta * log_probs[n]
    return torch.log_softmax(pooled, dim=-1)


def _batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths left-padded (id 0) into ([R, T] ids, [R, T] attention mask)."""
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


@transform("nbce", params=NBCEParams, anchor=Anchor.DECODING, positional=("chunk",),
           reference="https://kexue.fm/archives/9617")
class NBCE:
    """Naive-Bayes context extension: the context in chunks decoded as a batch, log-probs pooled."""

    splits_context = True  # generate(question, context=…): callers with a long prompt pass its context apart

    def next_token_scores(self, p: NBCEParams, model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, extra: dict[str, Any]) -> Generator[torch.Tensor, torch.Tensor, None]:
        from transformers import DynamicCache

        context = extra.pop("context", None)
        if extra:
            raise GenerationError(f"nbce generation takes no argument {', '.join(map(repr, sorted(extra)))} "
                            "(its own is context=…)")
        if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
            raise GenerationError("nbce generates for one question at a time, unpadded (its batch is the context's chunks); "
                            f"got input_ids of shape {tuple(input_ids.shape)}")
        if context is None and input_ids.shape[1] > p.chunk:
            raise GenerationError(f"nbce(chunk={p.chunk}) extends a context: pass it apart from the question, "
                            "model.generate(question_ids, context=context_ids)")
        question = input_ids[0]
        pieces = chunks_of(context, p.chunk) if context is not None else []
        n = len(pieces)
        rows = [torch.cat([c.to(question), question]) for c in pieces] or [question]
        if n >= 2 and p.beta:
            rows.append(question)  # the unconditioned row: p(x | T)
        ids, mask = _batch(rows)
        position = mask.cumsum(-1) - 1
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position.clamp(min=0), cache=cache,
                       use_cache=True).logits[:, -1]
        last = position[:, -1:]
        while True:
            chosen = yield combine(torch.log_softmax(logits.float(), dim=-1), n, p.beta, p.pool)[None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            last = last + 1
            logits = model(input_ids=chosen.reshape(1, 1).expand(len(rows), 1), attention_mask=mask,
                           position_ids=last, cache=cache, use_cache=True).logits[:, -1]

    # ---------------------------------------------------------------------------- obligations

    @staticmethod
    def _run(model: nn.Module, p: NBCEParams, question: torch.Tensor, context: torch.Tensor | None,
             new: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(new tokens [new], log-probs [new, V]) of greedy NBCE decoding with `p`."""
        from surgery.anchors.decoding import generate

        out = generate(model, NBCE(), p, question, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       return_dict_in_generate=True, output_logits=True, context=context)
        return out.sequences[0, question.shape[1]:], torch.cat(out.logits)

    @staticmethod
    def _inputs(check, p: NBCEParams, chunks: float, salt: int) -> tuple[NBCEParams, torch.Tensor, torch.Tensor]:
        """(params with the tested chunk, a 4-token question, a context of `chunks` tested chunks)."""
        tested = p.model_copy(update={"chunk": min(p.chunk, TESTED_CHUNK)})
        question = check.tokens(batch=1, length=4, salt=salt)
        context = check.tokens(batch=1, length=max(1, round(chunks * tested.chunk)), salt=salt + 1)
        return tested, question, context

    @staticmethod
    def _by_hand(check, model: nn.Module, p: NBCEParams, question, context, answer) -> torch.Tensor:
        """Each step's log-probs from fresh forwards of each chunk + question + answer so far, pooled by hand."""
        pieces = list(context[0].split(p.chunk))
        steps = []
        for t in range(answer.numel()):
            tail = torch.cat([question[0], answer[:t]])
            conditioned = torch.stack([torch.log_softmax(check.logits(model, torch.cat([c, tail])[None])[0, -1], -1)
                                       for c in pieces])
            if len(pieces) == 1:
                steps.append(conditioned[0])
                continue
            if p.pool == "mean":
                pooled = conditioned.sum(0) / len(pieces)
            else:
                pooled = min(conditioned, key=lambda lp: -(lp.exp() * lp).sum().item())
            alone = torch.log_softmax(check.logits(model, tail[None])[0, -1], -1)
            steps.append(torch.log_softmax((1 + p.beta) * pooled - p.beta * alone, -1))
        return torch.stack(steps)

    @obligation("one chunk equals the untouched model (tokens, log-probs)", tol=1e-5)
    def one_chunk(self, p: NBCEParams, check) -> float:
        tested, question, context = self._inputs(check, p, 1, salt=1)
        tokens, log_probs = self._run(check.surgered, tested, question, context)
        prompt = torch.cat([context, question], dim=1)
        with torch.no_grad():
            want = check.original.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                           min_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                           output_logits=True, pad_token_id=0)
        if not torch.equal(tokens, want.sequences[0, prompt.shape[1]:]):
            return float("inf")
        return check.max_rel(log_probs, torch.log_softmax(torch.cat(want.logits).float(), -1))

    @obligation("n identical chunks with beta = 0 equal the untouched model", tol=1e-5)
    def identical_chunks(self, p: NBCEParams, check) -> float:
        tested, question, one = self._inputs(check, p.model_copy(update={"beta": 0.0}), 1, salt=3)
        tokens, log_probs = self._run(check.surgered, tested, question, one.repeat(1, 3))
        # By hand with the one chunk: the untouched model on chunk + question + answer, step by step.
        return check.max_rel(log_probs, self._by_hand(check, check.original, tested, question, one, tokens))

    @obligation("beta = 0 with mean pooling equals averaging by hand", tol=1e-5)
    def mean_by_hand(self, p: NBCEParams, check) -> float:
        tested, question, context = self._inputs(check, p.model_copy(update={"beta": 0.0, "pool": "mean"}), 2.5, salt=5)
        tokens, log_probs = self._run(check.surgered, tested, question, context)
        return check.max_rel(log_probs, self._by_hand(check, check.original, tested, question, context, tokens))

    @obligation("its beta and pooling equal the formula by hand", tol=1e-5)
    def formula_by_hand(self, p: NBCEParams, check) -> float:
        tested, question, context = self._inputs(check, p, 2.5, salt=7)
        tokens, log_probs = self._run(check.surgered, tested, question, context)
        return check.max_rel(log_probs, self._by_hand(check, check.original, tested, question, context, tokens))
