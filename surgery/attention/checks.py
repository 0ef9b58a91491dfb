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
    target layer on random hidden states of each length (row 0 left-padded by 2), and the whole
    model on tokens with row 0 left-padded by 3 (the real positions compared)."""
    errors = [0.0]
    rotary = rotary_ref(model)
    with mode(model, training):
        for k, n in enumerate(lengths):
            keep = torch.ones(2, n, dtype=torch.bool)
            keep[0, :2] = False
            for m, t in enumerate(check.targets):
                module = model.get_submodule(t.path)
                x = check.randn(2, n, check.config.hidden_size, salt=10 * k + m)
                kwargs = dict(attention_mask=keep[:, None, None, :])
                if rotary is not None:
                    kwargs["position_embeddings"] = rotary()(x, torch.arange(n)[None])
                with torch.no_grad():
                    fast = module(x, surgery_tile=tile, **kwargs)[0]
                    dense = module(x, surgery_reference=True, **kwargs)[0]
                errors.append(check.max_rel(fast[keep], dense[keep]))
        ids = check.tokens(length=max(lengths), salt=6)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        real = mask.bool()
        errors.append(check.max_rel(check.logits(model, ids, attention_mask=mask, surgery_tile=tile)[real],
                                    check.logits(model, ids, attention_mask=mask, surgery_reference=True)[real]))
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
