"""Unfreeze: train the selected modules' own parameters in full, beside whatever adapters the plan adds.

    θ_trainable = θ_adapters ∪ { every parameter of the selected modules }

No module is added or replaced and no value changes: the step only sets ``requires_grad`` (the
pipeline freezes every original parameter first, since ``freezes_base`` is set, then this step
unfreezes the region's). It is what PEFT calls ``modules_to_save`` (modules trained in full and
saved with the adapter) and LongLoRA ``trainable_params`` ("embed,norm": LoRA alone does not adapt a
model to long contexts, Chen et al. 2023, https://arxiv.org/abs/2309.12307, §3.3). The name says
what the step does to the model; PEFT's says what its saver does, and a selector is already the
list of modules. Regions come from the role maps: ``embed, norm.*: unfreeze`` is the input
embeddings, the final norm and every layer's norms on any mapped architecture.

A tensor shared by several modules (tied input and output embeddings) is one parameter: unfreezing
``embed`` trains the output head through it, as in LongLoRA's training of tied models.

Obligations: no value changes (state dict bit-identical); no new modules (module tree and parameter
names unchanged); exactly the region's parameters became trainable, every other original one stays
frozen; outputs unchanged.
"""

from __future__ import annotations

from torch import nn

from surgery.transforms.registry import Anchor, Params, obligation, transform


class UnfreezeParams(Params):
    """No arguments: the selector says which modules train."""


def region_parameters(model: nn.Module, paths: list[str]) -> list[nn.Parameter]:
    """The parameters of the modules at `paths` (subtrees), each once even when tied or nested."""
    seen: dict[int, nn.Parameter] = {}
    for path in paths:
        for param in model.get_submodule(path).parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


@transform("unfreeze", params=UnfreezeParams, anchor=Anchor.PARAMETERS, reference="https://arxiv.org/abs/2309.12307")
class Unfreeze:
    """Train the selected modules' own parameters in full (PEFT's modules_to_save; LongLoRA's embeddings and norms)."""

    freezes_base = True

    def accepts(self, p: UnfreezeParams, target, module: nn.Module) -> bool:
        return any(True for _ in module.parameters())  # a region without parameters finds no anchor

    def apply(self, p: UnfreezeParams, model: nn.Module, targets, edit) -> None:
        for param in region_parameters(model, [t.path for t in targets]):
            edit.requires_grad(param, True)

    def peft_modules(self, p: UnfreezeParams, targets) -> list[str]:
        return [t.path for t in targets]

    @obligation("no value changes: state dict bit-identical", tol=0)
    def values_unchanged(self, p, check) -> float:
        after, before = check.surgered.state_dict(), check.original.state_dict()
        if after.keys() != before.keys():
            return float(len(after.keys() ^ before.keys()))
        return max((check.max_abs(after[k].float(), before[k].float()) for k in before), default=0.0)

    @obligation("no new modules: module tree and parameter names unchanged", tol=0)
    def no_new_modules(self, p, check) -> float:
        (mods, params), (mods0, params0) = check.structure(check.surgered), check.structure(check.original)
        return float(len(mods ^ mods0) + len(params ^ params0))

    @obligation("exactly the region's parameters are trainable", tol=0)
    def only_region(self, p, check) -> float:
        # Counts every wrong flag (a region parameter left frozen, one outside the region trainable),
        # plus 1 when nothing became trainable; each tensor once, however many names it has.
        region = {id(q) for q in region_parameters(check.surgered, [t.path for t in check.targets])}
        wrong = sum(q.requires_grad != (id(q) in region) for q in check.surgered.parameters())
        return float(wrong + (not region))

    @obligation("outputs unchanged: logits max abs diff", tol=0)
    def outputs_unchanged(self, p, check) -> float:
        ids = check.tokens()
        return check.max_abs(check.logits(check.surgered, ids), check.logits(check.original, ids))
