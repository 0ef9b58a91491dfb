"""The Python API: ``parse``, ``plan``, ``compile``, ``load``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgery.apply import Edit, apply_plan
from surgery.errors import ObligationError
from surgery.models import model_class
from surgery.planner import Counts, Plan, build_plan
from surgery.syntax import ast, parse as parse_text, parse_file
from surgery.verify import Report, verify


def parse(spec: str | Path) -> ast.Spec:
    """Parse a spec given as text, or as a path to a ``.surg`` file.

    A :class:`~pathlib.Path` is a file. A string is a file only when it cannot be spec text — no
    ``:`` (every rule has one), no ``;`` and no newline — and it names an existing file or ends in
    ``.surg``; anything else is spec text, so ``"attn.q: lora  # see x.surg"`` is a rule.
    """
    if isinstance(spec, Path):
        return parse_file(spec)
    name = spec.strip()
    if not any(c in name for c in ":;\n") and (name.endswith(".surg") or Path(name).is_file()):
        return parse_file(name)
    return parse_text(spec)


def _as_spec(spec) -> ast.Spec:
    return spec if isinstance(spec, ast.Spec) else parse(spec)


def count(model: nn.Module) -> Counts:
    counts = Counts()
    for param in model.parameters():  # tied parameters come once
        # A 4-bit weight packs two values per byte: count the weights it holds, not its bytes.
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        counts.total += n
        counts.trainable += n if param.requires_grad else 0
    return counts


def skeleton(model: nn.Module) -> nn.Module:
    """A weightless (meta-device) model of the same class and config."""
    cls = type(model) if hasattr(type(model), "config_class") else model_class(model.config)
    with torch.device("meta"):
        return cls(model.config)


def plan(model: nn.Module, spec) -> Plan:
    """Resolve `spec` against `model` and count parameters on a meta-device copy (no weights read)."""
    spec = _as_spec(spec)
    result = build_plan(spec, model)
    meta = model if _is_meta(model) else skeleton(model)
    result.base_counts = count(meta)
    edit = apply_plan(result, meta)
    try:
        after = count(meta)
    finally:  # `meta` may be the caller's own model: never leave it surgered, even on Ctrl-C
        edit.rollback()
    after.added = after.total - result.base_counts.total
    result.counts = after
    return result


def _is_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


@dataclass
class Result:
    """A surgered model with everything that proves and describes it."""

    model: nn.Module
    plan: Plan
    report: Report | None
    edit: Edit
    before_tree: object | None = None   # TreeSnapshot before surgery
    before_graph: object | None = None  # GraphSnapshot (or the reason capture failed), when asked for
    graph_inputs: torch.Tensor | None = None
    seed: int = 0
    schedules: object | None = None  # surgery.train.Schedules, once training attaches them (saved with the result)

    def diff(self):
        """The before/after diff: module tree, and computation graphs if ``compile(graph_inputs=…)``."""
        from surgery.diff import Diff, capture_graph, snapshot_tree

        after_graph = capture_graph(self.model, self.graph_inputs) if self.graph_inputs is not None else None
        return Diff(self.before_tree, snapshot_tree(self.model), self.before_graph, after_graph, plan=self.plan)

    def save(self, out_dir: str | Path, *, merge: bool = False) -> Path:
        """Write the surgered model to `out_dir` (whole or not at all); see :mod:`surgery.io`."""
        from surgery.io import save

        return save(self, out_dir, merge=merge)


def compile(model: nn.Module, spec, *, check: bool = True, seed: int = 0, graph_inputs: torch.Tensor | None = None,
            progress=None) -> Result:
    """Parse, plan, verify and apply `spec` to `model` in place.

    Obligations are checked first, on copies; if any fails an :class:`ObligationError` is raised and
    `model` is untouched. Applying is transactional: if a step fails, or anything interrupts compile
    before it returns (Ctrl-C, ``SystemExit``), `model` is rolled back exactly and the interruption
    is re-raised unchanged.
    With `graph_inputs` (token ids), the computation graph is captured before and after for diffs.
    """
    from surgery.diff import capture_graph, snapshot_tree

    spec = _as_spec(spec)
    the_plan = build_plan(spec, model)
    report = None
    if check:
        report = verify(the_plan, model, seed=seed, progress=progress)
        if not report.ok:
            lines = "\n".join(f"  step {m.step} {m.transform}: {m.obligation}: error {m.error:.3g} > tol {m.tol:g}"
                              for m in report.failures)
            raise ObligationError(f"{len(report.failures)} obligation(s) failed; the model was not changed\n{lines}",
                                  report)
    before_tree = snapshot_tree(model)
    before_graph = capture_graph(model, graph_inputs) if graph_inputs is not None else None
    the_plan.base_counts = count(model)
    edit = apply_plan(the_plan, model, seed=seed)
    try:
        the_plan.counts = count(model)
        the_plan.counts.added = the_plan.counts.total - the_plan.base_counts.total
        return Result(model, the_plan, report, edit, before_tree, before_graph, graph_inputs, seed)
    except BaseException:  # e.g. Ctrl-C after the steps ran: the caller gets no Result, so no surgery either
        edit.rollback()
        raise


def load(out_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by :meth:`Result.save` (bit-exactly)."""
    from surgery.io import load as load_dir

    return load_dir(out_dir)


__all__ = ["parse", "plan", "compile", "load", "Result"]
