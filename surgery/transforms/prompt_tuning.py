"""Prompt tuning: n trainable virtual-token embeddings prepended at the input layer; base frozen.

For user tokens x₁…x_T with embeddings e(xᵢ) and virtual embeddings P = [p₁…p_n] ∈ ℝ^{n×d},

    h = Backbone([p₁ … p_n, e(x₁) … e(x_T)])[n:]          (the virtual positions are cut off)

so the model sees n extra tokens before the user's, and everything downstream (logits, the loss with
``labels``, ``generate``) sees exactly T positions, lined up with the user's tokens. P lives in the
space of the embedding module's *output* (what ``inputs_embeds`` holds), as in PEFT. Lester et al.
2021, https://arxiv.org/abs/2104.08691; PEFT's ``PromptTuningConfig`` is the reference implementation.

Initialisation mirrors PEFT's ``PromptTuningInit``: ``random`` draws P from N(0, 1) (``RANDOM``, an
``nn.Embedding``'s default); ``vocab`` copies the embeddings of n uniformly drawn vocabulary tokens
(``SAMPLE_VOCAB``); ``tokens`` copies the embeddings of the given ``token_ids``, repeated cyclically or
truncated to n (PEFT's ``TEXT`` init after tokenising; we take ids because no tokenizer is at hand).

How it runs: a forward pre-hook on the backbone embeds the ids itself and passes
``inputs_embeds = [P; e(x)]`` when the KV cache is empty (no cache, or a fresh one at prefill),
prepends n ones to a 2-D ``attention_mask`` on every call, and shifts explicit ``position_ids`` by n
(virtual tokens take positions 0…n-1, as when fed by hand). On decode steps the cache already holds
the virtual keys/values, so only the mask and positions change. A forward hook strips the first n
positions of ``last_hidden_state`` (and of ``hidden_states`` when requested; ``attentions`` keep the
virtual columns). A 2-D ``token_type_ids`` gets n zeros in front at prefill.

The hooks ask the attached :class:`VirtualTokens` module for its length n and its embeddings [n, d];
prompt tuning stores P (:class:`PromptEmbedding`), p-tuning computes it with a prompt encoder
(:mod:`surgery.transforms.p_tuning`), and both share these hooks and obligations
(:class:`VirtualTokenSteps`).

Padding. A left-padded row x with p pads is computed as the untouched model computes the row
[padding, P, x]: P goes between the padding and the tokens. Given ``position_ids`` (``generate()``
passes cumsum(mask) − 1) are shifted by n as above, which is exactly that. Without them the model
would number the columns [P, padding, x] and put P p positions further from the tokens than when
the row is alone (on SmolLM2, logits off by up to 10); so at prefill, with a 2-D mask, the hook
passes the model's own numbering of [padding, P, x]: x keeps column + n, P takes the n numbers
after the row's leading padding (:func:`positions_after_padding`). Decode steps need nothing: the
model numbers them after the cache, as it would. Hence a padded row equals the row alone wherever
the untouched model's does: always on rotary models; on learned absolute positions (GPT-2, BERT),
which shift a padded row unless ``position_ids`` are given, with ``generate()`` or given positions.

Learned positions. GPT-2 and BERT look positions up in a table of N rows (role ``embed.pos``), and
the prompt takes n of them: a length n ≥ N is refused when the step is applied (the plan only sees
the embedding; the apply refuses before changing anything), and an input longer than N − n tokens
is a :class:`ModelError` naming the limit, not an IndexError. Encoders work as decoders do (PEFT
tunes prompts for BERT's classification and feature extraction): P is prepended, every token
attends to it, and its outputs are cut off; an encoder has no KV cache and no decode.

Difference from PEFT: PEFT keeps the n virtual logits and scores the first real token from the last
virtual one (its labels are ``[-100]·n + labels``); here ``model(ids, labels=ids).loss`` scores the
same T-1 predictions the plain model scores, so losses with and without the prompt compare directly.
PEFT also drops given ``position_ids`` for prompt tuning; here they are kept and shifted.

Obligations (inputs shortened to fit a learned position table after the prompt):

* length 0 is the identity: the technique's own module built with n = 0, put in place of the
  prompt under the same hooks, on a batch with a left-padded row.
* equals feeding the virtual embeddings by hand: the original fed ``inputs_embeds = [P; e(x)]``,
  on the real positions; and a batch with a left-padded row against the original fed
  [padding, P, e(x)] (relative to the logits' scale, since the column order differs).
* prefill + token-by-token decode with the KV cache equals the full forward (relative to the
  logits' scale; an encoder, which returns no cache, has nothing to check: 0).
* left-padded batch equals each row alone (:meth:`surgery.verify.Check.padded_rows_error`): with
  and without ``generate()``'s position_ids, full forward and decode, each variant checked where
  the untouched model keeps it (every variant on rotary models; with positions on GPT-2 and BERT).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.arch import backbone_prefix, detect
from surgery.errors import ApplyError, ModelError, SpecError
from surgery.transforms.registry import Anchor, NotApplicable, Params, obligation, transform

ATTRIBUTE = "surgery_prompt"  # where the prompt module lives on the backbone


class PromptTuningParams(Params):
    length: int = Field(..., ge=0, description="number of virtual tokens n")
    init: Literal["random", "vocab", "tokens"] = "random"
    token_ids: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, description="for init=tokens: ids whose embeddings start the prompt (repeated to fill n)")

    @model_validator(mode="after")
    def _token_ids_with_tokens(self):
        if self.init == "tokens" and not self.token_ids:
            raise ValueError("init=tokens needs token_ids=[…], the ids whose embeddings start the prompt")
        if self.init != "tokens" and self.token_ids is not None:
            raise ValueError(f"token_ids is only used with init=tokens, not init={self.init}")
        return self


class VirtualTokens(nn.Module, ABC):
    """What the backbone hooks attach and ask: n virtual tokens and their embeddings [n, d].

    Prompt tuning stores the embeddings (:class:`PromptEmbedding`); p-tuning computes them with its
    prompt encoder (:mod:`surgery.transforms.p_tuning`). Everything else — where they go, masks,
    positions, padding, the cache, cutting the outputs — is the hooks' and the same for both."""

    technique = "prompt tuning"  # how errors name it

    def __init__(self, max_positions: int | None = None):
        super().__init__()
        self.max_positions = max_positions  # rows of a learned position table (GPT-2, BERT); None: no limit

    @property
    @abstractmethod
    def length(self) -> int:
        """n, the number of virtual tokens."""

    @abstractmethod
    def embeddings(self) -> torch.Tensor:
        """The virtual tokens' embeddings, [n, d], in the space of the embedding module's output."""


