"""AdapterFusion: attention over adapters trained separately, at each block (stage 2 of Pfeiffer et al.).

Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247. Stage 1 trains one bottleneck adapter per
task (``surgery train`` of ``mlp: adapter(pfeiffer)``, one output directory each); stage 2 fuses
them. At a block with output h (before the residual connection) and input x, adapter j contributes
δ_j = adapter_j(x, h) − h (Houlsby/Pfeiffer: s·f(h); parallel: s·f(x)), and

    q = W_Q h + b_Q        k_j = W_K δ_j + b_K        α = softmax_j(q · k_j)
    h' = h + W_V Σ_j α_j δ_j

(the query from the block's output, keys and values from each adapter's output, the paper's
formulation; W_V after the weighted sum equals AdapterHub's W_V before it, by linearity). The
fused adapters and the base are frozen; only W_Q, b_Q, W_K, b_K, W_V train (3·d² + 2·d per block).

Initialisation: W_V = I, as AdapterHub's ``value_initialized`` (without its 1e-6 off the
diagonal), so a fusion of one adapter *is* that adapter; W_Q = 0 and b_Q = 0, so every score is 0
and the fusion starts as the exact average h + (1/n) Σ_j δ_j; W_K = I and b_K = 0 (AdapterHub
draws W_Q, W_K from N(0, 0.02)): with W_Q = 0 the query's gradient is Σ_j ∂L/∂s_j · k_j hᵀ, which a
zero W_K would make zero. The initialisation needs no random numbers. Not here: the paper's
regulariser λ‖I − W_V‖² and AdapterHub's temperature and dropout on the scores.

**Naming a trained adapter.** An operand of ``fuse`` is the output directory of an earlier
``surgery apply`` / ``surgery train`` — ``mlp: fuse("out/task_a", "out/task_b")`` — and stands for
the bottleneck adapter saved there at each block the rule selects. A path string reads as the
transform ``trained("out/task_a")`` (what plans and reports show); ``trained`` is only an operand
of ``fuse`` (elsewhere an error: ``surgery.load`` already gives a saved model back). Chosen over
``adapter(from=…)`` because a trained adapter's kind, width, activation and scale are fixed by its
output, not by arguments that could contradict it, and its obligations are the fusion's.
A relative path resolves against the directory of the spec's file (so a spec and the outputs it
fuses move together); a spec given as text resolves it against the working directory. The output
records that file, so ``surgery.load`` of a fused output resolves the same paths: the outputs it
fused must still be there when it loads (their tensors are in the fused output too, and win).

Errors, each at the operand: a path that is not a surgery output; an output holding no adapter
at a block the rule selects (its adapters are listed), e.g. ``attn`` of Pfeiffer adapters or a
layer that ``adapter_drop`` removed; an output trained on a model of another width.

Obligations (on each operand, at every block it fuses): alone in a fusion it equals the adapter
saved in its output (outputs on seeded x, h against the module ``surgery.load`` rebuilds, and its
tensors bit-exact); in its fusion, attention put entirely on it gives the model with that adapter
alone; at initialisation the fusion is the average of its adapters computed by hand.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from surgery.anchors.sublayer import ATTR, MODULES, composition, locate
from surgery.compose import Fuse, Leaf
from surgery.errors import SpecError
from surgery.transforms.adapter import Adapter, AdapterParams, BottleneckAdapter
from surgery.transforms.registry import Anchor, Params, Target, obligation, transform

PAPER = "https://arxiv.org/abs/2005.00247"


class TrainedParams(Params):
    path: str = Field(..., description="the output directory of an earlier surgery run holding adapters")

    @field_validator("path")
    @classmethod
    def _an_output(cls, value: str, info: ValidationInfo) -> str:
        """The output's absolute path, resolved against the spec file's directory (see the module)."""
        file = (info.context or {}).get("spec_file", "<spec>")
        base = Path.cwd() if file.startswith("<") else Path(file).resolve().parent
        path = (base / value).resolve()
        if not path.is_dir():
            raise ValueError(f"no output directory {value!r} (looked for {path})")
        if not (path / "surgery.json").is_file():
            raise ValueError(f"{path} is not a surgery output (it has no surgery.json)")
        return str(path)


@dataclass(frozen=True)
class SavedAdapter:
    params: AdapterParams
    prefix: str  # its tensors' keys in surgery.safetensors: prefix + "down.weight", …


@dataclass(frozen=True)
class Output:
    """What an earlier output holds for fusing: the bottleneck adapter at each block path."""

    path: Path
    hidden: int
    adapters: dict[str, SavedAdapter]

    def tensors(self, adapter: SavedAdapter) -> dict[str, torch.Tensor]:
        """The adapter's tensors (names as in :class:`BottleneckAdapter`), from the verified output."""
        _verified(str(self.path), _stamp(self.path))
        with safetensors.safe_open(str(self.path / "surgery.safetensors"), "pt") as f:
            return {name: f.get_tensor(adapter.prefix + name)
                    for name in ("down.weight", "down.bias", "up.weight", "up.bias")}


