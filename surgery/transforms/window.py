"""Sliding-window attention, and with ``sinks`` StreamingLLM's window with attention sinks.

Visibility (query i, key j, stream indices: counted from each row's first real token), in every
forward and in cached decoding:

    visible(i, j)  ⇔  j ≤ i  and  (i − j < W − S  or  j < S)          W = size, S = sinks

With S = 0 this is Mistral's sliding window (i − j < W). The KV cache of each windowed layer is
bounded: the first S tokens of each row plus the most recent W − S (W keys for an unpadded batch;
a left-padded batch also keeps the padding columns before its sinks, fixed at prefill).

* ``sinks=0``: keys stay rotated at their absolute positions (Mistral's sliding cache), so cached
  decoding equals the masked full forward.
* ``sinks>0`` (StreamingLLM ``pos_shift``): keys are cached before RoPE and rotated at their
  positions *inside the cache*: for query i the visible keys, in order, sit at positions 0, 1, …
  and the query at the last one. So a recent key keeps its true distance i − j < W − S, and sink j
  is at distance min(i, W − 1) − j; every query–key distance is < W, however long the stream.
  The rotary module (resolved at call time, so a ``rope(...)`` step composed before this one is
  honoured) is called once at positions 0 … W − 1: a dynamic rope computes its frequencies for a
  W-token context, in the full forward and in every decoding step alike, so cached decoding equals
  the full forward at any length. Incoming keys and queries are un-rotated with the cos/sin the
  model used; all re-rotation is float32. Sinks need a rotary model.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
https://arxiv.org/abs/2309.17453 (https://github.com/mit-han-lab/streaming-llm, ``kv_cache.py`` and
``pos_shift/``); Mistral 7B's sliding window, https://arxiv.org/abs/2310.06825.

The transform is one stage of the attention program (:mod:`surgery.attention`): a window mask
rule, with sinks a sink frame, and a bounded cache policy. ``model.generate()`` keeps a bounded
cache with no other change.

Obligations (float32 logits, tol 1e-5 unless noted). Decoding checks run past the window, so for
windows longer than 24 they run the same machinery with a window of 16 (sinks kept if < 16, else 4):

* window ≥ N equals full attention: N ≤ W tokens give the original model's logits.
* masked forward equals a reference mask: S = 0, each windowed layer against the untouched layer
  given a hand-built 4D additive mask (and, when every layer is windowed, the whole model likewise);
  S > 0, each windowed layer against a per-query reference that gathers the visible keys and
  rotates the query and keys at their ranks among them.
* cached decode equals the masked full forward (prefill, then token by token past the window).
* capacity ≥ N generation is identical to the original (greedy decoding with the cache).
* cache stays bounded and every key distance ≤ capacity (count of violations, tol 0).
* a left-padded row equals the row alone (a batch with padding on one row, past the window).
* program equals its dense reference, composed with the plan's rotary steps: the fast path (tiles
  smaller than the sequences, lengths that are not multiples of the tile, a padded row) against
  the dense reference built from the same stages, per layer and for the whole model; when a rotary
  step precedes this one, positions run past the trained length L, and with sinks cached decoding
  there equals the full forward too (a dynamic rope rescales past L; sink frames must not drift).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.attention import (
    ATTR,
    Bounded,
    Program,
    SinkFrame,
    Stage,
    WindowRule,
    install,
    require_causal,
    require_layer_index,
    rotary_ref,
)
from surgery.attention.cache import ProgramLayer
from surgery.attention.frame import rotate
from surgery.errors import ApplyError, SpecError
from surgery.transforms.registry import Anchor, Params, obligation, transform


class WindowParams(Params):
    size: int = Field(ge=1, description="tokens each query sees (the KV cache capacity)")
    sinks: int = Field(0, ge=0, description="first tokens every query keeps seeing (StreamingLLM)")

    @model_validator(mode="after")
    def _sinks_fit(self) -> "WindowParams":
        if self.sinks >= self.size:
            raise ValueError(f"sinks ({self.sinks}) must be smaller than size ({self.size}), "
                             "so the window keeps at least one recent token")
        return self


def _owner(size: int, sinks: int) -> str:
    return f"window({size}, sinks={sinks})" if sinks else f"window({size})"


def window_stage(size: int, sinks: int, rotary=None, span=None) -> Stage:
    """The program stage of window(size, sinks): a mask rule, a sink frame (sinks > 0), a bounded cache."""
    return Stage(_owner(size, sinks), span, rules=(WindowRule(size, sinks),),
                 frame=SinkFrame(size, sinks, rotary) if sinks else None,
                 cache=Bounded(size, sinks, pre_rope=sinks > 0))


def _is_window(stage: Stage) -> bool:
    return any(isinstance(r, WindowRule) for r in stage.rules)


@transform("window", params=WindowParams, anchor=Anchor.ATTENTION, positional=("size",),
           reference="https://arxiv.org/abs/2309.17453")
class Window:
    """Sliding-window attention with a bounded KV cache; sinks=S gives StreamingLLM."""

    def stage(self, p: WindowParams, span=None) -> Stage:
        return window_stage(p.size, p.sinks, span=span)

    def accepts(self, p: WindowParams, target, module: nn.Module) -> bool:
        require_causal("window(...) limits how far back a causal decoder looks", target, module)
        require_layer_index("window", target, module)
        config = getattr(module, "config", None)
        if p.sinks and not getattr(config, "rope_parameters", None):
            raise SpecError(f"window(sinks={p.sinks}) re-rotates cached keys at their cache positions, which "
                            f"needs rotary position embeddings; {getattr(config, 'model_type', 'this model')} "
                            f"has none (use window({p.size}) without sinks)")
        return True

    def apply(self, p: WindowParams, model: nn.Module, targets, edit) -> None:
        rotary = rotary_ref(model)
        if p.sinks and rotary is None:
            raise ApplyError(f"window(sinks={p.sinks}) needs the model's rotary embedding (role 'rotary')")
        install(edit, model, [model.get_submodule(t.path) for t in targets], window_stage(p.size, p.sinks, rotary))

    # ---------------------------------------------------------------------------- obligations

    def _windowed(self, check, model=None) -> list[nn.Module]:
        model = model or check.surgered
        return [model.get_submodule(t.path) for t in check.targets]

    @contextlib.contextmanager
    def _testable(self, p: WindowParams, check, model=None):
        """The applied machinery with a window short enough to decode past (16 when size > 24)."""
        if p.size <= 24:
            yield p.size, p.sinks
            return
        size, sinks = 16, p.sinks if p.sinks < 16 else 4
        modules = self._windowed(check, model)
        old = [getattr(m, ATTR) for m in modules]
        try:
            for m, program in zip(modules, old):
                stages = tuple(window_stage(size, sinks, s.frame.rotary if s.frame else None, s.span)
                               if _is_window(s) else s for s in program.stages)
                setattr(m, ATTR, Program(stages))
            yield size, sinks
        finally:
            for m, program in zip(modules, old):
                setattr(m, ATTR, program)

    @staticmethod
    def _decode(model: nn.Module, ids: torch.Tensor, prefill: int, each=None, offset: int = 0, **kwargs) -> torch.Tensor:
        """Logits of `ids` computed as a prefill of `prefill` tokens, then one token per call
        (positions start at `offset`)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        pos = torch.arange(offset, offset + ids.shape[1])[None].expand(ids.shape[0], -1)
        with torch.no_grad():
            out = [model(input_ids=ids[:, :prefill], position_ids=pos[:, :prefill], cache=cache,
                         use_cache=True, **kwargs).logits.float()]
            if each:
                each(cache, prefill)
            for t in range(prefill, ids.shape[1]):
                out.append(model(input_ids=ids[:, t:t + 1], position_ids=pos[:, t:t + 1], cache=cache,
                                 use_cache=True, **kwargs).logits.float())
                if each:
                    each(cache, t + 1)
        return torch.cat(out, dim=1)

    @obligation("window ≥ N equals full attention (rel.)", tol=1e-5)
    def full_when_wide(self, p: WindowParams, check) -> float:
        ids = check.tokens(length=min(p.size, 24))
        return check.max_rel(check.logits(check.surgered, ids), check.logits(check.original, ids))

    @obligation("masked forward equals a reference mask (rel.)", tol=1e-5)
    def reference_mask(self, p: WindowParams, check) -> float:
        errors = [0.0]
        with self._testable(p, check) as (size, sinks):
            n = min(2 * size + 8, 64)
            i = torch.arange(n)
            visible = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < size)
            mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
            rotary = rotary_ref(check.surgered)
            for k, t in enumerate(check.targets):
                module, original = check.module(t.path), check.module(t.path, surgered=False)
                x = check.randn(2, n, check.config.hidden_size, salt=k)
                kwargs = {}
                if rotary is not None:
                    pos = torch.arange(n)[None]
                    kwargs = dict(position_ids=pos, position_embeddings=rotary()(x, pos))
                with torch.no_grad():
                    got = module(x, attention_mask=None, **kwargs)[0]
                    if sinks:  # keys at their cache positions: a per-query reference
                        want = _reference_sink_attention(module, rotary(), x, size, sinks)
                    else:      # the untouched layer given the window as an explicit additive mask
                        want = original(x, attention_mask=mask.expand(2, 1, n, n), **kwargs)[0]
                errors.append(check.max_rel(got, want))
            if not sinks and len(check.targets) == getattr(check.config, "num_hidden_layers", -1):
                ids = check.tokens(length=n)  # every layer windowed: the whole model against the mask
                reference = check.logits(check.original, ids, attention_mask=mask.expand(ids.shape[0], 1, n, n))
                errors.append(check.max_rel(check.logits(check.surgered, ids), reference))
        return max(errors)

    @obligation("cached decode equals the masked full forward (rel.)", tol=1e-5)
    def cached_decode(self, p: WindowParams, check) -> float:
        with self._testable(p, check) as (size, _):
            ids = check.tokens(length=2 * size + 3, salt=3)
            full = check.logits(check.surgered, ids, use_cache=False)  # no cache at all, not a one-call prefill
            cached = self._decode(check.surgered, ids, prefill=max(1, size // 2 + 1))
            return check.max_rel(cached, full)

    @obligation("capacity ≥ N generation is identical to the original (rel.)", tol=1e-5)
    def generation_within_capacity(self, p: WindowParams, check) -> float:
        n = min(p.size, 16)
        prompt = check.tokens(length=max(1, n // 3), salt=4)
        ids = prompt
        with torch.no_grad():  # greedy tokens of the surgered model, fed to both (ties cannot diverge)
            from transformers import DynamicCache

            cache = DynamicCache(config=check.surgered.config)
            logits = check.surgered(input_ids=prompt, cache=cache, use_cache=True).logits
            while ids.shape[1] < n:
                nxt = logits[:, -1:].argmax(-1)
                ids = torch.cat([ids, nxt], dim=1)
                logits = check.surgered(input_ids=nxt, cache=cache, use_cache=True).logits
        prefill = prompt.shape[1]
        return check.max_rel(self._decode(check.surgered, ids, prefill), self._decode(check.original, ids, prefill))

    @obligation("cache stays bounded and every key distance ≤ capacity", tol=0.0)
    def bounded(self, p: WindowParams, check) -> float:
        modules = self._windowed(check)
        violations = 0

        def inspect(cache, seen: int):
            nonlocal violations
            for m in modules:
                layer = cache.layers[m.layer_idx]
                if not isinstance(layer, ProgramLayer):
                    violations += 1
                    continue
                violations += int(layer.keys.shape[-2] != min(seen, size))
                violations += int(layer.max_distance > size)

        with self._testable(p, check) as (size, _):
            ids = check.tokens(batch=1, length=2 * size + 2, salt=5)
            self._decode(check.surgered, ids, prefill=max(1, size // 2), each=inspect, surgery_record=True)
        return float(violations)

    @obligation("a left-padded row equals the row alone (rel.)", tol=1e-5)
    def padded_rows(self, p: WindowParams, check) -> float:
        with self._testable(p, check) as (size, _):
            return _padded_rows_error(check, check.surgered, length=2 * size + 5, pad=3)

    @obligation("program equals its dense reference (composed with the plan's rotary steps)", tol=1e-5)
    def dense_reference(self, p: WindowParams, check) -> float:
        model, composed = _composed(check)
        L = getattr(check.config, "max_position_embeddings", 0) or 0
        offset = L if composed else 0  # a composed (possibly dynamic) rope must be seen past L
        errors = [0.0]
        with self._testable(p, check, model) as (size, sinks):
            tile = max(2, size // 3)
            for k, n in enumerate((3 * tile, 3 * tile + 2, 2 * size + 5)):
                errors.append(_layers_fast_vs_dense(check, model, n, tile, offset, salt=k))
            ids = check.tokens(length=2 * size + 5, salt=6)
            mask = torch.ones_like(ids)
            mask[0, :3] = 0
            pos = (torch.arange(ids.shape[1]) + offset)[None].expand(ids.shape[0], -1)
            args = dict(attention_mask=mask, position_ids=pos)
            errors.append(check.max_rel(check.logits(model, ids, surgery_tile=tile, **args)[mask.bool()],
                                        check.logits(model, ids, surgery_reference=True, **args)[mask.bool()]))
            if composed and sinks:  # past L, cached decoding must not drift from the full forward
                ids = check.tokens(length=2 * size + 3, salt=7)
                pos = (torch.arange(ids.shape[1]) + offset)[None].expand(ids.shape[0], -1)
                full = check.logits(model, ids, position_ids=pos, use_cache=False)
                errors.append(check.max_rel(self._decode(model, ids, prefill=size // 2 + 1, offset=offset), full))
        return max(errors)


def _composed(check):
    """(model, composed): the surgered model, or — when the plan has rotary steps before this one —
    a copy of the original with those steps and this one applied (the program as it will run)."""
    from surgery.apply import apply_plan
    from surgery.transforms.registry import Anchor as _Anchor

    plan = getattr(check, "plan", None)
    if plan is None:
        return check.surgered, False
    before = {s.index for s in plan.steps if s.spec.anchor is _Anchor.ROTARY and s.index < check.step.index}
    if not before:
        return check.surgered, False
    model = copy.deepcopy(check.original)
    apply_plan(plan.restricted(before | {check.step.index}), model, seed=check.seed)
    return model.eval(), True


def _layers_fast_vs_dense(check, model, n: int, tile: int, offset: int, salt: int) -> float:
    """Each windowed layer on random hidden states (row 0 left-padded by 2): fast path vs dense reference."""
    errors = [0.0]
    rotary = rotary_ref(model)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :2] = False
    for k, t in enumerate(check.targets):
        module = model.get_submodule(t.path)
        x = check.randn(2, n, check.config.hidden_size, salt=10 * salt + k)
        kwargs = dict(attention_mask=keep[:, None, None, :])
        if rotary is not None:
            pos = (torch.arange(n) + offset)[None]
            kwargs["position_embeddings"] = rotary()(x, pos)
        with torch.no_grad():
            fast = module(x, surgery_tile=tile, **kwargs)[0]
            dense = module(x, surgery_reference=True, **kwargs)[0]
        errors.append(check.max_rel(fast[keep], dense[keep]))
    return max(errors)


def _padded_rows_error(check, model, length: int, pad: int) -> float:
    """max rel. error between a batch whose row 0 is left-padded and each row run alone (real tokens)."""
    ids = check.tokens(batch=2, length=length, salt=8)
    padded = torch.cat([torch.zeros(2, pad, dtype=ids.dtype), ids], dim=1)
    padded[1] = torch.cat([ids[1], torch.zeros(pad, dtype=ids.dtype)])  # row 1 unpadded: its last columns are filler
    mask = torch.ones_like(padded)
    mask[0, :pad] = 0
    mask[1, length:] = 0
    # Row 1's trailing filler is padding on the right: causal attention never lets a real token see it.
    # Positions count real tokens, as generate() derives them (absolute embeddings, e.g. GPT-2's, need it).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = check.logits(model, padded, attention_mask=mask, position_ids=positions)
    alone = [check.logits(model, ids[r:r + 1]) for r in range(2)]
    return max(check.max_rel(got[0:1, pad:], alone[0]), check.max_rel(got[1:2, :length], alone[1]))


def _reference_sink_attention(module: nn.Module, rotary: nn.Module, x: torch.Tensor, size: int, sinks: int) -> torch.Tensor:
    """Per query: gather the visible keys, place them at positions 0.. in order, the query last."""
    b, n, _ = x.shape
    hd = module.head_dim
    q = module.q_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    k = module.k_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    v = module.v_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    rows = []
    for i in range(n):
        keys = [j for j in range(i + 1) if i - j < size - sinks or j < sinks]
        cos, sin = rotary(q, torch.arange(len(keys))[None])
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        qi = rotate(q[:, :, i:i + 1], cos[:, :, -1:], sin[:, :, -1:])
        ki = rotate(k[:, :, keys], cos, sin)
        w = torch.softmax((qi @ ki.transpose(-1, -2)) * module.scaling, dim=-1)
        rows.append(w @ v[:, :, keys])
    out = torch.cat(rows, dim=2).transpose(1, 2).reshape(b, n, -1)
    return module.o_proj(out.to(x.dtype))
