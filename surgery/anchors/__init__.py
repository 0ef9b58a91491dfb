"""Anchor kinds: the plugins that say where a transform attaches and how a step is installed.

An anchor kind is one module of this package with one class registered by :func:`anchor_kind`
under its :class:`~surgery.transforms.registry.Anchor` name. It declares:

* ``required`` — capabilities (protocols of :mod:`surgery.transforms.registry`) of which a transform
  at this kind must offer at least one; ``optional`` — capabilities it reads when offered. The
  ``@transform`` decorator checks them when a transform registers.
* ``wraps`` — whether its steps compose per target into a tree of :mod:`surgery.compose` nodes
  (``a + b``, ``a | b``, …) that one wrapper module realises; the planner builds those trees.
* ``in_place`` — whether its steps only change the model's own tensors, so a plain transformers
  save holds them as they are.
* :meth:`AnchorKind.find` — its targets in a :class:`~surgery.arch.select.RoleIndex` within the
  regions a rule's selectors name;
* :meth:`AnchorKind.installer` — what applies its steps to a model (through the ``Edit`` journal);
* :meth:`AnchorKind.tree_errors` — what a wrapping kind refuses in a composition, found when planning;
* :meth:`AnchorKind.mergeable`, :meth:`AnchorKind.peft_tensors` — what saving reads;
* :meth:`AnchorKind.clashes` — steps of this kind that cannot share one model (checked when planning).

A new anchor kind is one file here plus its name in ``Anchor``.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from surgery.arch.select import GENERATE, Region, RoleIndex, Site
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, Installs, ModelPeftTensors, Target

if TYPE_CHECKING:
    from surgery.apply import Edit
    from surgery.compose import Node
    from surgery.planner import Step


class Installer(Protocol):
    """Applies the steps of one anchor kind to one model, every change through the edit journal."""

    def add(self, step: Step) -> None:
        """Install `step` (called in plan order, under the step's own RNG seed)."""

    def finish(self, trees: Mapping[str, Node]) -> None:
        """After every step: build the wrappers of a wrapping kind from the plan's trees."""


class AnchorKind(ABC):
    """Base of the anchor kinds, with the defaults of a kind whose steps install themselves."""

    anchor: ClassVar[Anchor]
    required: ClassVar[tuple[type, ...]]
    optional: ClassVar[tuple[type, ...]] = (ModelPeftTensors,)
    wraps: ClassVar[bool] = False
    in_place: ClassVar[bool] = False

    @abstractmethod
    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        """Every anchor of this kind inside `regions` (before the transform's ``accepts``)."""

    def installer(self, model: nn.Module, edit: Edit) -> Installer:
        return SelfInstalling(model, edit)

    def tree_errors(self, tree: Node, steps: Sequence[Step]) -> list[SpecError]:
        """What a wrapping kind refuses in the composition `tree` at one target (`steps`: the plan's,
        by index); planning reports each with its span, once however many targets share it."""
        return []

    def mergeable(self, step: Step, model: nn.Module) -> bool:
        """Whether the applied `step` folds into the model's own weights."""
        return False

    def clashes(self, steps: Sequence[Step]) -> list[SpecError]:
        """Errors for steps of this kind (in plan order) that cannot share one model (default: none)."""
        return []

    def peft_tensors(self, steps: Sequence[Step], model: nn.Module, config: dict[str, object]) -> (
            dict[str, torch.Tensor] | str):
        """The PEFT tensors of `steps` (one transform), completing `config`; or why PEFT cannot hold them."""
        impl = steps[0].spec.offers(ModelPeftTensors)
        if impl is None:
            return f"not written: {steps[0].transform} has no PEFT tensors"
        return impl.peft_tensors(model)


class SelfInstalling:
    """The installer of kinds whose transforms implement ``Installs``: each step applies itself."""

    def __init__(self, model: nn.Module, edit: Edit):
        self.model, self.edit = model, edit

    def add(self, step: Step) -> None:
        impl = step.spec.offers(Installs)
        assert impl is not None, "registration checks that the transform installs itself"
        impl.apply(step.params, self.model, list(step.targets), self.edit)

    def finish(self, trees: Mapping[str, Node]) -> None:
        pass


KINDS: dict[Anchor, AnchorKind] = {}

K = TypeVar("K", bound=type[AnchorKind])


def anchor_kind(cls: K) -> K:
    """Register an anchor kind class (one instance serves every plan)."""
    if cls.anchor in KINDS:
        raise RuntimeError(f"anchor kind {cls.anchor.value!r} registered twice")  # a programming error
    KINDS[cls.anchor] = cls()
    return cls


def kind(anchor: Anchor) -> AnchorKind:
    """The anchor kind registered under `anchor`."""
    return KINDS[anchor]


def within(path: str, site_path: str) -> bool:
    """Whether module `path` is `site_path` or inside it ("" is the whole model)."""
    return site_path == "" or path == site_path or path.startswith(site_path + ".")


def sites(regions: Sequence[Region]) -> list[Site]:
    """The modules the regions select (a ``generate`` site is the model's generation, no module)."""
    return [s for r in regions for s in r.sites if s.role != GENERATE]


def covered(path: str, regions: Sequence[Region]) -> bool:
    return any(within(path, s.path) for s in sites(regions))


def _register_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()
