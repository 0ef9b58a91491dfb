"""The attention program: what every attention-level transform contributes to one attention module.

A program is an ordered tuple of :class:`Stage` s. Each stage may add

* **mask rules** (:class:`MaskRule`): key j is visible to query i iff *every* rule allows it (AND),
  on top of causality and padding. Indices are *stream* indices: counted from each row's first
  real token, so a left-padded row behaves like the same row alone.
* a **frame** (:class:`SinkFrame`, :class:`RelativeFrame`, :class:`ConsistentFrame`): where queries and keys are rotated.
  Without one, the absolute frame: the model's own rotation (see :mod:`surgery.attention.frame`).
* a **cache policy** (:class:`Bounded`, :class:`PreRope`): what the KV cache keeps. Without one,
  everything (transformers' own cache layer).
* ``train_only``: the stage acts only while the module is training (``module.training``).

Stages say what they claim: a frame and a cache policy are exclusive slots, so two stages that
both set one are a clash (:func:`clashes`), reported by the planner with both spans instead of
letting the last writer win. Mask rules never clash: they combine by AND.

The program is data; :mod:`surgery.attention.reference` (dense, the obligations' oracle) and
:mod:`surgery.attention.fast` (tiled, O(tile × reach) memory) execute it. A new attention
technique is one file that builds a stage (see docs/attention.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class MaskRule(Protocol):
    """A visibility rule over stream indices (0 = each row's first real token)."""

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast of i (queries) against j (keys): may query i see key j (given j ≤ i)?"""

    def reach(self) -> int | None:
        """How far back a query sees outside its sinks: key j needs i − j < reach (None: unbounded).
        The fast path visits only these keys (plus the frame's sinks)."""


@dataclass(frozen=True)
class WindowRule:
    """visible(i, j) ⇔ i − j < size − sinks  or  j < sinks (Mistral's window when sinks = 0)."""

    size: int
    sinks: int = 0

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (i - j < self.size - self.sinks) | (j < self.sinks)

    def reach(self) -> int:
        return self.size - self.sinks


@dataclass(frozen=True)
class SinkFrame:
    """StreamingLLM's frame: for query i the visible keys sit at cache slots 0, 1, … in order and the
    query at the last slot, min(i, size − 1). A recent key keeps its distance i − j; sink j < sinks
    sits at slot j. Positions come from a table of ``size`` slots (``Table.of(rotary(), size)``)."""

    size: int
    sinks: int
    rotary: object  # callable returning the rotary module (RotaryRef), resolved at call time


@dataclass(frozen=True)
class RelativeFrame:
    """ReRoPE's frame (Su 2023): the relative position d = i − j (stream indices) is used as is below
    ``window`` = w and becomes w + (d − w)/k beyond it; ``k`` = None is ReRoPE (every far key at
    distance w), a number Leaky ReRoPE, and ``trained`` = L makes k follow the stream:
    k_n = max(1, n/L) for a row whose stream holds n tokens in this call (so n ≤ L is plain RoPE and
    every far position stays below L).

    The near band (d < w) runs in the table frame (queries and keys at their columns, the fused
    kernel); the far keys form a second frame — query at w + (i − w)/k, key at j/k (ReRoPE: query at
    w, key at 0), so q·k depends on w + (d − w)/k only — merged by log-sum-exp. Positions come from
    a table of ``size`` = w + 1 slots (``Table.of(rotary(), w + 1)``: a dynamic rotary computes its
    frequencies for a (w + 1)-token context, in every call alike); fractional positions use the
    table's frequencies (:func:`surgery.attention.frame.real_rotation`)."""

    window: int
    k: float | None
    rotary: object  # callable returning the rotary module (RotaryRef), resolved at call time
    trained: int | None = None

    @property
    def size(self) -> int:
        return self.window + 1

    def leak(self, n: torch.Tensor) -> torch.Tensor | None:
        """k per row for rows holding `n` tokens (float64 [B]); None for ReRoPE."""
        if self.trained is not None:
            return (n.double() / self.trained).clamp(min=1.0)
        return None if self.k is None else torch.full(n.shape, float(self.k), dtype=torch.float64, device=n.device)

    def distance(self, d: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        """The position a score sees at relative distance `d` (k broadcast against d), float64."""
        far = torch.full_like(d, self.window, dtype=torch.float64) if k is None else self.window + (d - self.window) / k
        return torch.where(d < self.window, d.double(), far)


@dataclass(frozen=True)
class ConsistentFrame:
    """Consistent dynamic NTK's frame: query i at position p_i (its stream index plus the offset the
    row's position ids carry; ``generate()``'s are the stream index) and every key j it sees are
    rotated at their positions with the frequencies ``rotary().frequencies_at(p_i + 1)`` — the
    dynamic base of the query's own length. Query i's score
    then depends on tokens 0 … i only, so a full forward equals prefill + token-by-token decoding
    at every step (transformers' dynamic NTK rotates a whole call with the call's length and keeps
    each cached key in the base of the step that computed it). Queries with n ≤ L share plain
    RoPE and run in the fused kernel; past L each query has its own base (explicit scores)."""

    rotary: object  # callable returning a rotary module with frequencies_at(n) and `trained` (L)
    size: int = 2   # the table the implementation builds (unused: this frame rotates from θ(n))


@dataclass(frozen=True)
class PreRope:
    """A KV cache keeping every key, before RoPE (un-rotated with the cos/sin the model used); the
    frame (:class:`RelativeFrame`, :class:`ConsistentFrame`) re-rotates them per call."""

    pre_rope: bool = True
    sinks: int = 0
    size: None = None  # nothing is evicted


@dataclass(frozen=True)
class Bounded:
    """A KV cache keeping the first ``sinks`` tokens of each row and the most recent ``size − sinks``.
    With ``pre_rope`` keys are cached before RoPE (a frame re-rotates them)."""

    size: int
    sinks: int = 0
    pre_rope: bool = False


@dataclass(frozen=True)
class Stage:
    """One transform's contribution to a program (see the module docstring)."""

    owner: str                       # e.g. "window(16, sinks=4)"
    span: object = None              # the spec position, for clash reports
    rules: tuple = ()                # MaskRule…
    frame: SinkFrame | RelativeFrame | ConsistentFrame | None = None
    cache: Bounded | PreRope | None = None
    train_only: bool = False

    def claims(self) -> tuple[str, ...]:
        return tuple(slot for slot in ("frame", "cache") if getattr(self, slot) is not None)


@dataclass(frozen=True)
class Clash:
    slot: str
    first: Stage
    second: Stage

    def message(self) -> str:
        return (f"{self.second.owner} and {self.first.owner} both set the attention {self.slot} "
                f"of the same module; an attention module has one {self.slot}")


def clashes(stages) -> list[Clash]:
    """Every pair of stages claiming the same exclusive slot (in order)."""
    found, owner = [], {}
    for stage in stages:
        for slot in stage.claims():
            if slot in owner:
                found.append(Clash(slot, owner[slot], stage))
            else:
                owner[slot] = stage
    return found


@dataclass(frozen=True)
class Program:
    stages: tuple[Stage, ...] = field(default=())

    def then(self, stage: Stage) -> "Program":
        program = Program((*self.stages, stage))
        found = clashes(program.stages)
        if found:
            raise ValueError(found[0].message())
        return program

    def active(self, training: bool) -> "Program":
        """The stages that act in this mode (train-only stages drop out at inference)."""
        if training or not any(s.train_only for s in self.stages):
            return self
        return Program(tuple(s for s in self.stages if not s.train_only))

    @property
    def rules(self) -> tuple:
        return tuple(r for s in self.stages for r in s.rules)

    @property
    def frame(self) -> SinkFrame | RelativeFrame | ConsistentFrame | None:
        return next((s.frame for s in self.stages if s.frame is not None), None)

    @property
    def cache(self) -> Bounded | PreRope | None:
        return next((s.cache for s in self.stages if s.cache is not None), None)

    def reach(self) -> int | None:
        """The smallest reach of the rules (None: some query may see every earlier key)."""
        reaches = [r.reach() for r in self.rules if r.reach() is not None]
        return min(reaches) if reaches else None

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Causality AND every rule, on stream indices (broadcast)."""
        ok = j <= i
        for rule in self.rules:
            ok = ok & rule.visible(i, j)
        return ok

    def describe(self) -> str:
        return " + ".join(s.owner for s in self.stages) or "plain attention"


def plan_clashes(steps) -> list:
    """Spec errors for attention stages of a plan that clash on one module, each with both spans.

    `steps` are plan steps; a transform contributes a stage through ``stage(params, span)`` (None:
    no stage for these parameters). A rotary step's stage goes to every attention module (its
    target is the shared rotary embedding). The same transform twice on a module is the planner's
    own error, so it is not repeated here."""
    from surgery.errors import SpecError
    from surgery.transforms.registry import Anchor, AttentionStage

    by_module: dict[str, list[tuple[object, Stage]]] = {}
    everywhere: list[tuple[object, Stage]] = []
    for step in steps:
        contributes = step.spec.offers(AttentionStage)
        stage = None if contributes is None else contributes.stage(step.params, span=step.span)
        if stage is None:
            continue
        if step.spec.anchor is Anchor.ROTARY:
            everywhere.append((step, stage))
            continue
        for target in step.targets:
            by_module.setdefault(target.path, []).append((step, stage))
    errors, reported = [], set()
    for path, own in by_module.items():
        entries = sorted(everywhere + own, key=lambda entry: entry[0].index)
        step_of = {id(stage): step for step, stage in entries}
        for clash in clashes([stage for _, stage in entries]):
            first, second = step_of[id(clash.first)], step_of[id(clash.second)]
            if first.transform == second.transform or (first.index, second.index) in reported:
                continue
            reported.add((first.index, second.index))
            other = first.span
            errors.append(SpecError(f"{clash.message()} ({path}); the other is at "
                                    f"{other.file}:{other.line}:{other.column}\n{other.render()}", second.span))
    return errors
