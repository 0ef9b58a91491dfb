"""The attention program: what every attention-level transform contributes to one attention module.

A program is an ordered tuple of :class:`Stage` s. Each stage may add

* **mask rules** (:class:`MaskRule`): key j is visible to query i iff *every* rule allows it (AND),
  on top of causality and padding. Indices are *stream* indices: counted from each row's first
  real token, so a left-padded row behaves like the same row alone.
* a **frame** (:class:`SinkFrame`, :class:`RelativeFrame`, :class:`ConsistentFrame`): where queries and keys are rotated.
  Without one, the absolute frame: the model's own rotation (see :mod:`surgery.attention.frame`).
* a **cache policy** (:class:`Bounded`, :class:`PreRope`): what the KV cache keeps. Without one,
  everything (transformers' own cache layer).
* **head rules** (:class:`HeadRule`): a mask rule that applies to a share of the heads only
  (S2-Attn's shifted groups); ANDed with the rest on those heads.
* **score biases** (:class:`ScoreBias`): additive terms of the scores, per head (ALiBi); they
  combine by sum. A bias is evaluated at the positions the frame gives query and key (with a sink
  frame a sink sits at its cache slot and the query at min(i, size − 1)).
* **query scales** (:class:`QueryScale`): a factor on the scores of query i (log-n scaling), i.e.
  on q_i before q·k; they combine by product. The bias is added after scaling:
  score = s(i)·q_i·k_j·scaling + bias(i, j).
* ``unrotated``: queries and keys are not rotated at all (ALiBi replacing RoPE): the attention
  module is handed the identity rotation, so its cache holds un-rotated keys. It is a frame.
* a **K/V prefix** (:class:`KVPrefix`): learned keys and values every query sees before the stream
  (prefix tuning, P-tuning v2).
* ``train_only``: the stage acts only while the module is training (``module.training``).

Stages say what they claim: a frame, a cache policy and a K/V prefix are exclusive slots, so two
stages that both set one are a clash (:func:`clashes`), reported by the planner with both spans
instead of letting the last writer win. Mask rules, biases and scales never clash: they combine.

The program is data; :mod:`surgery.attention.reference` (dense, the obligations' oracle) and
:mod:`surgery.attention.fast` (tiled, O(tile × reach) memory) execute it. A new attention
technique is one file that builds a stage (see docs/attention.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import cached_property
from typing import Protocol

import torch


class MaskRule(Protocol):
    """A visibility rule over stream indices (0 = each row's first real token)."""

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast of i (queries) against j (keys): may query i see key j (given j ≤ i)?"""

    def reach(self) -> int | None:
        """How far back a query sees outside its sinks: key j needs i − j < reach (None: unbounded).
        The fast path visits only these keys (plus the frame's sinks)."""

    # Optional: a rule may also say that it is block-diagonal, ``blocks() -> (size, shift) | None``:
    # visible(i, j) ⇔ ⌊(i + shift)/size⌋ = ⌊(j + shift)/size⌋, the stream cut into contiguous blocks
    # of `size` indices, the first one cut short by the shift. With causality, attention is then
    # causal attention within each block, which the fast path runs as one fused call over the
    # blocks (:meth:`Program.blocks`). A rule without the method is not taken to be block-diagonal.


class ScoreBias(Protocol):
    """An additive term of the scores, per head."""

    def __call__(self, i: torch.Tensor, j: torch.Tensor, heads: int) -> torch.Tensor:
        """Float [B|1, heads|1, t, n]: the term for query i ([B, t, 1]) and key j ([B, 1, n]), both
        positions in the frame (stream indices in the absolute frame), for each of `heads` heads."""


class QueryScale(Protocol):
    """A factor on every score of query i."""

    def __call__(self, i: torch.Tensor) -> torch.Tensor:
        """Float, the shape of i (stream indices; negative on padding rows, whose value is unused)."""


@dataclass(frozen=True)
class HeadRule:
    """`rule` on the heads h with ⌊start·H⌋ ≤ h < ⌊stop·H⌋ of H query heads only (other heads: no
    restriction from it). Shares of H, because a stage is built before the model's head count is known."""

    rule: MaskRule
    start: Fraction = Fraction(0)
    stop: Fraction = Fraction(1)

    def heads(self, count: int) -> range:
        return range(int(self.start * count), int(self.stop * count))

    def visible(self, i: torch.Tensor, j: torch.Tensor, count: int) -> torch.Tensor:
        """Bool [B, count, t, n] from i [B, t, 1] and j [B, 1, n]."""
        on = torch.zeros(count, dtype=torch.bool, device=i.device)
        heads = self.heads(count)
        on[heads.start:heads.stop] = True
        return self.rule.visible(i, j)[:, None] | ~on[None, :, None, None]


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
class KVPrefix:
    """P learned keys and values that every query sees before the stream (prefix tuning, P-tuning v2).

    ``kv(module, kwargs)`` gives them per call: (keys [B|1, Hkv, P, D], values [B|1, Hkv, P, Dv]),
    resolved by the attention pre-hook (None in a stage built only for the planner's clash check).
    They sit outside the stream: every query row — padding rows too — sees all P of them, whatever
    causality, padding and the mask rules say; they are never cached, so a bounded cache never
    evicts them; and they are not rotated: a prefix key is scored against the query as the frame
    places it — the model's rotation in the absolute frame (the transform numbers the stream from
    P, as PEFT's prefix in the cache does), slot P + min(i, size − 1) in a sink frame (so the prefix
    sits in the cache slots before the sinks, and a window not yet full equals the absolute frame).

    Exclusive: two prefixes on one module are a clash rather than concatenated, because each
    technique that owns a prefix also numbers the stream after it (positions start at P), and two
    owners would each shift the positions by their own P.

    A ``gate`` (UniPELT's, :mod:`surgery.gating`) weighs the prefix per query: query i's prefix
    scores get log g_i added, so its softmax mass on the prefix is g_i·Z_prefix against Z_stream,
    out_i = (g_i·Σ_p e^{s_ip} v_p + Σ_j e^{s_ij} v_j) / (g_i·Σ_p e^{s_ip} + Σ_j e^{s_ij}): g = 1 is
    the ungated prefix, g = 0 no prefix at all."""

    length: int
    kv: object = None    # callable (module, kwargs) -> (keys, values)
    gate: object = None  # callable (module, args, kwargs) -> [B, Tq] log g per query, or None: ungated


@dataclass(frozen=True)
class Stage:
    """One transform's contribution to a program (see the module docstring)."""

    owner: str                       # e.g. "window(16, sinks=4)"
    span: object = None              # the spec position, for clash reports
    rules: tuple = ()                # MaskRule… and HeadRule…
    frame: SinkFrame | RelativeFrame | ConsistentFrame | None = None
    cache: Bounded | PreRope | None = None
    train_only: bool = False
    bias: tuple = ()                 # ScoreBias…
    scale: tuple = ()                # QueryScale…
    unrotated: bool = False          # the identity rotation (a frame of its own)
    prefix: KVPrefix | None = None   # K/V prefix (prefix tuning, P-tuning v2)

    def claims(self) -> tuple[str, ...]:
        slots = tuple(slot for slot in ("frame", "cache", "prefix") if getattr(self, slot) is not None)
        return slots + ("frame",) if self.unrotated and "frame" not in slots else slots


@dataclass(frozen=True)
class Clash:
    slot: str
    first: Stage
    second: Stage
    reason: str = ""

    def message(self) -> str:
        if self.reason:
            return f"{self.second.owner} and {self.first.owner} cannot share an attention module: {self.reason}"
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
    # The relative (ReRoPE) and consistent (NTK) frames score queries against keys in their own
    # executors, which do not take these stage fields (yet): refused, never silently ignored.
    stages = list(stages)
    framed = [n for n, s in enumerate(stages) if isinstance(s.frame, RelativeFrame | ConsistentFrame)]
    scored = [n for n, s in enumerate(stages) if s.bias or s.scale or s.prefix is not None
              or any(isinstance(r, HeadRule) for r in s.rules)]
    for f in framed:
        for other in scored:
            if other != f:
                first, second = sorted((f, other))
                found.append(Clash("frame", stages[first], stages[second], "its rotary frame does not take "
                                   "score biases, query scales, head rules or a K/V prefix yet"))
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

    # Derived fields are cached (the program is frozen): the pre-hook and the cache layer ask for
    # them at every call of every layer, a decoding step's fixed cost.

    def active(self, training: bool) -> "Program":
        """The stages that act in this mode (train-only stages drop out at inference)."""
        return self if training else self.inference

    @cached_property
    def inference(self) -> "Program":
        if not any(s.train_only for s in self.stages):
            return self
        return Program(tuple(s for s in self.stages if not s.train_only))

    @cached_property
    def rules(self) -> tuple:
        """The rules on every head."""
        return tuple(r for s in self.stages for r in s.rules if not isinstance(r, HeadRule))

    @cached_property
    def head_rules(self) -> tuple[HeadRule, ...]:
        return tuple(r for s in self.stages for r in s.rules if isinstance(r, HeadRule))

    @cached_property
    def unrotated(self) -> bool:
        return any(s.unrotated for s in self.stages)

    @cached_property
    def biased(self) -> bool:
        return any(s.bias for s in self.stages)

    @cached_property
    def frame(self) -> SinkFrame | RelativeFrame | ConsistentFrame | None:
        return next((s.frame for s in self.stages if s.frame is not None), None)

    @cached_property
    def cache(self) -> Bounded | PreRope | None:
        return next((s.cache for s in self.stages if s.cache is not None), None)

    @cached_property
    def prefix(self) -> KVPrefix | None:
        return next((s.prefix for s in self.stages if s.prefix is not None), None)

    def reach(self, heads: int | None = None) -> int | None:
        """How far back any query sees (None: some query may see every earlier key): the smallest
        reach of the rules on every head; given the head count, the largest over heads of each
        head's smallest reach, head rules included."""
        reaches = [r.reach() for r in self.rules if r.reach() is not None]
        bound = min(reaches) if reaches else None
        if heads is None or not self.head_rules:
            return bound
        per_head = [bound] * heads
        for rule in self.head_rules:
            reach = rule.rule.reach()
            for h in rule.heads(heads) if reach is not None else ():
                per_head[h] = reach if per_head[h] is None else min(per_head[h], reach)
        return None if None in per_head else max(per_head)

    def blocks(self, heads: int) -> tuple[tuple[int, int] | None, ...] | None:
        """Per head of `heads`, the (size, shift mod size) of the one block-diagonal rule on it (None:
        no rule, causal attention over the whole stream), when that is all the program does: every
        rule block-diagonal (see :class:`MaskRule`), at most one partition per head, and no score
        bias, query scale, frame, cache policy or K/V prefix. None when the program is anything else.

        Then head h's attention is, exactly, causal attention within each of its blocks: what the
        fast path runs per block (:func:`surgery.attention.fast.attend`)."""
        if (self.biased or self.frame is not None or self.cache is not None or self.prefix is not None
                or any(s.scale for s in self.stages)):
            return None

        def partition(rule) -> tuple[int, int] | None:
            blocks = getattr(rule, "blocks", None)
            found = blocks() if blocks is not None else None
            return None if found is None else (found[0], found[1] % found[0])

        every = {partition(rule) for rule in self.rules}
        per_head = [set(every) for _ in range(heads)]
        for rule in self.head_rules:
            for h in rule.heads(heads):
                per_head[h].add(partition(rule.rule))
        if any(None in found or len(found) > 1 for found in per_head):
            return None  # a rule that is not block-diagonal, or two partitions ANDed on one head
        return tuple(next(iter(found), None) for found in per_head)

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Causality AND every rule on every head, on stream indices (broadcast)."""
        ok = j <= i
        for rule in self.rules:
            ok = ok & rule.visible(i, j)
        return ok

    @cached_property
    def only_windows(self) -> bool:
        """Every stage contributes window rules, a sink frame and a bounded cache at most (no other
        field set, no other frame or cache): then a single query sees its whole key band, so a
        decoding step needs no mask. Asked at every decoding step, so computed once."""
        base = {"owner", "span", "rules", "frame", "cache", "train_only"}
        if not isinstance(self.frame, SinkFrame | None) or not isinstance(self.cache, Bounded | None):
            return False
        return all(isinstance(rule, WindowRule) for stage in self.stages for rule in stage.rules) and all(
            getattr(stage, f.name) == f.default for stage in self.stages for f in fields(stage) if f.name not in base)
    def head_visible(self, i: torch.Tensor, j: torch.Tensor, heads: int) -> torch.Tensor | None:
        """The head rules ANDed, [B, heads, t, n] from i [B, t, 1] and j [B, 1, n] (None: no head rules)."""
        ok = None
        for rule in self.head_rules:
            ok = rule.visible(i, j, heads) if ok is None else ok & rule.visible(i, j, heads)
        return ok

    def bias(self, i: torch.Tensor, j: torch.Tensor, heads: int) -> torch.Tensor | None:
        """The sum of the score biases at frame positions i [B, t, 1], j [B, 1, n] (None: no bias)."""
        terms = [term(i, j, heads) for s in self.stages for term in s.bias]
        return sum(terms[1:], terms[0]) if terms else None

    def query_scale(self, i: torch.Tensor) -> torch.Tensor | None:
        """The product of the query scales at stream indices i (None: no scale)."""
        total = None
        for s in self.stages:
            for factor in s.scale:
                total = factor(i) if total is None else total * factor(i)
        return total

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