def _stamp(path: Path) -> tuple:
    """What changes when an output is written again (outputs are renamed into place, never edited)."""
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (path.stat(), (path / "surgery.json").stat()))


def saved(path: str) -> Output:
    """The adapters of the output at `path` (read once per version of it)."""
    return _read(path, _stamp(Path(path)))


@functools.lru_cache(maxsize=16)
def _read(path: str, stamp: tuple) -> Output:
    from surgery import io

    out = Path(path)
    manifest = io.read_manifest(out)
    keys: list[str] = []
    if not manifest.plain and (out / "surgery.safetensors").is_file():
        with safetensors.safe_open(str(out / "surgery.safetensors"), "pt") as f:
            keys = list(f.keys())
    adapters = {}
    for step in manifest.plan.get("steps", []):
        if step.get("transform") != "adapter":
            continue
        for block in step["targets"]:
            # The adapter's tensors at this block (none where adapter_drop removed it).
            found = [k.removesuffix("down.weight") for k in keys
                     if k.startswith(f"{block}.{ATTR}.") and k.endswith(".down.weight")]
            if len(found) == 1:
                adapters[block] = SavedAdapter(AdapterParams.model_validate(step["params"]), found[0])
    hidden = 0
    if (out / "base_config.json").is_file():
        config = transformers.AutoConfig.for_model(**json.loads((out / "base_config.json").read_text()))
        hidden = config.get_text_config().hidden_size
    return Output(out, hidden, adapters)


@functools.lru_cache(maxsize=16)
def _verified(path: str, stamp: tuple) -> None:
    from surgery import io

    io.verified(Path(path))


