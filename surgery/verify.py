"""Run every step's equivalence obligations and report each with its measured error.

Each step is checked in isolation: a copy of the untouched model gets only that step (with the
same seed the real application uses; ungated: each ``gate(…)`` has obligations of its own,
:func:`surgery.gating.check_gates`), and the step's obligations compare that copy
(``check.surgered``) with the untouched model (``check.original``) on seeded random inputs.
The model being verified is never modified; a bf16/fp16 model is checked as a float32 copy.
Obligations compare logits at every position; a model without them (a backbone, a sequence
classifier) shows its per-position outputs instead (:func:`_per_position_logits`). A model on the
meta device has no outputs to compare, so checking it is refused up front.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from surgery.apply import apply_plan, get_module
from surgery.arch import backbone_prefix
from surgery.errors import ModelError
from surgery.gating import check_gates, ungated_plan
from surgery.layers import SurgeryLinear
from surgery.planner import Plan, Step
from surgery.transforms.registry import NotApplicable


@dataclass(frozen=True)
class Measurement:
    step: int
    transform: str
    obligation: str
    error: float
    tol: float
    not_applicable: str | None = None  # why the model has nothing to check (the error is then NaN)

    @property
    def ok(self) -> bool:
        return self.not_applicable is not None or (math.isfinite(self.error) and self.error <= self.tol)

    @property
    def shown_error(self) -> str:
        return "n/a" if self.not_applicable is not None else f"{self.error:.2e}"


@dataclass
class Report:
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.measurements)

    @property
    def failures(self) -> list[Measurement]:
        return [m for m in self.measurements if not m.ok]

    def to_json(self) -> list[dict]:
        return [{**vars(m), "error": None if m.not_applicable else m.error, "ok": m.ok} for m in self.measurements]

    def text(self) -> str:
        rows = [f"{'step':>4}  {'transform':<14} {'obligation':<52} {'error':>10} {'tol':>8}  ok"]
        for m in self.measurements:
            rows.append(f"{m.step:>4}  {m.transform:<14} {m.obligation:<52} {m.shown_error:>10} {m.tol:>8.0e}  "
                        f"{'yes' if m.ok else 'NO'}" + (f" ({m.not_applicable})" if m.not_applicable else ""))
        return "\n".join(rows)


class Check:
    """What an obligation sees: the untouched model, a copy with only this step, and seeded inputs."""

    def __init__(self, original: nn.Module, surgered: nn.Module, step: Step, seed: int,
                 per_position: Callable[[nn.Module], list] = lambda model: [], plan: Plan | None = None):
        self.original, self.surgered, self.step, self.seed = original, surgered, step, seed
        self.plan = plan  # the whole plan, for obligations of a composition (e.g. rope + window)
        self.config = getattr(original, "config", None)
        self.per_position = per_position  # see _per_position_logits

    @property
    def targets(self):
        return self.step.targets

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + self.step.index * 10 + salt)

    def tokens(self, batch: int = 2, length: int = 16, salt: int = 0) -> torch.Tensor:
        vocab = getattr(self.config, "vocab_size", 128)
        return torch.randint(0, vocab, (batch, length), generator=self.generator(salt))

    def randn(self, *shape: int, salt: int = 0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator(salt), dtype=dtype)

    def module(self, path: str, *, surgered: bool = True) -> nn.Module:
        return get_module(self.surgered if surgered else self.original, path)

    @torch.no_grad()
    def logits(self, model: nn.Module, input_ids=None, **kwargs) -> torch.Tensor:
        """`model`'s logits at every position (a backbone's last hidden state; a classifier's
        logits before pooling), also for a model an obligation built itself."""
        handles = self.per_position(model)
        try:
            out = model(input_ids=input_ids, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()

    @staticmethod
    def structure(model: nn.Module) -> tuple[set, set]:
        """(module path, type) pairs and parameter names (tied ones under each name): what the
        "no new modules" obligations compare."""
        return ({(name, type(m)) for name, m in model.named_modules()},
                {name for name, _ in model.named_parameters(remove_duplicate=False)})

    def linear_layers(self):
        """(target, surgered SurgeryLinear, original layer) for every linear target of this step."""
        for target in self.targets:
            layer = self.module(target.path)
            if not isinstance(layer, SurgeryLinear):
                raise TypeError(f"{target.path} is not wrapped by the pipeline")
            yield target, layer, self.module(target.path, surgered=False)

    def layer_identity_error(self) -> float:
        """max |layer(x) − original(x)| over the step's linear targets, on seeded random x."""
        errors = [0.0]
        for i, (_, layer, original) in enumerate(self.linear_layers()):
            x = self.randn(3, layer.in_features, salt=i)
            with torch.no_grad():
                errors.append(self.max_abs(layer(x), original(x)))
        return max(errors)

    def logits_identity_error(self) -> float:
        """max |logits(surgered) − logits(original)| on seeded tokens."""
        ids = self.tokens()
        return self.max_abs(self.logits(self.surgered, ids), self.logits(self.original, ids))

    @torch.no_grad()
    def padded_rows_error(self, model: nn.Module, lengths: tuple[int, ...] = (16, 11, 5), *,
                          generate_positions: bool = False, decode: int = 0, salt: int = 7) -> float:
        """max |row r of a left-padded batch − row r fed alone| over each row's real tokens, relative
        to the row's scale as in :meth:`max_rel` (on logits, or the last hidden state).

        Row r holds ``lengths[r]`` seeded tokens right-aligned in a batch of width max(lengths), with
        pad id 0 and ``attention_mask`` 0 before them. ``generate_positions`` passes ``position_ids``
        as ``generate()`` computes them (cumsum(mask) − 1, 0 on pads); otherwise none, the model's
        default. ``decode = k`` feeds the batch's last k tokens one at a time through the KV cache
        after a prefill of the rest, the mask (and positions) growing as in ``generate()``; the model
        must return a cache. Each row alone is one forward of its tokens, without mask or positions.
        A transform whose result depends on positions promises that padding does not change a row."""
        width = max(lengths)
        device = next(model.parameters()).device
        ids = self.tokens(len(lengths), width, salt=salt).to(device)
        mask = torch.zeros_like(ids)
        for row, k in enumerate(lengths):
            mask[row, width - k:] = 1
        padded = ids * mask
        cache, pieces = None, []
        for start, end in [(0, width - decode), *((t, t + 1) for t in range(width - decode, width))]:
            kwargs = {"input_ids": padded[:, start:end], "attention_mask": mask[:, :end]}
            if generate_positions:
                seen = mask[:, :end]
                kwargs["position_ids"] = (seen.cumsum(-1) - 1).masked_fill(seen == 0, 0)[:, start:]
            if decode:
                kwargs.update(use_cache=True, cache=cache)
            out = model(**kwargs)
            if decode:
                cache = getattr(out, "cache", None)
                if cache is None:
                    raise TypeError(f"{type(model).__name__} returns no KV cache to decode with")
            pieces.append(out.logits if hasattr(out, "logits") else out.last_hidden_state)
        batch = torch.cat(pieces, dim=1).float()
        errors = [0.0]
        for row, k in enumerate(lengths):
            alone = self.logits(model, ids[row:row + 1, width - k:])
            errors.append(self.max_rel(batch[row:row + 1, width - k:], alone))
        return max(errors)

    @staticmethod
    def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
        """max |a − b| / max(1, max |b|): float32 error grows with the logits' scale on real models."""
        if a.shape != b.shape:
            return math.inf
        return Check.max_abs(a, b) / max(1.0, b.float().abs().max().item()) if a.numel() else 0.0

    @staticmethod
    def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
        if a.shape != b.shape:
            return math.inf
        return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _in_float32(model: nn.Module) -> nn.Module:
    """`model`, or a float32 copy of it when it holds bf16/fp16 weights.

    Obligations prove a transform's math, which does not depend on the precision it later runs in;
    in bf16 every tolerance would drown in rounding (its epsilon is 2^-7). So a low-precision model
    is checked as a float32 copy, and the same code is then applied to the model as it is."""
    if all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def _per_position_logits(model: nn.Module) -> Callable[[nn.Module], list]:
    """How to make `model(...).logits` per position, as obligations compare it (token by token,
    prefill against decode); returns a function that installs that on a model (hook handles).

    A causal or masked LM already has per-position logits: nothing to do. A backbone without a head
    (``LlamaModel``) has none: its whole output, the last hidden state at every position, is shown
    as ``.logits``. A sequence classifier pools its head's logits at one position: its head (a child
    module outside the backbone applied at every position, e.g. ``score``) is shown before pooling —
    the pooled logits are among those, so comparing them all proves at least as much. A classifier
    whose head sees a pooled vector (BERT's) keeps its pooled logits.
    """
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    captured: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            out = model(input_ids=ids)
    except Exception:  # a model that needs more than token ids: its obligations report why they fail
        return lambda m: []
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        return lambda m: []
    backbone = model.get_submodule(backbone_prefix(model).rstrip("."))
    heads = [name for name, child in model.named_children() if child is not backbone]

    def install(m: nn.Module) -> list:
        def keep(module, args, output):
            if isinstance(output, torch.Tensor) and output.dim() == 3:
                captured["head"] = output

        def show(module, args, output):
            per_position = captured.pop("head", None)
            if per_position is None and logits is None:
                per_position = output.last_hidden_state
            if per_position is not None:
                output["logits"] = per_position
            return output

        handles = [m.get_submodule(name).register_forward_hook(keep) for name in heads]
        return handles + [m.register_forward_hook(show)]

    return install


