"""ALiBi: attention with linear biases. Press, Smith and Lewis 2021, "Train Short, Test Long",
https://arxiv.org/abs/2108.12409 (https://github.com/ofirpress/attention_with_linear_biases).

Head h (1-based) of H adds a penalty proportional to the distance to every score:

    score_h(i, j) = q_i·k_j·scaling − m_h·(i − j)          (i, j: stream indices, j ≤ i)

with geometric slopes m_h = 2^(−8h/H) when H is a power of two. Otherwise (the paper's rule, also
BLOOM's): with P = 2^⌊log₂ H⌋, the P slopes of P heads, then the first H − P of the slopes of 2P
heads taken every other one (2^(−4(2e−1)/P), e = 1 … H − P). BLOOM adds m_h·j instead, which differs
by −m_h·i, the same for a whole row, so the softmax is the same (transformers' ``build_alibi_tensor``
is the oracle). The bias only depends on i − j, so it is computed per tile of queries against the key
band the tile sees (never N × N), left padding does not move it and cached decoding reproduces it.

``rope`` decides what happens to a rotary model's own positions (the paper's models have none):

* ``keep`` (default): RoPE stays and ALiBi is added on top. A RoPE model that was not trained with
  ALiBi sees every score lowered in proportion to distance, strongly (m_1 = 1/2 for 8 heads): its
  heads become local and its outputs change at every length, short ones too. It needs fine-tuning
  with the bias before it is useful; what it buys is a recency prior that RoPE alone lacks past L.
* ``drop``: queries and keys are not rotated at all (the attention module is handed the identity
  rotation, so its KV cache holds un-rotated keys) and the biases are the only positional signal,
  as in the paper. A RoPE-trained model then loses the positional information its weights rely on
  and produces nonsense until it is trained again (a model trained with ALiBi and no positional
  embedding is what ``drop`` describes). Needs a rotary model; it occupies the attention frame, so it
  clashes with ``window(…, sinks=…)`` (whose sink frame re-rotates keys).

Models with learned absolute positions (GPT-2) keep them with ``rope=keep``.

With a sink window (``window(w, sinks=S)``) the bias, like RoPE there, is taken at the positions of
the cache: a sink at its slot, the query at min(i, w − 1) (StreamingLLM's contiguous bias for ALiBi
models, not the jump a stream index would give).

Obligations (float32, tol 1e-5 relative unless noted):

* slopes equal BLOOM's for 8, 12, 16 and 9 heads and the model's head count (relative, tol 1e-6:
  BLOOM computes them with float32 powers);
* each layer equals the untouched layer given BLOOM's ALiBi tensor (m_h·j) plus the causal mask as
  an explicit [B, H, N, N] mask (``drop``: given the identity rotation too);
* zero slopes are the identity (``keep``: the untouched model; ``drop``: the untouched model whose
  targeted layers are handed its rotary's output at zero frequencies), so the bias is the only change;
* cached decode equals the full forward; a left-padded row equals the row alone;
* the program equals its dense reference (tiles smaller than the sequence, lengths that are not a
  multiple of the tile, a left-padded row).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from surgery.attention import ATTR, Program, Stage, install, require_causal, rotary_ref
from surgery.attention.checks import decode_vs_full, fast_vs_dense
from surgery.errors import ApplyError, SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform


class AlibiParams(Params):
    rope: Literal["keep", "drop"] = "keep"


@functools.cache
def slopes(heads: int) -> torch.Tensor:
    """m_1 … m_H (float32), the paper's rule for any head count (see the module docstring)."""
    p = 2 ** int(math.floor(math.log2(heads)))
    base = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    extra = [2.0 ** (-4.0 * (2 * e - 1) / p) for e in range(1, heads - p + 1)]
    return torch.tensor(base + extra, dtype=torch.float64).float()


@dataclass(frozen=True)
class AlibiBias:
    """−factor·m_h·(i − j) for each head (a :class:`surgery.attention.program.ScoreBias`)."""

    factor: float = 1.0  # 0: no bias (the identity obligation)

    def __call__(self, i: torch.Tensor, j: torch.Tensor, heads: int) -> torch.Tensor:
        m = slopes(heads).to(i.device) * self.factor
        return -(m[None, :, None, None] * (i - j)[:, None].float())


def _owner(p: AlibiParams) -> str:
    return "alibi(rope=drop)" if p.rope == "drop" else "alibi()"


def alibi_stage(p: AlibiParams, span=None, factor: float = 1.0) -> Stage:
    return Stage(_owner(p), span, bias=(AlibiBias(factor),), unrotated=p.rope == "drop")


def _bloom_slopes(heads: int) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # m_h·j at j = 1


