"""S2-Attn: LongLoRA's shifted sparse attention, for fine-tuning at long lengths (training only).

Chen et al. 2023, "LongLoRA", https://arxiv.org/abs/2309.12307
(https://github.com/dvlab-research/LongLoRA, ``llama_attn_replace.py``). While the model trains,
each query attends only inside its group of g tokens; half of the heads use groups shifted by g/2,
so information crosses group borders from layer to layer:

    heads h <  ⌊H/2⌋:  visible(i, j) ⇔ j ≤ i  and  ⌊i/g⌋ = ⌊j/g⌋
    heads h ≥ ⌊H/2⌋:  visible(i, j) ⇔ j ≤ i  and  ⌊(i + g/2)/g⌋ = ⌊(j + g/2)/g⌋      (g/2 = ⌊g/2⌋)

on stream indices (from each row's first real token). The shifted groups are [0, g/2),
[g/2, 3g/2), …: the first g/2 tokens form a short group of their own. LongLoRA instead rolls the
shifted heads' tokens by −g/2, which puts tokens 0 … g/2 − 1 after the last ones, in the last group,
where the causal mask lets them see the end of the sequence: the future leaks into the start
(LongLoRA issues 15 and 90). That wrap-around is not reproduced. Any length works (LongLoRA needs a
multiple of g); the last group may be short.

In eval mode (``model.eval()``, what ``generate()`` uses) the stage is inactive and attention is the
model's own: S2-Attn is a training-time approximation; the fine-tuned model runs with full attention.
It is a ``train_only`` stage of the attention program with two head rules of :class:`GroupRule`, which
says it is block-diagonal (``blocks()``): in training, on a whole unpadded stream, the fast path runs
each half of the heads as causal attention within its groups — the plain half's N/g whole groups as a
batch of [B·N/g, H/2, g, D] in one fused sdpa call (plus the short last group), the shifted half the
same after its first g/2 tokens — with the backward from autograd through sdpa: O(N·g) time and memory,
never N × N. Left-padded rows, a KV cache and stages that change scores run on the tiled path
(each query tile against the band of g keys before it).

Obligations (float32; training mode with dropout off):

* no information flows from a later token to an earlier one: changing token j leaves every output
  before j unchanged (absolute, tol 0: masked keys contribute exact zeros);
* each head sees exactly its group: each layer equals the untouched layer given the explicit
  [B, H, N, N] block mask above, and differs from it without (rel. 1e-5);
* g ≥ 2N is full attention: with groups that long every head sees every earlier token, so training
  mode equals the untouched model (rel. 1e-5);
* eval mode equals the untouched model (rel. 1e-5);
* the program equals its dense reference in training mode (rel. 1e-5; tiles smaller than the
  sequence, lengths that are not multiples of g; unpadded rows, which run per group, and a
  left-padded row, which runs tiled).

The leak, block-mask and long-group checks run unpadded, so on the per-group path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from pydantic import Field
from torch import nn

from surgery.attention import ATTR, Program, Stage, install, require_causal, rotary_ref
from surgery.attention.checks import causal_leak, fast_vs_dense, mode
from surgery.attention.program import HeadRule
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform


class S2AttnParams(Params):
    group: int = Field(ge=2, description="tokens per group g (the shifted half of the heads is offset by g/2)")


@dataclass(frozen=True)
class GroupRule:
    """visible(i, j) ⇔ ⌊(i + shift)/size⌋ = ⌊(j + shift)/size⌋ (a :class:`surgery.attention.program.MaskRule`)."""

    size: int
    shift: int = 0

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return torch.div(i + self.shift, self.size, rounding_mode="floor") == torch.div(
            j + self.shift, self.size, rounding_mode="floor")

    def reach(self) -> int:
        return self.size

    def blocks(self) -> tuple[int, int]:
        """Block-diagonal: causal attention within each group (the fast path's per-group calls)."""
        return self.size, self.shift


def s2attn_stage(group: int, span=None) -> Stage:
    half = Fraction(1, 2)
    return Stage(f"s2attn(group={group})", span, train_only=True,
                 rules=(HeadRule(GroupRule(group), Fraction(0), half), HeadRule(GroupRule(group, group // 2), half)))


def _block_mask(n: int, heads: int, group: int) -> torch.Tensor:
    """The reference [1, H, n, n] additive mask, written from the definition."""
    mask = torch.full((1, heads, n, n), torch.finfo(torch.float32).min)
    for h in range(heads):
        shift = group // 2 if h >= heads // 2 else 0
        for i in range(n):
            for j in range(i + 1):
                if (i + shift) // group == (j + shift) // group:
                    mask[0, h, i, j] = 0.0
    return mask


@transform("s2attn", params=S2AttnParams, anchor=Anchor.ATTENTION, positional=("group",),
           reference="https://arxiv.org/abs/2309.12307")
class S2Attn:
    """LongLoRA's shifted sparse attention while training (without the roll's future leak); eval: full attention."""

    def stage(self, p: S2AttnParams, span=None) -> Stage:
        return s2attn_stage(p.group, span)

    def accepts(self, p: S2AttnParams, target, module: nn.Module) -> bool:
        require_causal("s2attn() groups the tokens of a causal decoder", target, module)
        heads = getattr(getattr(module, "config", None), "num_attention_heads", 2)
        if heads < 2:
            raise SpecError(f"s2attn() shifts half of the heads, but {target.path} has {heads}")
        return True

    def apply(self, p: S2AttnParams, model: nn.Module, targets, edit) -> None:
        install(edit, model, [model.get_submodule(t.path) for t in targets], s2attn_stage(p.group))

    # ---------------------------------------------------------------------------- obligations

    @staticmethod
    def _group(p: S2AttnParams) -> int:
        return min(p.group, 8)  # groups short enough that the obligations' sequences cross several

    @contextlib.contextmanager
    def _grouped(self, p: S2AttnParams, check, group: int):
        """The installed machinery with groups of `group` tokens."""
        if group == p.group:
            yield group
            return
        modules = [check.module(t.path) for t in check.targets]
        old = [getattr(m, ATTR) for m in modules]
        try:
            for m, program in zip(modules, old):
                setattr(m, ATTR, Program(tuple(s2attn_stage(group, s.span) if s.owner.startswith("s2attn(")
                                               else s for s in program.stages)))
            yield group
        finally:
            for m, program in zip(modules, old):
                setattr(m, ATTR, program)

    @obligation("no information flows from a later token to an earlier one (training)", tol=0.0)
    def no_future(self, p: S2AttnParams, check) -> float:
        with self._grouped(p, check, self._group(p)) as g:
            n = 3 * g + 3
            return causal_leak(check, check.surgered, n, positions=(1, g // 2 - 1, g // 2, g, n - g // 2, n - 1))

    @obligation("each head sees exactly its group (block mask, training; rel.)", tol=1e-5)
    def block_mask(self, p: S2AttnParams, check) -> float:
        errors = [0.0]
        with self._grouped(p, check, self._group(p)) as g, mode(check.surgered, True):
            n = 3 * g + 3
            mask = _block_mask(n, check.config.num_attention_heads, g).expand(2, -1, -1, -1)
            rotary = rotary_ref(check.surgered)
            for k, t in enumerate(check.targets):
                module, original = check.module(t.path), check.module(t.path, surgered=False)
                x = check.randn(2, n, check.config.hidden_size, salt=k)
                kwargs = {}
                if rotary is not None:
                    kwargs["position_embeddings"] = rotary()(x, torch.arange(n)[None])
                with torch.no_grad():
                    got = module(x, attention_mask=None, **kwargs)[0]
                    if check.max_rel(got, original(x, attention_mask=None, **kwargs)[0]) < 1e-4:
                        return math.inf  # the groups did not act: this would show nothing
                    errors.append(check.max_rel(got, original(x, attention_mask=mask, **kwargs)[0]))
        return max(errors)

    @obligation("g ≥ 2N is full attention (training; rel.)", tol=1e-5)
    def long_groups(self, p: S2AttnParams, check) -> float:
        ids = check.tokens(length=24, salt=4)
        with self._grouped(p, check, max(p.group, 48)), mode(check.surgered, True), mode(check.original, True):
            return check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))

    @obligation("eval mode equals the untouched model (rel.)", tol=1e-5)
    def eval_untouched(self, p: S2AttnParams, check) -> float:
        ids = check.tokens(length=3 * self._group(p) + 3, salt=5)
        with mode(check.surgered, False):
            return check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))

    @obligation("program equals its dense reference (training; rel.)", tol=1e-5)
    def dense_reference(self, p: S2AttnParams, check) -> float:
        with self._grouped(p, check, self._group(p)) as g:
            return fast_vs_dense(check, check.surgered, lengths=(3 * g, 3 * g + 3), tile=max(2, g // 3 + 1),
                                 training=True)