def verify(plan: Plan, model: nn.Module, *, seed: int = 0, progress=None) -> Report:
    """Check every step's obligations; `model` is left untouched."""
    if any(p.is_meta for p in model.parameters()):
        # Every obligation measures outputs; a meta tensor has none, so each would report "inf".
        raise ModelError("this model is on the meta device (no weights), so its obligations cannot be checked; "
                         "load its weights, or plan without checking (surgery.plan, compile(check=False))")
    report = Report()
    was_training = model.training
    model.eval()
    reference = _in_float32(model)
    per_position = _per_position_logits(reference)
    handles: list = []
    try:
        for step in plan.steps:
            surgered = copy.deepcopy(reference)
            # A step's own obligations are its own math: checked ungated (gates have theirs, below).
            apply_plan(ungated_plan(plan.restricted({step.index})), surgered, seed=seed)
            surgered.eval()
            handles = per_position(reference) + per_position(surgered)  # after the copy: it gets its own
            check = Check(reference, surgered, step, seed, per_position, plan)
            impl = step.spec.instance()
            for ob in step.spec.obligations:
                if progress:
                    progress(f"step {step.index} {step.transform}: {ob.name}")
                try:
                    result = getattr(impl, ob.method)(step.params, check)
                    if isinstance(result, NotApplicable):
                        report.measurements.append(Measurement(step.index, step.transform, ob.name, math.nan,
                                                               ob.tol, not_applicable=result.reason))
                        continue
                    error = float(result)
                except Exception as e:  # an obligation that crashes is a failed obligation, with its reason
                    report.measurements.append(Measurement(step.index, step.transform,
                                                           f"{ob.name} [crashed: {type(e).__name__}: {e}]",
                                                           math.inf, ob.tol))
                    continue
                report.measurements.append(Measurement(step.index, step.transform, ob.name, error, ob.tol))
            for handle in handles:
                handle.remove()
            handles = []
            del surgered
        for row in check_gates(plan, reference, seed, per_position):  # each gate's obligations
            if progress:
                progress(f"step {row[0]} {row[1]}: {row[2]}")
            report.measurements.append(Measurement(*row))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return report