class AdapterFusion(nn.Module):
    """h' = h + W_V Σ_j softmax_j((W_Q h + b_Q)·(W_K δ_j + b_K)) δ_j over the adapters' δ_j (module docstring)."""

    def __init__(self, adapters: list[nn.Module]):
        super().__init__()
        like = adapters[0].up.weight
        hidden = like.shape[0]
        self.adapters = nn.ModuleList(adapters)
        self.query = nn.Linear(hidden, hidden, dtype=like.dtype, device=like.device)
        self.key = nn.Linear(hidden, hidden, dtype=like.dtype, device=like.device)
        self.value = nn.Linear(hidden, hidden, bias=False, dtype=like.dtype, device=like.device)
        if like.device.type != "meta":
            with torch.no_grad():
                for tensor in (self.query.weight, self.query.bias, self.key.bias):
                    tensor.zero_()
                self.key.weight.copy_(torch.eye(hidden))
                self.value.weight.copy_(torch.eye(hidden))

    def deltas(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        """[..., n, d]: each adapter's contribution δ_j."""
        return torch.stack([a.delta(x, h) for a in self.adapters], dim=-2).to(self.value.weight.dtype)

    def attention(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """[..., n]: α = softmax_j(q · k_j)."""
        q = self.query(h.to(self.value.weight.dtype))
        scores = (self.key(deltas) @ q.unsqueeze(-1)).squeeze(-1)
        return torch.softmax(scores, dim=-1)

    def delta(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        deltas = self.deltas(x, h)
        mixed = (self.attention(h, deltas).unsqueeze(-1) * deltas).sum(dim=-2)
        return self.value(mixed).to(h.dtype)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(x, h)


MODULES[Fuse] = AdapterFusion  # how a fuse(…) node is realised at a block


@transform("trained", params=TrainedParams, anchor=Anchor.SUBLAYER, positional=("path",), reference=PAPER)
class Trained:
    """An adapter trained earlier, read from its surgery output and frozen: an operand of fuse(…)."""

    freezes_base = True

    def accepts(self, p: TrainedParams, target: Target, module: nn.Module) -> bool:
        output = saved(p.path)
        if target.path not in output.adapters:
            where = sorted(output.adapters)
            listed = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
            raise SpecError(f"{p.path} holds no adapter at {target.path}; its adapters are at "
                            f"{listed or 'no block'} (select only those blocks)")
        return True

    def sublayer_adapter(self, p: TrainedParams, target: Target, hidden: int, like: torch.Tensor) -> nn.Module:
        output = saved(p.path)
        if output.hidden != hidden:
            raise SpecError(f"{p.path} was trained on a model of width {output.hidden}; this model's is {hidden}")
        adapter = output.adapters[target.path]
        module = Adapter().sublayer_adapter(adapter.params, target, hidden, like)
        if like.device.type != "meta":
            module.load_state_dict({k: v.to(like) for k, v in output.tensors(adapter).items()})
        return module.requires_grad_(False)  # stage 2: the fused adapters stay as trained

    @obligation("alone in a fusion, equals the adapter its output holds (x, h seeded; tensors exact)", tol=0.0)
    def equals_saved(self, p, check) -> float:
        from surgery import io

        output = saved(p.path)
        original = io.load(output.path).float()
        error = 0.0
        for i, target in enumerate(check.targets):
            fusion = composition(check.surgered, target)
            reference = original.get_submodule(output.adapters[target.path].prefix.rstrip("."))
            if not isinstance(fusion, AdapterFusion) or not isinstance(reference, BottleneckAdapter):
                return math.inf
            mine = fusion.adapters[0].state_dict()
            error = max(error, *(check.max_abs(v, mine[k]) for k, v in reference.state_dict().items()))
            x, h = (check.randn(2, 5, reference.up.out_features, salt=2 * i + j) for j in range(2))
            with torch.no_grad():
                error = max(error, check.max_abs(fusion(x, h), reference(x, h)))
        return error

    @obligation("in its fusion, all attention on it equals it alone (logits, relative)", tol=1e-6)
    def one_hot(self, p, check) -> float:
        fusions = _fusions(check)
        members = {j for group in fusions.values() for j in group.leaves()}
        fused = _built(check, members)
        alone = _built(check, {check.step.index}, {path: Leaf(check.step.index) for path in fusions})
        for target in check.targets:
            position = fusions[target.path].items.index(Leaf(check.step.index))
            _force(composition(fused, target), position)
        ids = check.tokens()
        reference = check.logits(alone, ids)
        if check.max_abs(reference, check.logits(check.original, ids)) < 1e-4:
            return math.inf  # the adapter does not change the model: nothing was tested
        return check.max_rel(check.logits(fused, ids), reference)

    @obligation("at init, the fusion is the average of its adapters by hand (logits, relative)", tol=1e-5)
    def average(self, p, check) -> float:
        fused = _built(check, {j for group in _fusions(check).values() for j in group.leaves()})
        ids = check.tokens()
        handles = []
        try:
            for target in check.targets:
                adapters = list(composition(fused, target).adapters)
                handles += _replace_output(check.original, target, lambda x, h, adapters=adapters: h + sum(
                    a(x, h) - h for a in adapters) / len(adapters))
            reference = check.logits(check.original, ids)
        finally:
            for handle in handles:
                handle.remove()
        result = check.logits(fused, ids)
        if check.max_abs(result, check.logits(check.original, ids)) < 1e-4:
            return math.inf  # the adapters do not change the model: nothing was tested
        return check.max_rel(result, reference)


def _fusions(check) -> dict[str, Fuse]:
    """The fusion naming this step at each of its blocks, from the whole plan."""
    found = {}
    for path, tree in check.plan.trees.get(Anchor.SUBLAYER, {}).items():
        for group in tree.groups():
            if isinstance(group, Fuse) and Leaf(check.step.index) in group.items:
                found[path] = group
    return found


def _built(check, steps: set[int], trees: dict | None = None) -> nn.Module:
    """A copy of the untouched model with the plan's `steps` (at `trees`, default the plan's)."""
    from surgery.apply import apply_plan
    from surgery.planner import Plan

    plan = check.plan.restricted(steps)
    if trees is not None:
        plan = Plan(plan.spec, plan.arch, plan.steps, {Anchor.SUBLAYER: trees})
    model = copy.deepcopy(check.original)
    apply_plan(plan, model, seed=check.seed)
    return model.eval()


def _force(fusion: nn.Module, position: int) -> None:
    """Make `fusion` put all its attention on its adapter at `position` (instead of computing it)."""
    def one_hot(h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full(deltas.shape[:-2], position), deltas.shape[-2]).to(deltas)

    fusion.attention = one_hot


def _replace_output(model: nn.Module, target: Target, fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> list:
    """Hooks making the block `target` of `model` output fn(x, h) (x its input, h its output)."""
    source, sink = locate(model, target)
    first = next(iter(inspect.signature(source.forward).parameters))
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs[first]

    def replace(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            new = fn(seen.pop("x"), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return [source.register_forward_pre_hook(keep, with_kwargs=True), sink.register_forward_hook(replace)]
