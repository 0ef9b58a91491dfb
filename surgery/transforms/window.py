"""Sliding-window attention, and with ``sinks`` StreamingLLM's window with attention sinks.

Visibility (query at sequence index i, key at index j), in every forward and in cached decoding:

    visible(i, j)  ⇔  j ≤ i  and  (i − j < W − S  or  j < S)          W = size, S = sinks

With S = 0 this is Mistral's sliding window (i − j < W). The KV cache of each windowed layer is
bounded to W entries: the first S tokens plus the most recent W − S.

* ``sinks=0``: keys stay rotated at their absolute positions (Mistral's sliding cache), so cached
  decoding equals the masked full forward.
* ``sinks>0`` (StreamingLLM ``pos_shift``): keys are cached before RoPE and rotated at their
  positions *inside the cache*: for query i the visible keys, in order, sit at positions 0, 1, …
  and the query at the last one. So a recent key keeps its true distance i − j < W − S, and sink j
  is at distance min(i, W − 1) − j; every query–key distance is < W, however long the stream.
  The full forward uses the same positions, so cached decoding equals the full forward here too.
  Scores depend only on distances, so both parts use a frame where positions stay small (the
  rotary module is called at call time, honouring a ``rope(...)`` step composed before this one).
  Incoming keys (and the queries) are un-rotated with the cos/sin the model used; all re-rotation
  is float32. Sinks need a rotary model.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
https://arxiv.org/abs/2309.17453 (https://github.com/mit-han-lab/streaming-llm, ``kv_cache.py`` and
``pos_shift/``); Mistral 7B's sliding window, https://arxiv.org/abs/2310.06825.

How it hooks into transformers: the model's ``config._attn_implementation`` becomes
``surgery_sdpa`` / ``surgery_eager`` (registered once, with the matching mask functions, so
non-windowed layers run exactly as before); windowed attention modules carry a
:class:`WindowSettings`; a forward pre-hook puts a :class:`WindowLayer` into the KV cache for the
layer while it is still empty, so ``model.generate()`` keeps a bounded cache with no other change.
The window is over sequence indices (as transformers' sliding masks); with sinks, a left-padded
batch would count its padding as sinks.

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
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from surgery.arch import backbone_prefix, detect
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


# ------------------------------------------------------------------------------ rotary helpers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _unrotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # y = (c + sJ)x with J = rotate_half (J² = −1 per pair), so x = (c − sJ)y / (c² + s²); dividing by
    # c² + s² also undoes a rotary's attention scaling (YaRN multiplies cos and sin by it).
    cos, sin = cos.float(), sin.float()
    return (y.float() * cos - _rotate_half(y.float()) * sin) / (cos * cos + sin * sin)


@dataclass(frozen=True)
class RotaryRef:
    """The rotary module, looked up at call time (a later ``rope`` step may replace it).

    Holds the parent module, not a path from the root: a deep copy of the model copies this with
    the same memo, so the copy's reference points into the copy. Not an ``nn.Module`` attribute,
    so it registers nothing."""

    parent: nn.Module
    name: str

    def __call__(self) -> nn.Module:
        return getattr(self.parent, self.name)


@dataclass(frozen=True)
class WindowSettings:
    size: int
    sinks: int
    rotary: RotaryRef | None = None


# ------------------------------------------------------------------------------ the KV cache


class WindowLayer(DynamicLayer):
    """A cache layer keeping the first ``sinks`` tokens and the most recent ``size − sinks``.

    ``update`` returns every key the call's queries may need (what was kept plus the new tokens) and
    records their sequence indices in :attr:`index`; it stores only what a later query can see.
    With ``pre_rope`` it stores keys un-rotated (StreamingLLM), using the cos/sin the model used.
    """

    is_sliding = False  # the causal mask is sized against it as for a full layer: one column per token
    is_croppable = False

    def __init__(self, size: int, sinks: int, pre_rope: bool):
        super().__init__()
        self.size, self.sinks, self.pre_rope = size, sinks, pre_rope
        self.cumulative_length = 0
        self.kept = torch.zeros(0, dtype=torch.long)   # sequence indices of the stored keys
        self.index = torch.zeros(0, dtype=torch.long)  # sequence indices of the keys `update` returned
        self.position_embeddings = None                # cos/sin of the call in flight (set by the pre-hook)
        self.max_distance = 0                          # largest query–key distance attention used

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states[..., :0, :]
            self.values = value_states[..., :0, :]
            self.kept = self.kept.to(key_states.device)
        new = key_states.shape[-2]
        if self.pre_rope:
            if self.position_embeddings is None:
                raise ApplyError("window(sinks=…) needs the cos/sin the attention module was called with")
            cos, sin = self.position_embeddings
            key_states = _unrotate(key_states, cos.unsqueeze(1), sin.unsqueeze(1)).to(key_states.dtype)
            self.position_embeddings = None
        start = self.cumulative_length
        self.cumulative_length += new
        index = torch.cat([self.kept, torch.arange(start, start + new, device=self.kept.device)])
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep = (index < self.sinks) | (index >= self.cumulative_length - (self.size - self.sinks))
        self.keys, self.values, self.kept = keys[..., keep, :], values[..., keep, :], index[keep]
        self.index = index
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # One mask column per token seen, as a full layer: windowed attention gathers its keys' columns.
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # the stream may grow without bound; only the stored keys are bounded

    def reset(self) -> None:
        super().reset()
        self.kept = self.kept[:0]
        self.index = self.index[:0]
        self.max_distance = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ApplyError("a window(...) cache cannot be cropped: evicted tokens are gone "
                         "(assisted decoding and similar rollbacks are not supported)")


# --------------------------------------------------------------------------- attention function


@dataclass
class _Call:
    layer: WindowLayer | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None


# What the pre-hook learned about the attention call in flight, per module (no module is mutated).
_CALLS: "weakref.WeakKeyDictionary[nn.Module, _Call]" = weakref.WeakKeyDictionary()


def _cache_layers(cache: Cache, index: int) -> list:
    cache = getattr(cache, "self_attention_cache", cache)  # encoder–decoder caches
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= index:
            cache.layers.append(cache.layer_class_to_replicate())
    return cache.layers


def _before_attention(module: nn.Module, args, kwargs):
    """Forward pre-hook of a windowed attention module: give it a bounded cache layer."""
    settings: WindowSettings = module.surgery_window
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position_embeddings = kwargs.get("position_embeddings")
    layer = None
    if cache is not None:
        layers = _cache_layers(cache, module.layer_idx)
        layer = layers[module.layer_idx]
        if not isinstance(layer, WindowLayer):
            if layer.get_seq_length() > 0:
                raise ApplyError(f"the KV cache already holds {layer.get_seq_length()} tokens for layer "
                                 f"{module.layer_idx} that were cached without window(...); start from an empty cache")
            layer = layers[module.layer_idx] = WindowLayer(settings.size, settings.sinks, settings.sinks > 0)
        elif (layer.size, layer.sinks) != (settings.size, settings.sinks):
            raise ApplyError(f"the KV cache of layer {module.layer_idx} was built for window({layer.size}, "
                             f"sinks={layer.sinks}), not window({settings.size}, sinks={settings.sinks})")
        layer.position_embeddings = position_embeddings
    _CALLS[module] = _Call(layer, position_embeddings)
    return None


def _visible(q_idx: torch.Tensor, k_idx: torch.Tensor, size: int, sinks: int) -> torch.Tensor:
    """[q, k] bool: the window rule over sequence indices."""
    d = q_idx[:, None] - k_idx[None, :]
    return (d >= 0) & ((d < size - sinks) | (k_idx[None, :] < sinks))


def _with_given_mask(visible: torch.Tensor, given, k_idx: torch.Tensor, k_end: int, dtype) -> torch.Tensor:
    """The window as an additive float mask, keeping the model's own mask (padding) where it lines up.

    The model's mask has one column per sequence index (see WindowLayer.get_mask_sizes), so the
    columns of the keys at hand are gathered; a mask of another shape is not ours to interpret.
    `k_end` bounds the key indices as a Python int, so no tensor value decides control flow (which
    would stop torch.export)."""
    low = torch.finfo(dtype).min
    window = visible[None, None]
    if isinstance(given, torch.Tensor) and given.ndim == 4 and given.shape[-1] >= k_end:
        cols = given[..., k_idx.to(given.device)]
        if cols.dtype == torch.bool:
            return torch.where(window & cols, torch.zeros((), dtype=dtype), low)
        return torch.where(window, cols.to(dtype), low)
    return torch.where(window, torch.zeros((), dtype=dtype, device=visible.device), low)


def _indices(call: _Call | None, q_len: int, kv_len: int, device):
    """(query indices, key indices, first query index, key index bound): the last two as Python ints."""
    if call is not None and call.layer is not None:
        layer = call.layer
        end = layer.cumulative_length
        return torch.arange(end - q_len, end, device=device), layer.index.to(device), end - q_len, end
    return (torch.arange(kv_len - q_len, kv_len, device=device), torch.arange(kv_len, device=device),
            kv_len - q_len, kv_len)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sink_attention(module, settings: WindowSettings, call: _Call, query, key, value, visible_mask,
                    q_idx, k_idx, q_start, scaling, dropout):
    """StreamingLLM attention: recent keys at their true distance, sinks at their cache positions."""
    size, sinks = settings.size, settings.sinks
    if call is None or call.position_embeddings is None:
        raise ApplyError("window(sinks=…) needs rotary position embeddings passed to the attention module")
    cos, sin = (t.unsqueeze(1) for t in call.position_embeddings)
    q = _unrotate(query, cos, sin)
    k = key.float() if call.layer is not None else _unrotate(key, cos, sin)  # the cache holds pre-RoPE keys
    # Frame: shift every position by the first query's shift, so the rotary sees positions < W in
    # decoding (a dynamic rope then never rescales for the stream's length).
    shift = max(0, q_start - size + 1)
    q_sink_pos = q_idx.clamp(max=size - 1)               # the query's position in its own cache
    positions = torch.cat([q_idx - shift, q_sink_pos, k_idx - shift, k_idx])
    rc, rs = settings.rotary()(q, positions[None])
    rc, rs = rc.float().unsqueeze(1), rs.float().unsqueeze(1)
    nq, nk = len(q_idx), len(k_idx)
    cuts = [0, nq, 2 * nq, 2 * nq + nk, 2 * nq + 2 * nk]
    part = [(rc[:, :, a:b], rs[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
    groups = query.shape[1] // key.shape[1]
    q_recent, q_sink = _rotate(q, *part[0]), _rotate(q, *part[1])
    k_recent = _repeat_kv(_rotate(k, *part[2]), groups)
    k_sink = _repeat_kv(_rotate(k, *part[3]), groups)
    is_sink = k_idx < sinks
    scores = torch.where(is_sink, q_sink @ k_sink.transpose(-1, -2), q_recent @ k_recent.transpose(-1, -2))
    weights = torch.softmax(scores * scaling + visible_mask.float(), dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = (weights @ _repeat_kv(value.float(), groups)).transpose(1, 2).contiguous()
    if call.layer is not None:
        distance = torch.where(is_sink[None, :], q_sink_pos[:, None] - k_idx[None, :],
                               q_idx[:, None] - k_idx[None, :])
        visible = _visible(q_idx, k_idx, size, sinks)
        call.layer.max_distance = max(call.layer.max_distance, int(distance[visible].max()))
    return out.to(query.dtype), weights.to(query.dtype)


def _base_attention(base: str, module: nn.Module):
    if base == "eager":  # each modeling file has its own eager function (GPT-2's differs from Llama's)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _attention_function(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        settings: WindowSettings | None = getattr(module, "surgery_window", None)
        if settings is None:
            return _base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
        call = _CALLS.get(module)
        q_idx, k_idx, q_start, k_end = _indices(call, query.shape[2], key.shape[2], query.device)
        visible = _visible(q_idx, k_idx, settings.size, settings.sinks)
        dtype = torch.float32 if settings.sinks else query.dtype
        mask = _with_given_mask(visible, attention_mask, k_idx, k_end, dtype)
        if settings.sinks:
            scaling = kwargs.get("scaling") or module.scaling
            return _sink_attention(module, settings, call, query, key, value, mask, q_idx, k_idx, q_start,
                                   scaling, kwargs.get("dropout", 0.0))
        if call is not None and call.layer is not None:
            distance = (q_idx[:, None] - k_idx[None, :])[visible]
            call.layer.max_distance = max(call.layer.max_distance, int(distance.max()))
        kwargs.pop("sliding_window", None)  # ours replaces any native window
        return _base_attention(base, module)(module, query, key, value, mask, **kwargs)

    attention.__name__ = f"surgery_{base}_attention"
    return attention


_BASES = {"sdpa": sdpa_mask, "eager": eager_mask}
for _base, _mask in _BASES.items():
    # Registering the mask too is what keeps attention causal: a name without a mask entry gets none.
    AttentionInterface.register(f"surgery_{_base}", _attention_function(_base))
    AttentionMaskInterface.register(f"surgery_{_base}", _mask)


# ------------------------------------------------------------------------------ the transform


def _rotary_ref(model: nn.Module) -> RotaryRef | None:
    rel = detect(model).model.get("rotary")
    if rel is None:
        return None
    path = backbone_prefix(model) + rel
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        return None
    return RotaryRef(parent, name) if isinstance(getattr(parent, name, None), nn.Module) else None


def _configs(model: nn.Module, modules: list[nn.Module]) -> list:
    seen: dict[int, Any] = {}
    for owner in [model, getattr(model, "base_model", model), *modules]:
        config = getattr(owner, "config", None)
        if config is not None:
            seen.setdefault(id(config), config)
    return list(seen.values())


@transform("window", params=WindowParams, anchor=Anchor.ATTENTION, positional=("size",),
           reference="https://arxiv.org/abs/2309.17453")
class Window:
    """Sliding-window attention with a bounded KV cache; sinks=S gives StreamingLLM."""

    def accepts(self, p: WindowParams, target, module: nn.Module) -> bool:
        if not getattr(module, "is_causal", False):
            raise SpecError(f"window(...) limits how far back a causal decoder looks, but {target.path} "
                            f"({type(module).__name__}) attends in both directions")
        if not isinstance(getattr(module, "layer_idx", None), int):
            raise SpecError(f"window(...) needs the attention module's KV-cache layer index; "
                            f"{type(module).__name__} at {target.path} has none")
        config = getattr(module, "config", None)
        if p.sinks and not getattr(config, "rope_parameters", None):
            raise SpecError(f"window(sinks={p.sinks}) re-rotates cached keys at their cache positions, which "
                            f"needs rotary position embeddings; {getattr(config, 'model_type', 'this model')} "
                            f"has none (use window({p.size}) without sinks)")
        return True

    def apply(self, p: WindowParams, model: nn.Module, targets, edit) -> None:
        modules = [model.get_submodule(t.path) for t in targets]
        current = model.config._attn_implementation
        base = current.removeprefix("surgery_") if current else current
        if base not in _BASES:
            raise ApplyError(f"window(...) runs on sdpa or eager attention; this model uses {current!r} "
                             "(load it with attn_implementation='sdpa')")
        rotary = _rotary_ref(model)
        if p.sinks and rotary is None:
            raise ApplyError(f"window(sinks={p.sinks}) needs the model's rotary embedding (role 'rotary')")
        # `_attn_implementation` is a property over `_attn_implementation_internal`; the journal
        # restores the attribute that is really stored.
        for config in _configs(model, modules):
            edit.set_attr(config, "_attn_implementation_internal", f"surgery_{base}")
        for module in modules:
            edit.set_attr(module, "surgery_window", WindowSettings(p.size, p.sinks, rotary))
            edit.hook(module.register_forward_pre_hook(_before_attention, with_kwargs=True))

    # ---------------------------------------------------------------------------- obligations

    def _windowed(self, check) -> list[nn.Module]:
        return [check.module(t.path) for t in check.targets]

    @contextlib.contextmanager
    def _testable(self, p: WindowParams, check):
        """The applied machinery with a window short enough to decode past (16 when size > 24)."""
        if p.size <= 24:
            yield p.size, p.sinks
            return
        small = WindowParams(size=16, sinks=p.sinks if p.sinks < 16 else 4)
        modules = self._windowed(check)
        old = [m.surgery_window for m in modules]
        try:
            for m in modules:
                m.surgery_window = replace(m.surgery_window, size=small.size, sinks=small.sinks)
            yield small.size, small.sinks
        finally:
            for m, settings in zip(modules, old):
                m.surgery_window = settings

    @staticmethod
    def _decode(model: nn.Module, ids: torch.Tensor, prefill: int, each=None) -> torch.Tensor:
        """Logits of `ids` computed as a prefill of `prefill` tokens, then one token per call."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits.float()]
            if each:
                each(cache, prefill)
            for t in range(prefill, ids.shape[1]):
                out.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits.float())
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
            for k, t in enumerate(check.targets):
                module, original = check.module(t.path), check.module(t.path, surgered=False)
                x = check.randn(2, n, check.config.hidden_size, salt=k)
                kwargs = {}
                if module.surgery_window.rotary is not None:
                    pos = torch.arange(n)[None]
                    kwargs = dict(position_ids=pos, position_embeddings=module.surgery_window.rotary()(x, pos))
                with torch.no_grad():
                    got = module(x, attention_mask=None, **kwargs)[0]
                    if sinks:  # keys at their cache positions: a per-query reference
                        want = _reference_sink_attention(module, x, size, sinks)
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
            full = check.logits(check.surgered, ids)
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
                if not isinstance(layer, WindowLayer):
                    violations += 1
                    continue
                violations += int(layer.keys.shape[-2] != min(seen, size))
                violations += int(layer.max_distance > size)

        with self._testable(p, check) as (size, _):
            ids = check.tokens(batch=1, length=2 * size + 2, salt=5)
            self._decode(check.surgered, ids, prefill=max(1, size // 2), each=inspect)
        return float(violations)


def _reference_sink_attention(module: nn.Module, x: torch.Tensor, size: int, sinks: int) -> torch.Tensor:
    """Per query: gather the visible keys, place them at positions 0.. in order, the query last."""
    b, n, _ = x.shape
    hd = module.head_dim
    q = module.q_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    k = module.k_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    v = module.v_proj(x).view(b, n, -1, hd).transpose(1, 2).float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    rotary = module.surgery_window.rotary()
    rows = []
    for i in range(n):
        keys = [j for j in range(i + 1) if i - j < size - sinks or j < sinks]
        cos, sin = rotary(q, torch.arange(len(keys))[None])
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        qi = _rotate(q[:, :, i:i + 1], cos[:, :, -1:], sin[:, :, -1:])
        ki = _rotate(k[:, :, keys], cos, sin)
        w = torch.softmax((qi @ ki.transpose(-1, -2)) * module.scaling, dim=-1)
        rows.append(w @ v[:, :, keys])
    out = torch.cat(rows, dim=2).transpose(1, 2).reshape(b, n, -1)
    return module.o_proj(out.to(x.dtype))
