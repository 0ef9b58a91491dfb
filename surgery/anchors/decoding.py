"""How the model generates: decoding strategies that replace ``model.generate``, not a module.

Spelling: the selector ``generate``, the role of the model's generation (``model`` and ``*``, the
whole model, hold it too)::

    generate: nbce(chunk=2048, beta=0.25)        # naive-Bayes context extension
    generate: recompute(4096)                    # sliding window with re-computation

A ``generate`` region selects no module, so any other transform finds no anchor there. A model has
one generation strategy: a second decoding step is an error at planning.

Installing a step sets, through the :class:`~surgery.apply.Edit` journal, ``model.generate`` (an
instance attribute shadowing ``GenerationMixin.generate``; rollback deletes it, and the class's own
is back) and ``surgery_decoding`` (the step's description: what ``surgery diff`` lists and what marks
the model as surgered). Nothing else changes: forwards, the state dict and ``save_pretrained``'s
tensors are the untouched model's. Saving records the step in the spec of ``surgery.json``; no
transformers config expresses it, so the model is saved in the surgery format and
``surgery.load`` re-plans the spec, so the reloaded model generates the same way.

The generation loop is the one every strategy shares, and follows ``generate()``: settings from
``generation_config`` and keyword arguments merged as transformers merges them; the model's own
logits processors (temperature, top-k, top-p, repetition penalty, …) applied to the strategy's
next-token log-probabilities; greedy argmax, or with ``do_sample`` multinomial sampling by the same
operations (so a seeded run draws the same tokens from the same scores); rows that reached an eos
token continue with ``pad_token_id``; ``max_new_tokens`` (else ``max_length``) bounds the new
tokens. It returns the prompt followed by the new tokens, or with ``return_dict_in_generate`` a
``GenerateDecoderOnlyOutput`` whose ``logits`` are the strategy's log-probabilities and ``scores``
the processed scores (with ``output_logits`` / ``output_scores``). A strategy takes its own keyword
arguments besides (NBCE's ``context``) and refuses any it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.anchors import AnchorKind, anchor_kind
from surgery.arch.select import GENERATE, Region, RoleIndex
from surgery.errors import SpecError, SurgeryError
from surgery.transforms.registry import Anchor, Decodes, Target

if TYPE_CHECKING:
    from surgery.apply import Edit
    from surgery.compose import Node
    from surgery.planner import Step


class GenerationError(SurgeryError, ValueError):
    """A ``generate()`` call a decoding strategy cannot serve (e.g. an argument it does not take)."""


@anchor_kind
class Decoding(AnchorKind):
    anchor = Anchor.DECODING
    required = (Decodes,)
    optional = ()

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        """The model's generation, when a region holds it (``generate``, ``model``, ``*``) and the
        model generates at all (a causal LM, not a bare backbone or an encoder)."""
        whole = any(s.path == "" and s.role in (GENERATE, "model") for r in regions for s in r.sites)
        can_generate = getattr(index.model, "can_generate", None)
        if not whole or not callable(can_generate) or not can_generate():
            return []
        return [Target("", GENERATE)]

    def installer(self, model: nn.Module, edit: Edit) -> DecodingInstaller:
        return DecodingInstaller(model, edit)

    def clashes(self, steps: Sequence[Step]) -> list[SpecError]:
        first = steps[0] if steps else None
        return [SpecError(
            f"{s.transform} and {first.transform} both decide how the model generates, and a model has one "
            f"generation strategy; the other is at {first.span.file}:{first.span.line}:{first.span.column}\n"
            f"{first.span.render()}", s.span) for s in steps[1:] if first is not None]


class DecodingInstaller:
    """Installs the (one) decoding step as ``model.generate``."""

    def __init__(self, model: nn.Module, edit: Edit):
        self.model, self.edit = model, edit

    def add(self, step: Step) -> None:
        strategy = step.spec.offers(Decodes)
        assert strategy is not None, "registration checks that a decoding transform decodes"
        self.edit.set_attr(self.model, "generate", Generation(self.model, strategy, step.params))
        self.edit.set_attr(self.model, "surgery_decoding", step.describe())

    def finish(self, trees: Mapping[str, Node]) -> None:
        pass


class Generation:
    """``model.generate`` under a decoding strategy (a plain object holding the model, so a deep copy
    of the model gets one that generates with the copy)."""

    def __init__(self, model: nn.Module, strategy: Decodes, params: Any):
        self.model, self.strategy, self.params = model, strategy, params

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, **kwargs: Any) -> Any:
        return generate(self.model, self.strategy, self.params, input_ids, attention_mask, generation_config, **kwargs)

    def __repr__(self) -> str:
        return f"<generate: {type(self.strategy).__name__}({self.params!r})>"


@torch.no_grad()
def generate(model: Any, strategy: Decodes, params: Any, input_ids: torch.Tensor | None,
             attention_mask: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
    """Generate from `input_ids` ([B, T]) choosing each token from `strategy`'s scores (module docstring)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if input_ids is None:
        raise TypeError(f"{type(strategy).__name__} generation needs input_ids")
    config, extra = model._prepare_generation_config(generation_config, **kwargs)
    extra = {k: v for k, v in extra.items() if k != "use_cache"}  # strategies decide their own caching
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=input_ids.shape[1],
                                             device=input_ids.device, model_kwargs={"attention_mask": attention_mask})
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    eos = config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long, device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    steps = strategy.next_token_scores(params, model, input_ids, attention_mask, extra)
    sequences, unfinished = input_ids, torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits, scores = [], []
    chosen: torch.Tensor | None = None
    for _ in range(max(new, 0)):
        log_probs = next(steps) if chosen is None else steps.send(chosen)
        processed = processors(sequences, log_probs.float())
        logits.append(log_probs)
        scores.append(processed)
        if config.do_sample:
            chosen = torch.multinomial(nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
        else:
            chosen = torch.argmax(processed, dim=-1)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        sequences = torch.cat([sequences, chosen[:, None]], dim=-1)
        unfinished &= ~torch.isin(chosen, eos)
        if not unfinished.any():
            break
    steps.close()
    if not config.return_dict_in_generate:
        return sequences
    fields: dict[str, Any] = dict(sequences=sequences, scores=tuple(scores) if config.output_scores else None,
                                  logits=tuple(logits) if config.output_logits else None)
    return GenerateDecoderOnlyOutput(**fields)


@torch.no_grad()
def stream_log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t = 1 … N−1 ([N−1], float32), decoding the 1-D stream `ids` one
    token at a time as the model generates: through its decoding strategy when it has one (teacher
    forced: the strategy is sent each true token instead of one it chose), else one forward per token
    with the model's own KV cache (so a ``window(w, sinks=S)`` model keeps its bounded cache)."""
    from transformers import DynamicCache

    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    out = torch.empty(max(n - 1, 0))
    generation = vars(model).get("generate")
    if isinstance(generation, Generation):
        steps = generation.strategy.next_token_scores(generation.params, model, ids[:, :1], torch.ones_like(ids[:, :1]), {})
        for t in range(1, n):
            out[t - 1] = (next(steps) if t == 1 else steps.send(ids[:, t - 1]))[0, ids[0, t]]
        steps.close()
        return out
    cache = DynamicCache(config=model.config)
    for t in range(n - 1):
        logits = model(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[t]], device=ids.device), cache=cache,
                       use_cache=True).logits[0, -1]
        out[t] = torch.log_softmax(logits.float(), -1)[ids[0, t + 1]]
    return out
