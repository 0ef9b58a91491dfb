"""Prefix tuning: P trainable keys and values prepended at every targeted attention layer; base frozen.

For layer l with learned prefix keys K_l ∈ ℝ^{Hkv×P×D} and values V_l, query i of the stream attends
over [prefix; visible keys]:

    out_i = softmax([q_i·K_l ; q_i·k_j (j visible)] · scaling) · [V_l ; v_j]

The prefix is a K/V prefix stage of the attention program (:class:`surgery.attention.KVPrefix`):
every query sees all P entries (no causality, padding or window rule masks them), they are never
cached, so a bounded cache (``window(…, sinks=…)``) never evicts them, and they are not rotated.
As in PEFT, which puts them in the KV cache before the input, the stream is numbered after them:
token t of a row sits at position P + t (t counted from the row's first real token), so a query
meets the unrotated prefix keys rotated at P + t — the position it has under PEFT.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
https://arxiv.org/abs/2101.00190: the prefix is reparameterised during training,
[K; V] = MLP(P'), MLP = Linear(d', h) → tanh → Linear(h, L·2·Hkv·D) over P' ∈ ℝ^{P×d'}
(``reparam=mlp``; d' = Hkv·D and h = ``hidden`` or d', PEFT's ``PrefixEncoder`` shapes), or trained
directly (``reparam=none``: one table [P, L·2·Hkv·D]). P-tuning v2 (:mod:`surgery.transforms.p_tuning_v2`)
is the latter under its own name. P' starts N(0, 1), as PEFT's ``nn.Embedding``; the MLP runs at
every forward, once per model call: the backbone's pre-hook computes every layer's prefix and hands
it on as a keyword argument (``surgery_prefix``) that reaches each attention call.

Positions: given ``position_ids`` are shifted by P; without them, with a 2-D ``attention_mask``
covering the stream, each row is numbered from its first real token (cumsum(mask) − 1 + P, as
``generate()`` numbers it), so a left-padded row equals the row alone; without either, the model's
own numbering after the cache, plus P. PEFT numbers a left-padded row from column 0 when no
positions are given (its prefix then meets the row's tokens at other positions than when the row
is alone); with ``generate()``'s positions, or without padding, the two agree.

PEFT export (``PREFIX_TUNING``, inference mode): the flat table [P, L·2·Hkv·D] of every layer's
keys and values — the MLP's output for ``reparam=mlp`` (the reparameterisation folded), the table
itself for ``none`` — in PEFT's layout (layer-major, keys before values, then heads), the
``prompt_embeddings`` PEFT saves. Written when the step covers every attention layer of the model
(PEFT prefixes all of them); resuming training in PEFT starts from the folded table.

Causal decoders only: the attention program is causal. On learned absolute positions (GPT-2) the
prefix takes the first P rows of the table, as in PEFT: a length ≥ the table is refused when the
step is applied, and a stream that runs past the table is a :class:`ModelError` naming the limit.

Obligations (a prefix always changes attention, so there is no identity at init; instead):

* equals attention over [prefix; keys] by hand: each layer against the untouched layer given a KV
  cache holding the prefix and an explicit mask (prefix columns visible), on random hidden states
  with a left-padded row; and, when every layer carries a prefix, the whole model against the
  untouched model given the prefix as its KV cache (PEFT's mechanism).

The next three compare two computations of the same math, on a float64 copy (a random prefix leaves
a real model ill-conditioned in float32; see ``PrefixSteps._float64``):

* prefill + token-by-token decode with the KV cache equals the full forward.
* left-padded batch equals each row alone (:meth:`surgery.verify.Check.padded_rows_error`): with
  and without ``generate()``'s positions, full forward and decode.
* program equals its dense reference: the fast path (tiles smaller than the input) against the
  dense reference, on a batch with a left-padded row.

And:

* the exported prefix reproduces the outputs: the PEFT table put in place of the encoder (a
  ``reparam=none`` encoder holding it) gives the same logits.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.arch import backbone_prefix
from surgery.attention import KVPrefix, Stage, install, require_causal, rotary_ref
from surgery.errors import ApplyError, ModelError, SpecError
from surgery.transforms.prompt_tuning import _as_kwargs, learned_positions
from surgery.transforms.registry import Anchor, Params, obligation, transform

ATTRIBUTE = "surgery_prefix"  # where the encoder lives on the backbone
KWARG = "surgery_prefix"      # the call's prefixes, [L, 2, Hkv, P, D], handed from the backbone to each layer


class PrefixTuningParams(Params):
    length: int = Field(..., ge=1, description="number of prefix entries P per layer")
    reparam: Literal["mlp", "none"] = Field("mlp", description="mlp: [K; V] = MLP(P'); none: trained directly")
    hidden: int | None = Field(None, ge=1, description="reparam=mlp: the MLP's hidden width (default Hkv·D)")

    @model_validator(mode="after")
    def _hidden_with_mlp(self):
        if self.reparam == "none" and self.hidden is not None:
            raise ValueError("hidden sets the reparameterising MLP; with reparam=none there is none")
        return self


class PrefixEncoder(nn.Module):
    """Every targeted layer's prefix keys and values, in PEFT's ``PrefixEncoder`` layout: ``embedding``
    ([P, d'] with the MLP ``transform``, or [P, L·2·Hkv·D] alone); float32, cast where used."""

    def __init__(self, length: int, layers: int, heads: int, head_dim: int, reparam: str, hidden: int | None,
                 device=None, max_positions: int | None = None):
        super().__init__()
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_positions = max_positions  # rows of a learned position table (GPT-2); None: no limit
        width = layers * 2 * heads * head_dim
        token_dim = heads * head_dim
        if reparam == "mlp":
            self.embedding = nn.Embedding(length, token_dim, device=device)
            h = hidden or token_dim
            self.transform = nn.Sequential(nn.Linear(token_dim, h, device=device), nn.Tanh(),
                                           nn.Linear(h, width, device=device))
        else:
            self.embedding = nn.Embedding(length, width, device=device)
            self.transform = None

    @property
    def length(self) -> int:
        return self.embedding.num_embeddings

    def flat(self) -> torch.Tensor:
        """[P, L·2·Hkv·D]: PEFT's ``prompt_embeddings`` (the MLP applied)."""
        u = self.embedding.weight
        return self.transform(u) if self.transform is not None else u

    def kv(self) -> torch.Tensor:
        """[L, 2, Hkv, P, D]: layer l's keys at [l, 0], values at [l, 1]."""
        flat = self.flat().view(self.length, self.layers, 2, self.heads, self.head_dim)
        return flat.permute(1, 2, 3, 0, 4)


@dataclass(frozen=True)
class LayerPrefix:
    """A layer's (keys, values) [1, Hkv, P, D] for one call: from the backbone hook's ``surgery_prefix``
    (the encoder run once per model call), else (a layer called on its own) from the encoder. Holds
    the encoder itself: a deep copy of the model copies it with the same memo, so it points into the copy."""

    encoder: PrefixEncoder
    index: int

    def __call__(self, module: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        table = kwargs.get(KWARG)
        if table is None:
            table = self.encoder.kv()
        return table[self.index, 0][None], table[self.index, 1][None]


def _positions(kwargs: dict, length: int, n: int, device) -> torch.Tensor:
    """Position ids of this call's tokens, numbered after the prefix (see the module docstring)."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions + n
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == past + length:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:] + n
    return torch.arange(past + n, past + n + length, device=device)[None]


def _before_backbone(module: nn.Module, args, kwargs):
    """The backbone's pre-hook: positions after the prefix, and every layer's prefix for this call."""
    kwargs = _as_kwargs(module.forward, args, kwargs)
    encoder = getattr(module, ATTRIBUTE)
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return (), kwargs  # the model itself reports the missing input
    positions = _positions(kwargs, tokens.shape[1], encoder.length, tokens.device)
    limit = encoder.max_positions
    if limit is not None and positions.numel() and int(positions.max()) >= limit:
        raise ModelError(f"the model has {limit} learned positions and the K/V prefix takes the first "
                         f"{encoder.length}, so a stream may hold at most {limit - encoder.length} tokens; "
                         f"this one reaches {int(positions.max()) + 1 - encoder.length}")
    kwargs["position_ids"] = positions
    kwargs[KWARG] = encoder.kv()
    return (), kwargs


def find_encoder(model: nn.Module) -> PrefixEncoder:
    found = [m for m in model.modules() if isinstance(m, PrefixEncoder)]
    if len(found) != 1:
        raise ApplyError(f"expected one K/V prefix encoder in the model, found {len(found)}")
    return found[0]


class PrefixSteps:
    """What prefix tuning and P-tuning v2 share: the encoder on the backbone, a K/V prefix stage per
    targeted attention layer, the position hook, the PEFT export and the obligations. A technique
    says how its parameters read (:meth:`settings`)."""

    freezes_base = True

    def settings(self, p) -> tuple[str, int | None]:
        """(reparam, hidden) of the encoder."""
        return p.reparam, p.hidden

    def owner(self, p) -> str:
        return f"{self.spec.name}({p.length})"

    def stage(self, p, span=None, kv=None) -> Stage:
        return Stage(self.owner(p), span, prefix=KVPrefix(p.length, kv))

    def accepts(self, p, target, module: nn.Module) -> bool:
        require_causal(f"{self.spec.name}(...) prepends keys to a causal decoder's attention", target, module)
        return True

    def apply(self, p, model: nn.Module, targets, edit) -> None:
        name = self.spec.name
        backbone = model.get_submodule(backbone_prefix(model).rstrip("."))
        if getattr(backbone, ATTRIBUTE, None) is not None:
            raise ApplyError(f"the model already has a K/V prefix; {name} adds one per attention layer, once")
        modules = [model.get_submodule(t.path) for t in targets]
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if "position_ids" not in inspect.signature(backbone.forward).parameters:
            raise ApplyError(f"{name} numbers the stream after its prefix, but {type(backbone).__name__} "
                             "takes no position_ids")
        table = learned_positions(model)
        if table is not None and p.length >= table[1]:
            raise SpecError(f"{model.config.model_type} has {table[1]} learned positions ({table[0]}); a prefix of "
                            f"{p.length} leaves none for the input ({name} needs a length of at most {table[1] - 1})")
        reparam, hidden = self.settings(p)
        device = next(modules[0].parameters()).device
        encoder = PrefixEncoder(p.length, len(modules), heads, head_dim, reparam, hidden, device,
                                table[1] if table else None)
        edit.set_attr(backbone, ATTRIBUTE, encoder)
        edit.hook(backbone.register_forward_pre_hook(_before_backbone, with_kwargs=True))
        for index, module in enumerate(modules):
            install(edit, model, [module], self.stage(p, kv=LayerPrefix(encoder, index)))

    # ------------------------------------------------------------------------------ PEFT

    def peft(self, p, targets) -> dict:
        # num_layers, token_dim (Hkv·D) and num_attention_heads (Hkv) PEFT fills from the base model's
        # config when it loads; encoder_hidden_size likewise when None. task_type is the saver's.
        reparam, hidden = self.settings(p)
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": p.length, "token_dim": None,
                "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
                "encoder_hidden_size": hidden, "prefix_projection": reparam == "mlp", "inference_mode": True}

    def peft_tensors(self, model: nn.Module):
        """PEFT's ``adapter_model.safetensors``: the flat table [P, L·2·Hkv·D], or why it cannot be written."""
        encoder = find_encoder(model)
        layers = getattr(model.config, "num_hidden_layers", None)
        if encoder.layers != layers:
            return (f"not written: PEFT's prefix covers every attention layer; this one covers "
                    f"{encoder.layers} of {layers}")
        with torch.no_grad():
            return {"prompt_embeddings": encoder.flat().detach().clone()}

    # ------------------------------------------------------------------------------ obligations

    @staticmethod
    def _padded(batch: int, n: int, pad: int = 2) -> torch.Tensor:
        keep = torch.ones(batch, n, dtype=torch.long)
        keep[0, :pad] = 0
        return keep

    @obligation("equals attention over [prefix; keys] by hand (rel.)", tol=1e-5)
    def by_hand(self, p, check) -> float:
        from transformers import DynamicCache

        encoder = find_encoder(check.surgered)
        P = encoder.length
        rotary = rotary_ref(check.surgered)
        n = 11
        keep = self._padded(2, n)
        positions = (keep.cumsum(-1) - 1).clamp(min=0) + P
        min_value = torch.finfo(torch.float32).min
        i = torch.arange(n)
        stream = (i[:, None] >= i[None, :])[None] & keep[:, None, :].bool()            # [B, n, n]
        visible = torch.cat([torch.ones(2, n, P, dtype=torch.bool), stream], dim=-1)
        mask = torch.zeros(2, 1, n, P + n).masked_fill(~visible[:, None], min_value)
        real = keep.bool()
        errors = [0.0]
        with torch.no_grad():
            table = encoder.kv()
            for index, t in enumerate(check.targets):
                module, original = check.module(t.path), check.module(t.path, surgered=False)
                x = check.randn(2, n, check.config.hidden_size, salt=index)
                kwargs = {"position_embeddings": rotary()(x, positions)} if rotary is not None else {}
                got = module(x, attention_mask=keep.bool()[:, None, None, :], **kwargs)[0]
                cache = DynamicCache()
                prefix = [table[index, kv][None].expand(2, -1, -1, -1).to(x.dtype) for kv in (0, 1)]
                cache.update(*prefix, original.layer_idx)
                want = original(x, attention_mask=mask, cache=cache, **kwargs)[0]
                errors.append(check.max_rel(got[real], want[real]))
            layers = getattr(check.config, "num_hidden_layers", -1)
            if [t.layer for t in check.targets] == list(range(layers)):  # the whole model, as PEFT runs it
                ids = check.tokens(batch=2, length=n)
                cache = DynamicCache(config=check.original.config)
                for layer in range(layers):
                    cache.update(*(table[layer, kv][None].expand(2, -1, -1, -1) for kv in (0, 1)), layer)
                want = check.logits(check.original, ids, cache=cache, use_cache=True, position_ids=positions,
                                    attention_mask=torch.cat([keep.new_ones(2, P), keep], dim=1))
                got = check.logits(check.surgered, ids, attention_mask=keep)
                errors.append(check.max_rel(got[real], want[real]))
        return max(errors)

    @staticmethod
    def _float64(check) -> nn.Module:
        """A float64 copy of the surgered model. A random prefix makes a real model ill-conditioned:
        on SmolLM2 float32 rounding alone puts a left-padded row 3.5e-4 (rel.) off the row alone,
        in transformers' own attention over the same [prefix; keys] (PEFT's mechanism) as much as
        here; in float64 both give 0. So the obligations that compare two computations of the
        same math (padded/alone, decode/full, fast/dense) run there, and keep a tight tolerance."""
        return copy.deepcopy(check.surgered).double()

    @obligation("prefill + decode equals the full forward (rel.)", tol=1e-5)
    def cache_consistent(self, p, check) -> float:
        ids = check.tokens(length=12, salt=3)
        model = self._float64(check)
        full = check.logits(model, ids, use_cache=False)
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids[:, :5], use_cache=True)
            steps.append(out.logits.float())
            for t in range(5, ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits.float())
        return check.max_rel(torch.cat(steps, dim=1), full)

    @obligation("left-padded batch equals each row alone (rel.)", tol=1e-5)
    def padded_rows(self, p, check) -> float:
        errors = [0.0]
        model = self._float64(check)
        for generate_positions in (False, True):
            for decode in (0, 3):
                errors.append(check.padded_rows_error(model, (12, 8, 4), decode=decode,
                                                      generate_positions=generate_positions))
        return max(errors)

    @obligation("program equals its dense reference (rel.)", tol=1e-5)
    def dense_reference(self, p, check) -> float:
        ids = check.tokens(length=13, salt=6)
        keep = self._padded(ids.shape[0], ids.shape[1], pad=3)
        model = self._float64(check)
        fast = check.logits(model, ids, attention_mask=keep, surgery_tile=4)
        dense = check.logits(model, ids, attention_mask=keep, surgery_reference=True)
        return check.max_rel(fast[keep.bool()], dense[keep.bool()])

    @obligation("the exported prefix reproduces the outputs", tol=1e-6)
    def export_reproduces(self, p, check) -> float:
        """The PEFT table in a ``reparam=none`` encoder, in place of the encoder: what PEFT runs."""
        encoder = find_encoder(check.surgered)
        with torch.no_grad():
            flat = encoder.flat().detach().clone()
        folded = PrefixEncoder(encoder.length, encoder.layers, encoder.heads, encoder.head_dim, "none", None,
                               max_positions=encoder.max_positions)
        with torch.no_grad():
            folded.embedding.weight.copy_(flat)
        ids = check.tokens(length=10, salt=4)
        keep = self._padded(ids.shape[0], ids.shape[1])
        ours = check.logits(check.surgered, ids, attention_mask=keep)
        backbone = check.surgered.get_submodule(backbone_prefix(check.surgered).rstrip("."))
        kept = getattr(backbone, ATTRIBUTE)
        setattr(backbone, ATTRIBUTE, folded)  # the hook hands every layer the folded table
        try:
            theirs = check.logits(check.surgered, ids, attention_mask=keep)
        finally:
            setattr(backbone, ATTRIBUTE, kept)
        return check.max_abs(theirs, ours)


@transform("prefix_tuning", params=PrefixTuningParams, anchor=Anchor.ATTENTION, positional=("length",),
           reference="https://arxiv.org/abs/2101.00190")
class PrefixTuning(PrefixSteps):
    """Prefix tuning: trainable keys and values before every query's keys (MLP-reparameterised)."""
