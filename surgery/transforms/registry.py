"""The transform registry: one decorator registers a technique with everything the pipeline needs.

A transform is a class decorated with :func:`transform`. The decorator records its name, its
parameter model (a pydantic model: the schema *is* the validation), the kind of anchor it attaches
to, the paper, and the methods marked :func:`obligation`. Adding a technique touches one file.

What the class implements depends on its anchor kind (see :class:`Anchor`):

``Anchor.LINEAR`` — attaches to ``nn.Linear`` / GPT-2 ``Conv1D`` modules. The pipeline wraps each
such module once in a :class:`surgery.layers.SurgeryLinear` and composes every linear transform of
the plan there (``a + b`` in sequence, ``a | b`` in parallel). The class implements

* ``accepts(self, p, target, module) -> str | bool | None`` (optional, any anchor kind): keep or
  drop a candidate anchor (default: keep all); a string keeps it and is stored as the target's
  ``option`` (e.g. IA3's ``"in"``/``"out"``).
* ``adapter(self, p, base, target) -> nn.Module`` whose ``forward(x, inner)`` computes the
  transformed layer given ``inner`` (a callable computing the wrapped layer) and whose
  ``merge(weight, bias) -> (weight, bias)`` (``weight`` in ``nn.Linear`` layout ``[out, in]``)
  returns the folded weights, or which sets ``mergeable = False``; **or**
* ``replace_base(self, p, base, target) -> nn.Module`` for transforms that swap the layer itself
  (quantisation); such a transform must be innermost in a sequence.

Every other anchor kind implements ``apply(self, p, model, targets, edit)`` and makes *all* its
changes through ``edit`` (:class:`surgery.apply.Edit`), so that a failed plan rolls back exactly.

Optional class attributes and hooks, read by :mod:`surgery.apply` and :mod:`surgery.io`:

* ``freezes_base = True``: a fine-tuning method; the pipeline freezes every original parameter
  before any step runs (new parameters stay trainable; BitFit then unfreezes biases).
* ``rope_parameters(self, p, config) -> dict | None``: the step as transformers'
  ``config.rope_parameters`` (None where transformers cannot express it).
* ``peft(self, p, targets) -> dict``: the PEFT ``adapter_config.json`` fields of the step; with
  ``peft_tensors(self, p, target, adapter)`` (linear; default: the adapter's state dict) or
  ``peft_tensors(self, model)`` (other kinds) giving the tensors of ``adapter_model.safetensors``.
* ``peft_patterns``: PEFT config fields that may differ per module, mapped to the config field
  holding the per-module values (LoRA: ``{"r": "rank_pattern", "lora_alpha": "alpha_pattern"}``).
* ``peft_base = True``: the step changes the base, not the adapter (quantize), so a PEFT export of
  the other steps is still valid.

Obligations are methods ``(self, p, check) -> float`` returning the measured error, marked with
:func:`obligation` (name and tolerance); :mod:`surgery.verify` runs them on a copy of the model with
only this step applied (``check.surgered``) against the untouched model (``check.original``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from surgery.errors import SpecError, did_you_mean


class Anchor(str, Enum):
    LINEAR = "linear"            # nn.Linear / Conv1D modules, composed in a SurgeryLinear wrapper
    PARAMETERS = "parameters"    # the region's own parameters; no new modules
    ROTARY = "rotary"            # the model's rotary position embedding (shared by all layers)
    ATTENTION = "attention"      # attention blocks: attention function, mask, KV cache
    EMBEDDINGS = "embeddings"    # the model's input embeddings / input side


class Params(BaseModel):
    """Base for transform parameter models: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Target:
    """One concrete place a step attaches to."""

    path: str
    role: str | None = None
    layer: int | None = None
    option: str | None = None


@dataclass(frozen=True)
class ObligationSpec:
    name: str
    tol: float
    method: str


@dataclass(frozen=True)
class TransformSpec:
    name: str
    cls: type
    params: type[Params]
    anchor: Anchor
    reference: str
    positional: tuple[str, ...]
    obligations: tuple[ObligationSpec, ...] = field(default=())

    def instance(self) -> Any:
        return self.cls()

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""


REGISTRY: dict[str, TransformSpec] = {}

# Names the language reserves for later transforms; they parse, and planning says so clearly.
RESERVED = {"gate": "UniPELT's learned gates", "fuse": "AdapterFusion"}


def obligation(name: str, tol: float) -> Callable:
    """Mark a transform method ``(self, p, check) -> float`` as an equivalence obligation."""

    def mark(fn: Callable) -> Callable:
        fn.__surgery_obligation__ = (name, tol)
        return fn

    return mark


def transform(
    name: str, *, params: type[Params], anchor: Anchor, reference: str, positional: tuple[str, ...] = ()
) -> Callable[[type], type]:
    """Register a transform class under `name` (see the module docstring for what it implements)."""

    def register(cls: type) -> type:
        if name in REGISTRY:
            raise RuntimeError(f"transform {name!r} registered twice")  # a programming error, not a user's
        obligations = tuple(
            ObligationSpec(*fn.__surgery_obligation__, method=attr)
            for attr, fn in vars(cls).items()
            if hasattr(fn, "__surgery_obligation__")
        )
        if not obligations:
            raise RuntimeError(f"transform {name!r} declares no obligation")
        REGISTRY[name] = TransformSpec(name, cls, params, anchor, reference, positional, obligations)
        cls.spec = REGISTRY[name]
        return cls

    return register


def lookup(name: str, span=None) -> TransformSpec:
    from surgery import transforms  # noqa: F401  (importing the package registers every transform)

    if name in REGISTRY:
        return REGISTRY[name]
    if name in RESERVED:
        raise SpecError(f"'{name}' ({RESERVED[name]}) is part of the language but not yet supported", span)
    raise SpecError(f"unknown transform {name!r}{did_you_mean(name, REGISTRY)}", span)