class PromptEmbedding(VirtualTokens):
    """The virtual-token embeddings P ∈ ℝ^{n×d} (float32, like PEFT's; cast to the model's dtype)."""

    def __init__(self, weight: torch.Tensor, max_positions: int | None = None):
        super().__init__(max_positions)
        self.prompt_embeddings = nn.Parameter(weight)

    @property
    def length(self) -> int:
        return self.prompt_embeddings.shape[0]

    def embeddings(self) -> torch.Tensor:
        return self.prompt_embeddings


def _initial_prompt(p: PromptTuningParams, embed: nn.Module, hidden: int) -> torch.Tensor:
    device = embed.weight.device
    if p.init == "random":
        return torch.randn(p.length, hidden, device=device)
    if p.init == "vocab":
        ids = torch.randint(0, embed.weight.shape[0], (p.length,), device=device)
    else:
        reps = math.ceil(p.length / len(p.token_ids))
        ids = torch.tensor((list(p.token_ids) * reps)[: p.length], dtype=torch.long, device=device)
    with torch.no_grad():  # through the module, so scaled embeddings (Gemma) are copied as used
        return embed(ids).detach().float().clone().reshape(p.length, hidden)


def _as_kwargs(forward, args: tuple, kwargs: dict) -> dict:
    """Positional arguments (GPT-2 passes ``input_ids`` positionally) bound to their names."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(forward)
    out = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _prepend(x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    return torch.cat([prefix.expand(*x.shape[:-1], prefix.shape[-1]), x], dim=-1)


def positions_after_padding(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Position ids for the columns [P, x] of a prefill whose 2-D padding mask (over x) is `mask`:
    the model's own numbering of [padding, P, x]. A row's tokens keep the numbers the model gives
    them (column + n); its n virtual tokens take the n numbers right after its leading padding."""
    lead = (mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # leading padding of each row
    virtual = lead + torch.arange(n, device=mask.device)
    return torch.cat([virtual, n + torch.arange(mask.shape[1], device=mask.device).expand_as(mask)], dim=1)


def _check_room(prompt: VirtualTokens, positions: torch.Tensor | None, default_end: int) -> None:
    """A clear error, not an IndexError, for an input that runs past a learned position table.
    `positions`: the position ids passed on (virtual tokens included); else the model counts up to
    `default_end`."""
    limit = prompt.max_positions
    if limit is None:
        return
    end = int(positions.max()) + 1 if positions is not None and positions.numel() else default_end
    if end > limit:
        raise ModelError(f"the model has {limit} learned positions and {prompt.technique} puts {prompt.length} "
                         f"virtual tokens first, so an input may hold at most {limit - prompt.length} "
                         f"tokens; this one needs {end - prompt.length}")


def _hooks():
    """The (pre, post) forward hooks of the backbone. They find the prompt and the embedding through
    the hooked module, not a closure, so a deep copy of the model uses its own copies."""

    def before(module, args, kwargs):
        kwargs = _as_kwargs(module.forward, args, kwargs)
        prompt = getattr(module, ATTRIBUTE)
        n = prompt.length
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            return (), kwargs  # the model itself reports the missing input
        batch, length = (ids if ids is not None else embeds).shape[:2]
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            if mask.ndim != 2:
                raise ModelError(f"{prompt.technique} extends a 2-D attention_mask [batch, tokens]; "
                                 f"got {mask.ndim}-D (pass the 2-D padding mask instead)")
            if positions is None and prefill and "position_ids" in inspect.signature(module.forward).parameters:
                # The model numbers the columns [P, padding, x]; P would sit further from a padded
                # row than from the row alone. Number it as [padding, P, x] (P right after the padding).
                kwargs["position_ids"] = positions_after_padding(mask, n)
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if positions is not None:
            positions = positions + n
            if prefill:
                positions = _prepend(positions, torch.arange(n, device=positions.device, dtype=positions.dtype))
            kwargs["position_ids"] = positions
        _check_room(prompt, kwargs.get("position_ids"), (n if prefill else cache.get_seq_length()) + length)
        if not prefill:
            return (), kwargs
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)
        virtual = prompt.embeddings().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        full = torch.cat([virtual, embeds], dim=1)
        # Mark this tensor so the forward hook knows this call carried the prompt and how to answer.
        want_dict = kwargs.get("return_dict")
        full._surgery_prompt = (n, getattr(module.config, "return_dict", True) if want_dict is None else want_dict)
        types = kwargs.get("token_type_ids")
        if types is not None and types.ndim == 2:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        kwargs.update(input_ids=None, inputs_embeds=full, return_dict=True)
        return (), kwargs

    def after(module, args, kwargs, output):
        mark = getattr(kwargs.get("inputs_embeds"), "_surgery_prompt", None)
        if mark is None:
            return output
        n, want_dict = mark
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output if want_dict else output.to_tuple()

    return before, after


