"""Log-n scaling: sharpen the attention of queries past the trained length ("entropy invariance").

The scores of query i (stream index, 0 = each row's first real token) are multiplied by

    s(i) = max(1, log_L(i + 1)) = max(1, ln(i + 1) / ln L)

so a query that sees n > L keys spreads its attention about as it did over L keys: the entropy of
softmax(s·q·k) over n keys stays near that over L. For i + 1 ≤ L, s = 1 exactly: the model is
untouched within its trained length. Su 2021, https://kexue.fm/archives/8823; Qwen-1's
``use_logn_attn`` (``logn_list = [max(1, log_L(p))]`` for 1-based positions p, applied to the
query), https://huggingface.co/Qwen/Qwen-7B. L defaults to the model's ``max_position_embeddings``.

It is a query scale of the attention program (:mod:`surgery.attention`): the factor multiplies the
tile's queries, so scores are s(i)·q_i·k_j·scaling (a bias such as ALiBi's is added after). Because
i counts from each row's first real token, a left-padded row is scaled like the row alone, and
cached decoding computes each new query's i from the stream's length, as the full forward does.
It composes with a rope rewrite (which moves positions) and with a window (which bounds the keys:
s keeps growing with i although a windowed query sees at most w keys, as in the reference recipes
that pair log-n with NTK and ReRoPE, not with windows).

Obligations (float32, tol 1e-5 relative). Lengths past L are needed, so for L > 24 the installed
machinery is checked with L = 16 (the same stage, another constant):

* identity for n ≤ L: N = L (the boundary) and N = L/2 give the untouched model's logits;
* each layer equals the untouched layer with its ``scaling`` multiplied by s(i), row by row (the
  model's own attention, once per distinct factor, as the oracle), N = 3L;
* cached decode equals the full forward (prefill, then token by token past L);
* a left-padded row equals the row alone (rows longer and shorter than L, full forward and decode);
* the program equals its dense reference (tiles smaller than the sequence, a left-padded row).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
from pydantic import Field
from torch import nn

from surgery.attention import ATTR, Program, Stage, install, require_causal, rotary_ref
from surgery.attention.checks import decode_vs_full, fast_vs_dense
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform

TESTED = 16  # L the obligations run with when the model's is longer than 24


class LognParams(Params):
    length: int | None = Field(None, ge=2, description="trained length L (default: max_position_embeddings)")


@dataclass(frozen=True)
class LogScale:
    """s(i) = max(1, log_L(i + 1)) (a :class:`surgery.attention.program.QueryScale`)."""

    length: int

    def __call__(self, i: torch.Tensor) -> torch.Tensor:
        return (torch.log1p(i.clamp(min=0).double()) / math.log(self.length)).clamp(min=1.0).float()


def logn_stage(length: int | None, span=None) -> Stage:
    """The program stage: a query scale (`length` None only when planning, before the model is read)."""
    return Stage(f"logn({length})" if length else "logn()", span, scale=(LogScale(length),) if length else ())


def _length(p: LognParams, config) -> int | None:
    return p.length or getattr(config, "max_position_embeddings", None)


@transform("logn", params=LognParams, anchor=Anchor.ATTENTION, positional=("length",),
           reference="https://kexue.fm/archives/8823")
class Logn:
    """Log-n attention scaling: queries past the trained length L sharpened by log_L(i + 1)."""

    def stage(self, p: LognParams, span=None) -> Stage:
        return logn_stage(p.length, span)

    def accepts(self, p: LognParams, target, module: nn.Module) -> bool:
        require_causal("logn() scales queries by their position in a causal stream", target, module)
        if _length(p, getattr(module, "config", None)) is None:
            raise SpecError("logn() needs the trained length: the model's config has no max_position_embeddings, "
                            "so give it as logn(L)")
        return True

    def apply(self, p: LognParams, model: nn.Module, targets, edit) -> None:
        install(edit, model, [model.get_submodule(t.path) for t in targets], logn_stage(_length(p, model.config)))

    # ---------------------------------------------------------------------------- obligations

    @contextlib.contextmanager
    def _testable(self, p: LognParams, check):
        """The installed machinery with a trained length short enough to run past (16 when L > 24)."""
        length = _length(p, check.config)
        if length <= 24:
            yield length
            return
        modules = [check.module(t.path) for t in check.targets]
        old = [getattr(m, ATTR) for m in modules]
        swap = lambda s: replace(s, scale=tuple(LogScale(TESTED) if isinstance(f, LogScale) else f  # noqa: E731
                                                for f in s.scale))
        try:
            for m, program in zip(modules, old):
                setattr(m, ATTR, Program(tuple(swap(s) for s in program.stages)))
            yield TESTED
        finally:
            for m, program in zip(modules, old):
                setattr(m, ATTR, program)

    @obligation("identity for n ≤ L (rel.)", tol=1e-5)
    def identity_within(self, p: LognParams, check) -> float:
        with self._testable(p, check) as L:
            errors = [check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))
                      for ids in (check.tokens(length=L, salt=1), check.tokens(length=max(1, L // 2), salt=2))]
            ids = check.tokens(length=3 * L, salt=1)  # and past L it must act, or this shows nothing
            if check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids)) < 1e-4:
                return math.inf
        return max(errors)

    @obligation("each layer equals the untouched layer with scaling × s(i) (rel.)", tol=1e-5)
    def scaled_rows(self, p: LognParams, check) -> float:
        errors = [0.0]
        with self._testable(p, check) as L:
            n = 3 * L
            factors = torch.tensor([max(1.0, math.log(i + 1) / math.log(L)) for i in range(n)])  # the definition
            rotary = rotary_ref(check.surgered)
            for k, t in enumerate(check.targets):
                module, original = check.module(t.path), check.module(t.path, surgered=False)
                x = check.randn(2, n, check.config.hidden_size, salt=k)
                kwargs = {}
                if rotary is not None:
                    kwargs["position_embeddings"] = rotary()(x, torch.arange(n)[None])
                with torch.no_grad():
                    got = module(x, attention_mask=None, **kwargs)[0]
                    want = torch.empty_like(got)
                    scaling = original.scaling
                    try:
                        for factor in factors.unique():
                            rows = factors == factor
                            original.scaling = scaling * factor.item()
                            want[:, rows] = original(x, attention_mask=None, **kwargs)[0][:, rows]
                    finally:
                        original.scaling = scaling
                errors.append(check.max_rel(got, want))
        return max(errors)

    @obligation("cached decode equals the full forward (rel.)", tol=1e-5)
    def cached_decode(self, p: LognParams, check) -> float:
        with self._testable(p, check) as L:
            return decode_vs_full(check, check.surgered, length=2 * L + 5, prefill=L // 2 + 1)

    @obligation("a left-padded row equals the row alone (rel.)", tol=1e-5)
    def padded_rows(self, p: LognParams, check) -> float:
        with self._testable(p, check) as L:
            lengths = (2 * L + 5, L + 3, L // 2)
            return max(check.padded_rows_error(check.surgered, lengths, generate_positions=True),
                       check.padded_rows_error(check.surgered, lengths, generate_positions=True, decode=3))

    @obligation("program equals its dense reference (rel.)", tol=1e-5)
    def dense_reference(self, p: LognParams, check) -> float:
        with self._testable(p, check) as L:
            return fast_vs_dense(check, check.surgered, lengths=(2 * L, 2 * L + 3), tile=max(2, L // 3))