@transform("alibi", params=AlibiParams, anchor=Anchor.ATTENTION, reference="https://arxiv.org/abs/2108.12409")
class Alibi:
    """ALiBi: a per-head linear distance penalty on attention scores, with or without RoPE."""

    def stage(self, p: AlibiParams, span=None) -> Stage:
        return alibi_stage(p, span)

    def accepts(self, p: AlibiParams, target, module: nn.Module) -> bool:
        require_causal("alibi() penalises the distance back to earlier tokens of a causal decoder", target, module)
        config = getattr(module, "config", None)
        if p.rope == "drop" and not getattr(config, "rope_parameters", None):
            raise SpecError(f"alibi(rope=drop) removes rotary position embeddings, but "
                            f"{getattr(config, 'model_type', 'this model')} has none (use alibi())")
        return True

    def apply(self, p: AlibiParams, model: nn.Module, targets, edit) -> None:
        if p.rope == "drop" and rotary_ref(model) is None:
            raise ApplyError("alibi(rope=drop) needs the model's rotary embedding (role 'rotary')")
        install(edit, model, [model.get_submodule(t.path) for t in targets], alibi_stage(p))

    # ---------------------------------------------------------------------------- obligations

    @contextlib.contextmanager
    def _factor(self, check, factor: float):
        """The surgered model with this step's slopes multiplied by `factor`."""
        modules = [check.module(t.path) for t in check.targets]
        old = [getattr(m, ATTR) for m in modules]
        try:
            for m, program in zip(modules, old):
                setattr(m, ATTR, Program(tuple(replace(s, bias=tuple(AlibiBias(factor) if isinstance(b, AlibiBias)
                                                                           else b for b in s.bias))
                                               for s in program.stages)))
            yield check.surgered
        finally:
            for m, program in zip(modules, old):
                setattr(m, ATTR, program)

    @obligation("slopes equal BLOOM's (8, 12, 16, 9 heads and the model's; rel.)", tol=1e-6)
    def bloom_slopes(self, p: AlibiParams, check) -> float:
        heads = getattr(check.config, "num_attention_heads", 8)
        return max(((slopes(n) - _bloom_slopes(n)).abs() / _bloom_slopes(n)).max().item()
                   for n in (8, 12, 16, 9, heads))

    @obligation("each layer equals the untouched layer given BLOOM's ALiBi mask (rel.)", tol=1e-5)
    def bloom_mask(self, p: AlibiParams, check) -> float:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        n, heads = 40, check.config.num_attention_heads
        alibi = build_alibi_tensor(torch.ones(2, n), heads, torch.float32).view(2, heads, 1, n)
        i = torch.arange(n)
        mask = alibi.masked_fill(i[None, :] > i[:, None], torch.finfo(torch.float32).min)  # [2, H, n, n]
        rotary, errors = rotary_ref(check.surgered), [0.0]
        for k, t in enumerate(check.targets):
            module, original = check.module(t.path), check.module(t.path, surgered=False)
            x = check.randn(2, n, check.config.hidden_size, salt=k)
            given, want = {}, {}
            if rotary is not None:
                given["position_embeddings"] = cos, sin = rotary()(x, i[None])
                want["position_embeddings"] = ((torch.ones_like(cos), torch.zeros_like(sin)) if p.rope == "drop"
                                               else (cos, sin))
            with torch.no_grad():
                errors.append(check.max_rel(module(x, attention_mask=None, **given)[0],
                                            original(x, attention_mask=mask, **want)[0]))
        return max(errors)

    @obligation("zero slopes are the identity (rope=drop: against zero rotary frequencies; rel.)", tol=1e-5)
    def zero_slopes(self, p: AlibiParams, check) -> float:
        reference = check.original
        if p.rope == "drop":  # the targeted layers handed the rotary's output at zero frequencies
            reference = copy.deepcopy(check.original)
            still = copy.deepcopy(rotary_ref(reference)())
            still.inv_freq = torch.zeros_like(still.inv_freq)  # cos = 1, sin = 0 at every position

            def zero_frequencies(module, args, kwargs):
                x = kwargs.get("hidden_states", args[0] if args else None)
                return args, {**kwargs, "position_embeddings": still(x, torch.arange(x.shape[1])[None])}

            for t in check.targets:
                reference.get_submodule(t.path).register_forward_pre_hook(zero_frequencies, with_kwargs=True)
        ids = check.tokens(length=24, salt=2)
        with self._factor(check, 0.0) as model:
            got = check.logits(model, ids)
        moved = check.max_rel(check.logits(check.surgered, ids), check.logits(reference, ids))
        if moved < 1e-3:  # the slopes must change the model, or this obligation shows nothing
            return math.inf
        return check.max_rel(got, check.logits(reference, ids))

    @obligation("cached decode equals the full forward (rel.)", tol=1e-5)
    def cached_decode(self, p: AlibiParams, check) -> float:
        return decode_vs_full(check, check.surgered, length=40, prefill=13)

    @obligation("a left-padded row equals the row alone (rel.)", tol=1e-5)
    def padded_rows(self, p: AlibiParams, check) -> float:
        return max(check.padded_rows_error(check.surgered, generate_positions=True),
                   check.padded_rows_error(check.surgered, generate_positions=True, decode=3))

    @obligation("program equals its dense reference (rel.)", tol=1e-5)
    def dense_reference(self, p: AlibiParams, check) -> float:
        return fast_vs_dense(check, check.surgered, lengths=(24, 37), tile=8)
