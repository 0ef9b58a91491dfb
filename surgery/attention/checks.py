"""Obligation helpers shared by the attention transforms whose stages change scores (alibi, logn,
s2attn): the fast path against the dense reference, and cached decoding against the full forward."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from surgery.attention.rotary import rotary_ref


@contextlib.contextmanager
def mode(model: nn.Module, training: bool):
    """`model` in training (or eval) mode for the block, its previous mode restored after. In
    training mode every dropout is off (``nn.Dropout.p`` and attention modules' ``attention_dropout``
    set to 0), so train-only stages are compared deterministically."""
    was = {m: m.training for m in model.modules()}
    rates = [(m, "p", m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [(m, "attention_dropout", m.attention_dropout) for m in model.modules()
              if isinstance(getattr(m, "attention_dropout", None), float)]
    model.train(training)
    try:
        if training:
            for m, name, _ in rates:
                setattr(m, name, 0.0)
        yield model
    finally:
        for m, name, rate in rates:
            setattr(m, name, rate)
        for m, training_was in was.items():
            m.training = training_was


def fast_vs_dense(check, model: nn.Module, lengths: tuple[int, ...], tile: int, training: bool = False) -> float:
    """max rel. error of the fast path (tiles of `tile` queries) against the dense reference: each
    target layer on random hidden states of each length, without padding and with row 0 left-padded
    by 2 (the fast path runs these differently: per block where the program allows, tiled), and on
    the inputs the whole model gives it for tokens with row 0 left-padded by 3 (the real positions
    compared)."""
    errors = [0.0]
    rotary = rotary_ref(model)
    with mode(model, training):
        for k, n in enumerate(lengths):
            padded = torch.ones(2, n, dtype=torch.bool)
            padded[0, :2] = False
            for m, t in enumerate(check.targets):
                module = model.get_submodule(t.path)
                x = check.randn(2, n, check.config.hidden_size, salt=10 * k + m)
                kwargs = {}
                if rotary is not None:
                    kwargs["position_embeddings"] = rotary()(x, torch.arange(n)[None])
                for keep in (None, padded):
                    with torch.no_grad():
                        mask = None if keep is None else keep[:, None, None, :]
                        fast = module(x, surgery_tile=tile, attention_mask=mask, **kwargs)[0]
                        dense = module(x, surgery_reference=True, attention_mask=mask, **kwargs)[0]
                    real = slice(None) if keep is None else keep
                    errors.append(check.max_rel(fast[real], dense[real]))
        ids = check.tokens(length=max(lengths), salt=6)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        errors.append(_layers_in_model(check, model, ids, mask, tile))
    return max(errors)


def _layers_in_model(check, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tile: int) -> float:
    """max rel. error of each target layer's fast path against its dense reference on the inputs the
    whole model's dense run gives it (its real hidden states, mask and positions; real rows only).

    Layer by layer, not the final logits: through a real model's 30 layers float32's ~1e-6 per
    layer grows past any useful tolerance (SmolLM2 under s2attn: 6e-5 at the logits), while a wrong
    mask, position or padding rule still shows in the layer it is wrong in."""
    calls: list[tuple[nn.Module, tuple, dict, torch.Tensor]] = []
    given: dict[nn.Module, tuple[tuple, dict]] = {}

    def inputs(module, args, kwargs):  # ahead of the program's own pre-hook, which consumes surgery_*
        given[module] = (args, dict(kwargs))

    def record(module, args, kwargs, output):
        calls.append((module, *given.pop(module), output[0] if isinstance(output, tuple) else output))

    handles = []
    for t in check.targets:
        module = model.get_submodule(t.path)
        handles += [module.register_forward_pre_hook(inputs, with_kwargs=True, prepend=True),
                    module.register_forward_hook(record, with_kwargs=True)]
    try:  # no cache: a layer run twice must not see its own keys twice
        check.logits(model, ids, attention_mask=mask, surgery_reference=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(check.targets):
        return float("inf")  # the targets did not all run: this would show nothing
    real = mask.bool()
    errors = [0.0]
    with torch.no_grad():
        for module, args, kwargs, dense in calls:
            kwargs.pop("surgery_reference")
            fast = module(*args, surgery_tile=tile, **kwargs)
            errors.append(check.max_rel((fast[0] if isinstance(fast, tuple) else fast)[real], dense[real]))
    return max(errors)


def causal_leak(check, model: nn.Module, length: int, positions: tuple[int, ...]) -> float:
    """Largest change, in training mode, of the outputs before position j when only token j changes
    (for each j of `positions`, on both rows): information from a later token reaching an earlier one."""
    ids = check.tokens(length=length, salt=9)
    vocab = getattr(check.config, "vocab_size", 128)
    errors = [0.0]
    with mode(model, True), torch.no_grad():
        base = check.logits(model, ids)
        for j in positions:
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1 + torch.arange(ids.shape[0])) % vocab
            errors.append(check.max_abs(check.logits(model, changed)[:, :j], base[:, :j]))
    return max(errors)


def decode_vs_full(check, model: nn.Module, length: int, prefill: int) -> float:
    """max rel. error of a prefill of `prefill` tokens then one token per call, against one forward
    without a cache."""
    from surgery.transforms.window import Window

    ids = check.tokens(length=length, salt=3)
    full = check.logits(model, ids, use_cache=False)
    return check.max_rel(Window._decode(model, ids, prefill=prefill), full)