def learned_positions(model: nn.Module) -> tuple[str, int] | None:
    """(path, rows) of the model's learned absolute position table (role ``embed.pos``: GPT-2's
    ``wpe``, BERT's ``position_embeddings``), or None when positions are not looked up in a table."""
    try:
        role = detect(model).model.get("embed.pos")
    except ModelError:  # no role map: nothing known about positions
        return None
    path = backbone_prefix(model) + role if role else None
    table = dict(model.named_modules()).get(path) if path else None
    return (path, table.num_embeddings) if isinstance(table, nn.Embedding) else None


def find_prompt(model: nn.Module) -> VirtualTokens:
    found = [m for m in model.modules() if isinstance(m, VirtualTokens)]
    if len(found) != 1:
        raise ModelError("expected one set of virtual tokens (prompt tuning, p-tuning) in the model, "
                         f"found {len(found)}")
    return found[0]


@contextmanager
def swapped(model: nn.Module, tokens: VirtualTokens):
    """`model` with `tokens` in place of its virtual tokens (under the same hooks), for an obligation."""
    backbone = model.get_submodule(backbone_prefix(model).rstrip("."))
    kept = getattr(backbone, ATTRIBUTE)
    setattr(backbone, ATTRIBUTE, tokens)
    try:
        yield model
    finally:
        setattr(backbone, ATTRIBUTE, kept)


