"""Every transformers (and torch) internal the attention program relies on, in one place.

An upgrade of transformers that changes one of these fails tests/attention/test_internals.py,
which pins each item below, instead of failing somewhere inside a forward. The set-up pins
transformers (pyproject.toml) the way the Makefile pins torch.

Public API used:
* ``AttentionInterface.register(name, fn)`` / ``AttentionMaskInterface.register(name, fn)``: one
  attention implementation name and its mask function (without a mask entry transformers passes
  no mask at all, and attention silently stops being causal).
* ``PreTrainedModel.set_attn_implementation(name)``: switches a model (and its sub-models) to a
  registered name; the model class must dispatch through ``ALL_ATTENTION_FUNCTIONS``.

Conventions relied on (not formally public):
* An attention module's forward takes ``position_embeddings`` = (cos, sin) [B, T, D], the KV cache
  as ``cache`` (``past_key_values`` before 5.x), and ``attention_mask``; it calls
  ``cache.update(k, v, layer_idx, kwargs=kwargs)`` with its forward's extra keyword arguments and
  then the attention function as ``fn(module, q, k, v, mask, dropout=…, scaling=…, **kwargs)``;
  extra keyword arguments given to the model reach both (that is how per-call state travels).
  The module has ``layer_idx`` and ``is_causal``.
* The mask function is called with keyword arguments ``batch_size, q_length, kv_length, q_offset,
  kv_offset, attention_mask`` (the 2D padding mask, bool) among others, and its result is handed
  unchanged to every attention call of the forward.
* torch: ``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp of each
  query's scores with the output (the public ``scaled_dot_product_attention`` does not), which the
  fast path needs to merge two rotary frames exactly (:func:`sdpa_with_lse`).
* Cache layers: ``DynamicLayer`` (``keys``, ``values``, ``is_initialized``,
  ``lazy_initialization``, ``update``, ``get_mask_sizes``, ``get_seq_length``, ``get_max_length``,
  ``reset``, ``is_sliding``, ``is_croppable``); a ``Cache`` holds them in ``layers`` (grown from
  ``layer_class_to_replicate`` when created without a config); encoder–decoder caches expose
  ``self_attention_cache``.
* Defining a ``ModelOutput`` subclass registers it with torch's pytree: a process that loads a saved
  exported program (whose outputs are ``CausalLMOutputWithPast`` and the like) needs
  ``transformers.modeling_outputs`` imported, as ``import surgery.attention`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import transformers.modeling_outputs  # noqa: F401  (see the module docstring: outputs as pytree nodes)
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

# The attention registries and PreTrainedModel live in transformers.modeling_utils and masking_utils,
# whose imports take ~2 s (torch's dynamo and distributed tensors, transformers' quantizer
# integrations, fine-grained FP8 and DeepGEMM among them). Only a model needs them, and a model has
# imported them already: they are imported where used (and as attributes of this module, below), so
# that `import surgery`, `surgery --help` and `surgery check` do not pay for them.
_LATE = {"ALL_ATTENTION_FUNCTIONS": "transformers.modeling_utils", "AttentionInterface": "transformers.modeling_utils",
         "PreTrainedModel": "transformers.modeling_utils", "ALL_MASK_ATTENTION_FUNCTIONS": "transformers.masking_utils",
         "AttentionMaskInterface": "transformers.masking_utils"}

ATTENTION_KWARGS = ("position_embeddings", "attention_mask", "cache")  # what the pre-hook reads
CACHE_KWARG_ALIASES = ("cache", "past_key_values")                       # 5.x name first
MASK_KWARGS = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "attention_mask")
LAYER_API = ("keys", "values", "is_initialized", "lazy_initialization", "update", "get_mask_sizes",
             "get_seq_length", "get_max_length", "reset", "is_sliding", "is_croppable")

__all__ = [*_LATE, "Cache", "DynamicCache", "DynamicLayer",
           "register", "registered", "can_switch", "cache_layers", "cache_of"]


def __getattr__(name: str) -> Any:
    if name in _LATE:
        return getattr(importlib.import_module(_LATE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def registered(name: str) -> bool:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return name in ALL_ATTENTION_FUNCTIONS.valid_keys() and name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def register(name: str, attention, mask) -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def can_switch(model) -> bool:
    """Whether `model` dispatches attention through the interface (so set_attn_implementation works)."""
    from transformers.modeling_utils import PreTrainedModel

    return isinstance(model, PreTrainedModel) and type(model)._can_set_attn_implementation()


def cache_of(kwargs: dict):
    for name in CACHE_KWARG_ALIASES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_layers(cache, index: int) -> list:
    """The per-layer list of `cache`, grown to hold layer `index`."""
    cache = getattr(cache, "self_attention_cache", cache)  # encoder–decoder caches
    layers = cache.layers
    if len(layers) <= index and getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= index:
            layers.append(cache.layer_class_to_replicate())
    return layers


def sdpa_with_lse(q, k, v, mask, scale: float):
    """(softmax(q·kᵀ·scale + mask)·v, logsumexp(q·kᵀ·scale + mask)) of [B, H, T, D] inputs (equal head
    counts), `mask` additive float [B|1, 1|H, T, K]. On the CPU torch's flash kernel returns both;
    elsewhere the log-sum-exp is computed explicitly from the same scores."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask.to(q.dtype), scale=scale)
        return out, lse
    scores = (q @ k.transpose(-1, -2)) * scale + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse
