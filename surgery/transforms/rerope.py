"""ReRoPE and Leaky ReRoPE: relative positions capped (or slowed) past a window, without training.

For query i and key j (stream indices: counted from each row's first real token), d = i − j, the
score sees the relative position

    P(d) = d                    for d < w
    P(d) = w                    for d ≥ w   (``rerope(window=w)``)
    P(d) = w + (d − w)/k        for d ≥ w   (``leaky_rerope(window=w, k=…)``)

so no query ever sees a distance it was not trained on (ReRoPE), or sees long distances compressed
k-fold (Leaky). With ``dynamic=true`` Leaky's k follows the row's length n in the call,
k_n = max(1, n/L) (L the trained length, ``original_max_position``, default
``config.max_position_embeddings``): every length n ≤ L is plain RoPE, and beyond L the farthest
position w + (n − 1 − w)·L/n stays below L + w·(1 − L/n) — past L by up to w, so a dynamic leak
keeps positions within L only with w small against L (a fixed k ≥ (N − w)/(L − w) keeps a known
longest length N within L exactly). Su 2023, https://kexue.fm/archives/9708 and
https://github.com/bojone/rerope (``rerope_patch.py``, ``leaky_rerope_patch.py``).

The transform is one stage of the attention program (:mod:`surgery.attention`): a
:class:`~surgery.attention.program.RelativeFrame` and a :class:`~surgery.attention.program.PreRope`
cache. The near band (d < w) runs in the fused kernel with normal RoPE; far keys form a second
rotary frame — queries at w + (i − w)/k, keys at j/k (ReRoPE: queries at w, keys at 0), so their
product depends on w + (d − w)/k only — and the two are merged exactly by log-sum-exp, never as two
N×N score matrices. Positions come from the model's rotary called at 0 … w (a dynamic rope thus
uses its frequencies for a (w + 1)-token context); fractional positions use its frequencies θ read
off that table, angles formed in float64.

The cache keeps **every key before RoPE** (un-rotated with the cos/sin the model used): a far key's
rotation depends on the query (ReRoPE: none at all; Leaky with ``dynamic``: on the stream's
length, which grows at every step), so keys rotated once at their positions could not serve later
steps. Each call rotates the near band (≤ Tq + w keys) and, for Leaky, the far keys (O(N·D), the
order of the attention itself); ReRoPE's far keys are used raw. The cache is not bounded: ReRoPE
bounds positions, not memory (compose nothing else that sets a cache: ``window`` is refused).

Obligations (float32, rel. to the logits' scale, tol 1e-5). Checks that must reach past the window
(and, for ``dynamic``, past L) run the same machinery with w = min(w, 8) and L = min(L, 16):

* window ≥ N is the identity: N ≤ w tokens give the original model's logits (``dynamic``: also
  lengths ≤ L with the far band active, where k = 1).
* equals a reference built from the explicit relative-position matrix: each layer on random hidden
  states against a hand-written attention that forms P(i − j) for every pair, rotates the query by
  the model's own rotary at P and the key at 0.
* the fast path equals the dense reference: tiles smaller than the sequence, lengths that are not
  multiples of the tile, a left-padded row; per layer and for the whole model.
* cached decode equals the full forward: prefill, then token by token past the window. With
  ``dynamic`` k follows each call's length, so the claim is per layer: fed the same hidden states,
  decode step t equals the layer's full forward over positions 0 … t at t, past L (one k for the
  whole cache, never keys rotated with an earlier k). A whole dynamic model cannot equal its full
  forward past L: deeper layers' cached inputs were computed with the k of their own step — as
  with transformers' dynamic NTK.
* a left-padded row equals the row alone.
* Leaky only: k = 1 is plain RoPE, and a huge k is ReRoPE.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.attention import ATTR, Program, Stage, install, require_causal, require_layer_index, rotary_ref
from surgery.attention.frame import rotate
from surgery.attention.program import PreRope, RelativeFrame
from surgery.errors import ApplyError, SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform
from surgery.transforms.window import Window, _padded_rows_error

TEST_WINDOW, TEST_TRAINED = 8, 16  # the machinery's size in checks that must pass the window / L


class ReropeParams(Params):
    window: int = Field(ge=1, description="relative positions below it are kept as they are (w)")


class LeakyParams(ReropeParams):
    k: float | None = Field(None, ge=1, description="far positions grow 1/k as fast: w + (d − w)/k")
    dynamic: bool = Field(False, description="k = max(1, n/L) for a row of n tokens (lengths ≤ L unchanged)")
    original_max_position: int | None = Field(
        None, ge=1, description="dynamic: trained context length L; defaults to config.max_position_embeddings")

    @model_validator(mode="after")
    def _one_k(self) -> "LeakyParams":
        if self.dynamic == (self.k is not None):
            raise ValueError("leaky_rerope needs exactly one of k=… (a fixed leak) and dynamic=true (k = n/L)")
        if self.original_max_position is not None and not self.dynamic:
            raise ValueError("original_max_position applies to leaky_rerope(dynamic=true) only")
        return self


def _owner(name: str, p) -> str:
    fields = [f"window={p.window}"]
    if isinstance(p, LeakyParams):
        fields.append("dynamic=true" if p.dynamic else f"k={p.k:g}")
    return f"{name}({', '.join(fields)})"


class _Relative:
    """What ReRoPE and Leaky ReRoPE share: the stage, acceptance, installing, the obligations."""

    name = "rerope"

    def frame(self, p, rotary, config=None) -> RelativeFrame:
        return RelativeFrame(p.window, None, rotary)

    def stage(self, p, span=None, rotary=None, config=None) -> Stage:
        return Stage(_owner(self.name, p), span, frame=self.frame(p, rotary, config), cache=PreRope())

    def accepts(self, p, target, module: nn.Module) -> bool:
        require_causal(f"{self.name}(...) rewrites a causal decoder's relative positions", target, module)
        require_layer_index(self.name, target, module)
        config = getattr(module, "config", None)
        if not getattr(config, "rope_parameters", None):
            raise SpecError(f"{self.name}(...) rewrites rotary positions; "
                            f"{getattr(config, 'model_type', 'this model')} has no rotary position embeddings")
        return True

    def apply(self, p, model: nn.Module, targets, edit) -> None:
        rotary = rotary_ref(model)
        if rotary is None:
            raise ApplyError(f"{self.name}(...) needs the model's rotary embedding (role 'rotary')")
        install(edit, model, [model.get_submodule(t.path) for t in targets], self.stage(p, rotary=rotary, config=model.config))

    # ---------------------------------------------------------------------------- obligations

    @staticmethod
    def _frames(check, model=None):
        model = model or check.surgered
        return [model.get_submodule(t.path) for t in check.targets]

    @contextlib.contextmanager
    def _with_frame(self, check, change):
        """The applied programs with each relative frame replaced by ``change(frame)``."""
        modules = self._frames(check)
        old = [getattr(m, ATTR) for m in modules]
        try:
            for m, program in zip(modules, old):
                stages = tuple(dataclasses.replace(s, frame=change(s.frame)) if isinstance(s.frame, RelativeFrame) else s
                               for s in program.stages)
                setattr(m, ATTR, Program(stages))
            yield
        finally:
            for m, program in zip(modules, old):
                setattr(m, ATTR, program)

    def _testable(self, check):
        """The machinery with w ≤ 8 (and L ≤ 16), so short sequences pass the window (and L)."""
        return self._with_frame(check, lambda f: dataclasses.replace(
            f, window=min(f.window, TEST_WINDOW), trained=None if f.trained is None else min(f.trained, TEST_TRAINED)))

    def _test_frame(self, check) -> RelativeFrame:
        return next(getattr(m, ATTR).frame for m in self._frames(check))

    @obligation("window ≥ N is the identity (rel.)", tol=1e-5)
    def identity(self, p, check) -> float:
        ids = check.tokens(length=min(p.window, 24))
        errors = [check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))]
        if isinstance(p, LeakyParams) and p.dynamic:  # n ≤ L: k = 1, the far band is plain RoPE
            with self._with_frame(check, lambda f: dataclasses.replace(f, window=min(f.window, TEST_WINDOW))):
                ids = check.tokens(length=min(3 * TEST_WINDOW, self._test_frame(check).trained), salt=1)
                errors.append(check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids)))
        return max(errors)

    @obligation("equals a reference from the explicit relative-position matrix (rel.)", tol=1e-5)
    def explicit_reference(self, p, check) -> float:
        errors = [0.0]
        with self._testable(check):
            frame = self._test_frame(check)
            rotary = rotary_ref(check.surgered)()
            for n in (3 * frame.window + 5, *((2 * frame.trained + 3,) if frame.trained else ())):
                for k, t in enumerate(check.targets):
                    module = check.module(t.path)
                    x = check.randn(2, n, check.config.hidden_size, salt=k)
                    pos = torch.arange(n)[None]
                    with torch.no_grad():
                        got = module(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))[0]
                        want = explicit_attention(module, rotary, x, frame)
                    errors.append(check.max_rel(got, want))
        return max(errors)

    @obligation("the fast path equals the dense reference (rel.)", tol=1e-5)
    def dense_reference(self, p, check) -> float:
        errors = [0.0]
        rotary = rotary_ref(check.surgered)
        with self._testable(check):
            frame = self._test_frame(check)
            tile = max(2, frame.window // 3)
            lengths = (3 * tile, 3 * tile + 2, 2 * frame.window + 5, *((2 * frame.trained + 3,) if frame.trained else ()))
            for s, n in enumerate(lengths):
                keep = torch.ones(2, n, dtype=torch.bool)
                keep[0, :2] = False
                for k, t in enumerate(check.targets):
                    module = check.module(t.path)
                    x = check.randn(2, n, check.config.hidden_size, salt=10 * s + k)
                    pos = torch.arange(n)[None]
                    kwargs = dict(attention_mask=keep[:, None, None, :], position_embeddings=rotary()(x, pos))
                    with torch.no_grad():
                        fast = module(x, surgery_tile=tile, **kwargs)[0]
                        dense = module(x, surgery_reference=True, **kwargs)[0]
                    errors.append(check.max_rel(fast[keep], dense[keep]))
            ids = check.tokens(length=lengths[2], salt=6)
            mask = torch.ones_like(ids)
            mask[0, :3] = 0
            errors.append(check.max_rel(check.logits(check.surgered, ids, attention_mask=mask, surgery_tile=tile)[mask.bool()],
                                        check.logits(check.surgered, ids, attention_mask=mask,
                                                     surgery_reference=True)[mask.bool()]))
        return max(errors)

    @obligation("cached decode equals the full forward (rel.)", tol=1e-5)
    def cached_decode(self, p, check) -> float:
        with self._testable(check):
            frame = self._test_frame(check)
            n = max(3 * frame.window, 2 * (frame.trained or 0)) + 3
            prefill = frame.window // 2 + 1
            if frame.trained is None:
                ids = check.tokens(length=n, salt=3)
                cached = Window._decode(check.surgered, ids, prefill=prefill)
                return check.max_rel(cached, check.logits(check.surgered, ids, use_cache=False))
            return self._layer_decode_error(check, n, prefill)

    @staticmethod
    def _layer_decode_error(check, n: int, prefill: int) -> float:
        """k follows the call's length, so each attention layer, fed the same hidden states, must give
        at decode step t what its full forward over positions 0 … t gives at t (the whole model
        cannot: its deeper layers' cached inputs were computed with earlier k's)."""
        from transformers import DynamicCache

        rotary = rotary_ref(check.surgered)()
        errors = [0.0]
        inputs = _attention_inputs(check, n)
        for t in check.targets:
            module = check.module(t.path)
            x = inputs[t.path]
            pos = torch.arange(n)[None]
            cache = DynamicCache(config=check.config)

            def run(lo, hi, cache=None, module=module, x=x, pos=pos):
                kwargs = dict(position_ids=pos[:, lo:hi], position_embeddings=rotary(x, pos[:, lo:hi]))
                if cache is not None:
                    kwargs.update(cache=cache, use_cache=True)
                return module(x[:, lo:hi], attention_mask=None, **kwargs)[0]

            with torch.no_grad():
                errors.append(check.max_rel(run(0, prefill, cache), run(0, prefill)))
                for step in range(prefill, n):
                    errors.append(check.max_rel(run(step, step + 1, cache), run(0, step + 1)[:, -1:]))
        return max(errors)

    @obligation("a left-padded row equals the row alone (rel.)", tol=1e-5)
    def padded_rows(self, p, check) -> float:
        with self._testable(check):
            frame = self._test_frame(check)
            return _padded_rows_error(check, check.surgered, length=max(2 * frame.window, frame.trained or 0) + 5, pad=3)


@transform("rerope", params=ReropeParams, anchor=Anchor.ATTENTION, positional=("window",),
           reference="https://kexue.fm/archives/9708")
class Rerope(_Relative):
    """ReRoPE: relative positions beyond the window all become the window (no training)."""

    name = "rerope"


@transform("leaky_rerope", params=LeakyParams, anchor=Anchor.ATTENTION, positional=("window",),
           reference="https://kexue.fm/archives/9708")
class LeakyRerope(_Relative):
    """Leaky ReRoPE: relative positions beyond the window grow k times slower (dynamic: k = n/L)."""

    name = "leaky_rerope"

    def frame(self, p: LeakyParams, rotary, config=None) -> RelativeFrame:
        if not p.dynamic:
            return RelativeFrame(p.window, float(p.k), rotary)
        trained = p.original_max_position or getattr(config, "max_position_embeddings", None)
        if trained is None and config is not None:
            raise ApplyError("leaky_rerope(dynamic=true) needs original_max_position=L: the config has no "
                             "max_position_embeddings")
        return RelativeFrame(p.window, None, rotary, trained=trained or 1)

    @obligation("k = 1 is plain RoPE and a huge k is ReRoPE (rel.)", tol=1e-5)
    def leak_limits(self, p: LeakyParams, check) -> float:
        ids = check.tokens(length=3 * TEST_WINDOW + 5, salt=9)
        small = lambda f, **kw: dataclasses.replace(f, window=min(f.window, TEST_WINDOW), trained=None, **kw)  # noqa: E731
        with self._with_frame(check, lambda f: small(f, k=1.0)):
            errors = [check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))]
        with self._with_frame(check, lambda f: small(f, k=1e12)):
            leaky = check.logits(check.surgered, ids)
        with self._with_frame(check, lambda f: small(f, k=None)):
            errors.append(check.max_rel(leaky, check.logits(check.surgered, ids)))
        return max(errors)


def _attention_inputs(check, n: int) -> dict:
    """The hidden states each target attention module receives in a forward of n seeded tokens
    (realistic inputs: random ones give scores in the hundreds, where float32 noise alone is ~1e-5)."""
    seen: dict = {}
    handles = []
    for t in check.targets:
        def keep(module, args, kwargs, path=t.path):
            seen[path] = (args[0] if args else kwargs["hidden_states"]).detach()
        handles.append(check.module(t.path).register_forward_pre_hook(keep, with_kwargs=True))
    try:
        check.logits(check.surgered, check.tokens(length=n, salt=21), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def explicit_attention(module: nn.Module, rotary: nn.Module, x: torch.Tensor, frame: RelativeFrame) -> torch.Tensor:
    """The attention module's output on hidden states `x` (no padding) written out from the relative-
    position matrix P_ij = P(i − j): query i rotated by the model's rotary at P_ij, key j at 0."""
    b, n, _ = x.shape
    hd = module.head_dim
    q = module.q_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    k = module.k_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    v = module.v_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).double()
    w = frame.window
    if frame.trained is not None:
        leak = max(1.0, n / frame.trained)
    else:
        leak = frame.k
    far = torch.full_like(d, float(w)) if leak is None else w + (d - w) / leak
    P = torch.where(d < w, d, far).clamp(min=0)
    cos, sin = rotary(q, P.reshape(1, -1).float())
    cos, sin = cos.float().view(n, n, -1), sin.float().view(n, n, -1)
    cos0, _ = rotary(q, torch.zeros(1, 1, dtype=torch.long))
    scores = (rotate(q[:, :, :, None, :], cos, sin) * (k * cos0.float()[0])[:, :, None, :, :]).sum(-1) * module.scaling
    scores = scores.masked_fill(d < 0, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return module.o_proj(out.to(x.dtype))