class VirtualTokenSteps(ABC):
    """What every virtual-token technique shares: attaching its :class:`VirtualTokens` module and the
    hooks to the backbone, and the obligations. A technique implements ``virtual_tokens(p, embed,
    max_positions)`` (its module, before any change is made) and its PEFT export; it inherits the
    obligations below (the registry reads inherited ones, base first)."""

    freezes_base = True

    @abstractmethod
    def virtual_tokens(self, p, embed: nn.Module, max_positions: int | None) -> VirtualTokens:
        """The technique's module of virtual tokens (built before any change is made)."""

    def apply(self, p, model: nn.Module, targets, edit) -> None:
        name = self.spec.name
        if len(targets) != 1:
            raise ApplyError(f"{name} attaches to one input embedding, got {len(targets)}")
        embed = model.get_submodule(targets[0].path)
        backbone = model.get_submodule(backbone_prefix(model).rstrip("."))
        if not hasattr(backbone, "get_input_embeddings") or backbone.get_input_embeddings() is not embed:
            raise ApplyError(f"{targets[0].path} is not the input embedding of the model's backbone")
        if getattr(backbone, ATTRIBUTE, None) is not None:
            raise ApplyError(f"the model already has virtual tokens ({getattr(backbone, ATTRIBUTE).technique})")
        table = learned_positions(model)
        if table is not None and p.length >= table[1]:
            path, rows = table
            raise SpecError(f"{model.config.model_type} has {rows} learned positions ({path}); "
                            f"{p.length} virtual tokens leave none for the input "
                            f"({name} needs a length of at most {rows - 1})")
        edit.set_attr(backbone, ATTRIBUTE, self.virtual_tokens(p, embed, table and table[1]))
        before, after = _hooks()
        edit.hook(backbone.register_forward_pre_hook(before, with_kwargs=True))
        edit.hook(backbone.register_forward_hook(after, with_kwargs=True))

    # ------------------------------------------------------------------------------ obligations

    @staticmethod
    def _length(check, want: int) -> int:
        """`want` input tokens, or fewer where a learned position table leaves less room after the prompt."""
        table = learned_positions(check.original)
        room = table[1] - find_prompt(check.surgered).length if table else want
        return max(1, min(want, room))

    @staticmethod
    def _returns_cache(model: nn.Module, ids: torch.Tensor) -> bool:
        with torch.no_grad():
            return getattr(model(input_ids=ids[:, :1], use_cache=True), "cache", None) is not None

    @staticmethod
    def _padded_mask(ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        mask[0, : ids.shape[1] // 4] = 0  # left padding in the first row exercises the mask path
        return mask

    @obligation("length 0 is the identity", tol=1e-5)
    def length_zero(self, p, check) -> float:
        ids = check.tokens()
        mask = self._padded_mask(ids)
        kept = find_prompt(check.surgered)
        with torch.random.fork_rng(devices=[]):  # the technique's own module, built with no virtual token
            empty = self.virtual_tokens(p.model_copy(update={"length": 0}),
                                        check.module(check.targets[0].path), kept.max_positions)
        with swapped(check.surgered, empty):  # the same hooks, with no virtual token to add
            ours = check.logits(check.surgered, ids, attention_mask=mask)
        return check.max_abs(ours, check.logits(check.original, ids, attention_mask=mask))

    @obligation("equals feeding the virtual embeddings by hand", tol=1e-5)
    def by_hand(self, p, check) -> float:
        ids = check.tokens(length=self._length(check, 16))
        n = p.length
        embed = check.module(check.targets[0].path, surgered=False)
        with torch.no_grad():
            tokens = embed(ids)
            virtual = find_prompt(check.surgered).embeddings().to(tokens.dtype)
        errors = []
        for mask in (torch.ones_like(ids), self._padded_mask(ids)):
            lead = (mask.cumsum(-1) == 0).sum(-1).tolist()  # each row's leading padding
            fed = torch.stack([torch.cat([tokens[r, :k], virtual, tokens[r, k:]]) for r, k in enumerate(lead)])
            fed_mask = torch.stack([torch.cat([mask[r, :k], mask.new_ones(n), mask[r, k:]])
                                    for r, k in enumerate(lead)])
            reference = check.logits(check.original, None, inputs_embeds=fed, attention_mask=fed_mask)
            ours = check.logits(check.surgered, ids, attention_mask=mask)
            # Unpadded, both sides run the same operations; padded, the columns differ in order, so
            # float32 noise enters and grows with the logits' scale (relative on real models).
            compare = check.max_rel if any(lead) else check.max_abs
            errors += [compare(ours[r, k:], reference[r, k + n:]) for r, k in enumerate(lead)]
        return max(errors)

    @obligation("prefill + decode equals the full forward", tol=1e-5)
    def cache_consistent(self, p, check) -> float:
        ids = check.tokens(length=self._length(check, 12))
        k = max(1, min(5, ids.shape[1] - 1))
        model = check.surgered
        if not self._returns_cache(model, ids):
            return NotApplicable("the model keeps no KV cache (an encoder): there is no decode path")
        full = check.logits(model, ids, attention_mask=torch.ones_like(ids))
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids[:, :k], attention_mask=torch.ones_like(ids[:, :k]), use_cache=True)
            steps.append(out.logits.float())
            for t in range(k, ids.shape[1]):
                out = model(input_ids=ids[:, t:t + 1], attention_mask=torch.ones_like(ids[:, :t + 1]),
                            cache=out.cache, use_cache=True)
                steps.append(out.logits.float())
        # Relative to the logits' scale: the cache changes the order of float32 sums (on SmolLM2
        # the untouched model's own decode is ~8e-5 off its full forward in absolute terms).
        return check.max_rel(torch.cat(steps, dim=1), full)

    @obligation("left-padded batch equals each row alone", tol=1e-4)
    def padded_rows(self, p, check) -> float:
        width = self._length(check, 16)
        lengths = (width, max(1, 2 * width // 3), max(1, width // 3))
        decode = min(3, min(lengths) - 1) if self._returns_cache(check.surgered, check.tokens()) else 0
        errors = [0.0]
        for generate_positions in (False, True):
            for steps in sorted({0, decode}):
                how = dict(generate_positions=generate_positions, decode=steps)
                # Only what the untouched model keeps: with learned positions (GPT-2, BERT) its padded
                # rows shift unless position_ids are given, and prompt tuning does not change that.
                if check.padded_rows_error(check.original, lengths, **how) <= 1e-4:
                    errors.append(check.padded_rows_error(check.surgered, lengths, **how))
        return max(errors)


@transform("prompt_tuning", params=PromptTuningParams, anchor=Anchor.EMBEDDINGS, positional=("length",),
           reference="https://arxiv.org/abs/2104.08691")
class PromptTuning(VirtualTokenSteps):
    """Prompt tuning: trainable virtual tokens prepended to the input embeddings (base frozen)."""

    def accepts(self, p: PromptTuningParams, target, module) -> bool:
        vocab = module.weight.shape[0]
        if p.token_ids and max(p.token_ids) >= vocab:
            raise SpecError(f"prompt_tuning() token id {max(p.token_ids)} is out of range: "
                            f"the vocabulary has {vocab} tokens (0..{vocab - 1})")
        return True

    def virtual_tokens(self, p: PromptTuningParams, embed: nn.Module, max_positions: int | None) -> PromptEmbedding:
        return PromptEmbedding(_initial_prompt(p, embed, embed.weight.shape[1]), max_positions)

    def peft(self, p: PromptTuningParams, targets) -> dict:
        # token_dim / num_attention_heads / num_layers: PEFT fills them from the base model's config
        # when it loads (``_prepare_prompt_learning_config``); task_type is the saver's (io) to set.
        # PEFT has no token-id init; the init only matters before the saved weights are loaded.
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "tokens": "RANDOM"}[p.init]
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": p.length, "token_dim": None,
                "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
                "prompt_tuning_init": init, "inference_mode": True}

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's ``adapter_model.safetensors`` for prompt tuning: the one [n, d] tensor."""
        return {"prompt_embeddings": find_prompt(model).prompt_embeddings.detach()}
