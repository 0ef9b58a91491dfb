"""The transform registry: one decorator registers a technique with everything the pipeline needs.

A transform is a class decorated with :func:`transform`. The decorator records its name, its
parameter model (a pydantic model: the schema *is* the validation), the kind of anchor it attaches
to, the paper, the methods marked :func:`obligation`, and its *capabilities*: the protocols below
that the class implements. Adding a technique touches one file.

What a transform must implement is its anchor kind's business (:mod:`surgery.anchors`): each kind
names the capabilities it requires, at least one of which a transform must offer, or registration
fails. Today:

* ``linear`` requires :class:`Adapter` or :class:`ReplacesBase` (composed in a ``SurgeryLinear``;
  a base replacement must be innermost in a sequence);
* ``sublayer`` requires ``SublayerAdapter`` or ``DropsAdapters``, and reads ``GuardsAdapters``
  (:mod:`surgery.anchors.sublayer`, where the kind declares them: modules composed at a whole
  attention or MLP block, and drops decided while the model runs);
* ``decoding`` requires :class:`Decodes` (a generation strategy the anchor kind runs as ``model.generate``);
* every other kind requires :class:`Installs`: ``apply`` makes *all* its changes through ``edit``
  (:class:`surgery.apply.Edit`), so that a failed plan rolls back exactly.

Optional capabilities, for any kind: :class:`Accepts` (keep or drop candidate anchors),
:class:`ConfigPatch` (the step as transformers config fields, so a plain model expresses it),
:class:`Schedule` (training-time behaviour: a :class:`StepSchedule` that :mod:`surgery.train` calls
each optimizer step), :class:`PeftModulesToSave` (modules trained in full, exported beside any
adapter) and :class:`PeftExport` (with the tensor protocol its anchor kind reads: :class:`AdapterPeftTensors` at
linear anchors, :class:`ModelPeftTensors` elsewhere). Class attributes read once, at registration:

* ``freezes_base = True``: a fine-tuning method; the pipeline freezes every original parameter
  before any step runs (new parameters stay trainable; BitFit then unfreezes biases).
* ``peft_patterns``: PEFT config fields that may differ per module, mapped to the config field
  holding the per-module values (LoRA: ``{"r": "rank_pattern", "lora_alpha": "alpha_pattern"}``).
* ``peft_base = True``: the step changes the base, not the adapter (quantize), so a PEFT export of
  the other steps is still valid.

Obligations are methods ``(self, p, check) -> float`` returning the measured error, marked with
:func:`obligation` (name and tolerance); :mod:`surgery.verify` runs them on a copy of the model with
only this step applied (``check.surgered``) against the untouched model (``check.original``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from surgery.errors import Span, SpecError, did_you_mean

if TYPE_CHECKING:
    from surgery.apply import Edit


class Anchor(str, Enum):
    """The kinds of place a transform attaches to; each is a plugin in :mod:`surgery.anchors`."""

    LINEAR = "linear"            # nn.Linear / Conv1D modules, composed in a SurgeryLinear wrapper
    PARAMETERS = "parameters"    # the region's own parameters; no new modules
    ROTARY = "rotary"            # the model's rotary position embedding (shared by all layers)
    ATTENTION = "attention"      # attention blocks: attention function, mask, KV cache
    EMBEDDINGS = "embeddings"    # the model's input embeddings / input side
    SUBLAYER = "sublayer"        # each layer's attention and MLP blocks as wholes (bottleneck adapters)
    DECODING = "decoding"        # how the model generates (``model.generate``), not a module


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


# ------------------------------------------------------------------------------- capabilities
# Parameters are typed `Any`: each transform narrows them to its own Params model.


@runtime_checkable
class Accepts(Protocol):
    """Keep or drop a candidate anchor (default: keep all); a string keeps it and is stored as the
    target's ``option`` (e.g. IA3's ``"in"``/``"out"``)."""

    def accepts(self, p: Any, target: Target, module: nn.Module) -> str | bool | None: ...


@runtime_checkable
class Adapter(Protocol):
    """A module ``forward(x, inner)`` computing the transformed layer from ``inner`` (the wrapped
    layer as a callable), with ``merge(weight, bias) -> (weight, bias)`` (``[out, in]`` layout)
    folding it into the weights, or ``mergeable = False``."""

    def adapter(self, p: Any, base: nn.Module, target: Target) -> nn.Module: ...


@runtime_checkable
class ReplacesBase(Protocol):
    """Swap the layer itself (quantisation); innermost in any sequence, never a branch of ``|``."""

    def replace_base(self, p: Any, base: nn.Module, target: Target) -> nn.Module: ...


@runtime_checkable
class Installs(Protocol):
    """Change the model at `targets`, every change through `edit`, so a failed plan rolls back."""

    def apply(self, p: Any, model: nn.Module, targets: list[Target], edit: Edit) -> None: ...


@runtime_checkable
class Decodes(Protocol):
    """A generation strategy: the scores of each next token, as a generator that yields ``[B, V]``
    log-probabilities and is sent the ``[B]`` tokens chosen from them (:mod:`surgery.anchors.decoding`
    chooses them as ``generate()`` does). `extra` holds the call's keyword arguments that are not
    generation settings (e.g. NBCE's ``context``); the strategy refuses any it does not take. A
    strategy whose class sets ``splits_context = True`` is called ``generate(question, context=…)``
    by callers holding a long prompt (``surgery eval``'s passkey)."""

    def next_token_scores(self, p: Any, model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, extra: dict[str, Any]) -> Generator[torch.Tensor, torch.Tensor, None]: ...


@runtime_checkable
class AttentionStage(Protocol):
    """The step as a stage of the attention program (:mod:`surgery.attention`): what it adds to each
    target's attention; the planner checks stages of one module for clashes before anything runs."""

    def stage(self, p: Any, span: Any = None) -> Any: ...


@runtime_checkable
class ConfigPatch(Protocol):
    """The step applied to `model` as transformers config fields (e.g. ``{"rope_parameters": …}``;
    ``{}``: none needed), or None where no config expresses it; a plan whose every step is expressed
    (in the config, in merged weights, or in the model's own tensors) saves as a plain model."""

    def config_fields(self, p: Any, model: nn.Module) -> dict[str, Any] | None: ...


@runtime_checkable
class PeftExport(Protocol):
    """The PEFT ``adapter_config.json`` fields of the step (`targets` empty: the per-step fields)."""

    def peft(self, p: Any, targets: Sequence[Target]) -> dict[str, Any]: ...


@runtime_checkable
class PeftModulesToSave(Protocol):
    """The step as PEFT's ``modules_to_save``, beside an adapter of any type: the paths of the modules
    trained in full, whose tensors the adapter carries (``unfreeze``)."""

    def peft_modules(self, p: Any, targets: Sequence[Target]) -> list[str]: ...


@runtime_checkable
class AdapterPeftTensors(Protocol):
    """PEFT's tensors of one linear adapter, keyed below the layer (default: its state dict)."""

    def peft_tensors(self, p: Any, target: Target, adapter: nn.Module) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class ModelPeftTensors(Protocol):
    """PEFT's tensors of a step that is not at linear anchors, with their full keys."""

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]: ...


class StepSchedule(Protocol):
    """One step's behaviour while training, bound to the model it was made for (see :mod:`surgery.train`).

    ``lr_scale(step)`` multiplies the learning rate of optimizer step `step` (0-based) on top of any
    scheduler; ``on_step(step, optimizer)`` runs after that optimizer step (e.g. ReLoRA's restart);
    ``loss(batch, outputs, loss)`` returns the training loss given the model's (a regulariser adds to
    it, a loss option replaces it). ``state_dict()`` is JSON-serialisable and, loaded into a fresh
    schedule, continues bit-exactly where the saved one stopped.
    """

    def lr_scale(self, step: int) -> float: ...

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> None: ...

    def loss(self, batch: Mapping[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Schedule(Protocol):
    """Training-time behaviour of the step on `model` (already surgered) at `targets`; None where
    these parameters ask for none (e.g. ``ia3`` without a loss option)."""

    def schedule(self, p: Any, targets: Sequence[Target], model: nn.Module) -> StepSchedule | None: ...


C = TypeVar("C")


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
    capabilities: frozenset[type] = field(default=frozenset())
    freezes_base: bool = False
    peft_base: bool = False
    peft_patterns: Mapping[str, str] = field(default_factory=dict)

    def instance(self) -> Any:
        return self.cls()

    def offers(self, capability: type[C]) -> C | None:
        """An instance as `capability` if the transform declared it at registration, else None."""
        return cast(C, self.instance()) if capability in self.capabilities else None

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0] if self.cls.__doc__ else ""


REGISTRY: dict[str, TransformSpec] = {}

# Capabilities any anchor kind may use; anchor kinds add their own (`required`, `optional`).
COMMON: tuple[type, ...] = (Accepts, ConfigPatch, PeftExport, PeftModulesToSave, Schedule)

F = TypeVar("F", bound=Callable[..., float])


@dataclass(frozen=True)
class NotApplicable:
    """What an obligation returns when the model has nothing it could check (an encoder has no
    decode path): the report says "n/a" with the reason, never a measured 0 that reads as a pass."""

    reason: str


def obligation(name: str, tol: float) -> Callable[[F], F]:
    """Mark a transform method ``(self, p, check) -> float | NotApplicable`` as an equivalence obligation."""

    def mark(fn: F) -> F:
        fn.__surgery_obligation__ = (name, tol)  # type: ignore[attr-defined]
        return fn

    return mark


T = TypeVar("T", bound=type)


def capabilities_of(cls: type, anchor: Anchor) -> frozenset[type]:
    """The capabilities `cls` implements among those its anchor kind reads; checks the required ones.

    Raises RuntimeError (a programming error, found when the transform's module is imported) when
    the class offers none of the capabilities its anchor kind requires.
    """
    from surgery.anchors import kind  # the anchor kinds import this module

    anchor_kind = kind(anchor)
    instance = cls()
    offered = frozenset(c for c in (*anchor_kind.required, *anchor_kind.optional, *COMMON) if isinstance(instance, c))
    if not offered & set(anchor_kind.required):
        needs = " or ".join(f"{c.__name__} ({', '.join(_methods(c))})" for c in anchor_kind.required)
        raise RuntimeError(f"{cls.__name__} is at {anchor.value} anchors, so it must implement {needs}")
    return offered


def _methods(protocol: type) -> list[str]:
    return sorted(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))


def transform(
    name: str, *, params: type[Params], anchor: Anchor, reference: str, positional: tuple[str, ...] = ()
) -> Callable[[T], T]:
    """Register a transform class under `name` (see the module docstring for what it implements)."""

    def register(cls: T) -> T:
        if name in REGISTRY:
            raise RuntimeError(f"transform {name!r} registered twice")  # a programming error, not a user's
        # Inherited obligations too (a shared base, e.g. the virtual-token techniques'), base first;
        # an override keeps its base's place.
        marked: dict[str, tuple[str, float]] = {}
        for klass in reversed(cls.__mro__[:-1]):
            marked.update({attr: fn.__surgery_obligation__ for attr, fn in vars(klass).items()
                           if hasattr(fn, "__surgery_obligation__")})
        obligations = tuple(ObligationSpec(ob_name, tol, attr) for attr, (ob_name, tol) in marked.items())
        if not obligations:
            raise RuntimeError(f"transform {name!r} declares no obligation")
        flags = {flag: getattr(cls, flag, False) for flag in ("freezes_base", "peft_base")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise RuntimeError(f"transform {name!r}: freezes_base and peft_base are True or False")
        REGISTRY[name] = TransformSpec(
            name, cls, params, anchor, reference, positional, obligations,
            capabilities_of(cls, anchor), **flags, peft_patterns=dict(getattr(cls, "peft_patterns", {})),
        )
        cls.spec = REGISTRY[name]  # type: ignore[attr-defined]
        return cls

    return register


def lookup(name: str, span: Span | None = None) -> TransformSpec:
    from surgery.transforms import register_all

    register_all()

    if name in REGISTRY:
        return REGISTRY[name]
    raise SpecError(f"unknown transform {name!r}{did_you_mean(name, REGISTRY)}", span)
