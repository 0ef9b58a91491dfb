"""Run every step's equivalence obligations and report each with its measured error.

Each step is checked in isolation: a copy of the untouched model gets only that step (with the
same seed the real application uses), and the step's obligations compare that copy
(``check.surgered``) with the untouched model (``check.original``) on seeded random inputs.
The model being verified is never modified; a bf16/fp16 model is checked as a float32 copy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.apply import apply_plan, get_module
from surgery.layers import SurgeryLinear
from surgery.plan import Plan, Step


@dataclass(frozen=True)
class Measurement:
    step: int
    transform: str
    obligation: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol


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
        return [{**vars(m), "ok": m.ok} for m in self.measurements]

    def text(self) -> str:
        rows = [f"{'step':>4}  {'transform':<14} {'obligation':<52} {'error':>10} {'tol':>8}  ok"]
        for m in self.measurements:
            rows.append(f"{m.step:>4}  {m.transform:<14} {m.obligation:<52} {m.error:>10.2e} {m.tol:>8.0e}  "
                        f"{'yes' if m.ok else 'NO'}")
        return "\n".join(rows)


class Check:
    """What an obligation sees: the untouched model, a copy with only this step, and seeded inputs."""

    def __init__(self, original: nn.Module, surgered: nn.Module, step: Step, seed: int, plan: Plan | None = None):
        self.original, self.surgered, self.step, self.seed = original, surgered, step, seed
        self.plan = plan  # the whole plan, for obligations of a composition (e.g. rope + window)
        self.config = getattr(original, "config", None)

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
        out = model(input_ids=input_ids, **kwargs)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()

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


def verify(plan: Plan, model: nn.Module, *, seed: int = 0, progress=None) -> Report:
    """Check every step's obligations; `model` is left untouched."""
    report = Report()
    was_training = model.training
    model.eval()
    reference = _in_float32(model)
    try:
        for step in plan.steps:
            surgered = copy.deepcopy(reference)
            apply_plan(plan.restricted({step.index}), surgered, seed=seed)
            surgered.eval()
            check = Check(reference, surgered, step, seed, plan)
            impl = step.spec.instance()
            for ob in step.spec.obligations:
                if progress:
                    progress(f"step {step.index} {step.transform}: {ob.name}")
                try:
                    error = float(getattr(impl, ob.method)(step.params, check))
                except Exception as e:  # an obligation that crashes is a failed obligation, with its reason
                    report.measurements.append(Measurement(step.index, step.transform,
                                                           f"{ob.name} [crashed: {type(e).__name__}: {e}]",
                                                           math.inf, ob.tol))
                    continue
                report.measurements.append(Measurement(step.index, step.transform, ob.name, error, ob.tol))
            del surgered
    finally:
        model.train(was_training)
    return report
