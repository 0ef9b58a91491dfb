"""BitFit: fine-tune only the bias terms; every other parameter stays frozen.

    θ_trainable = { b : b is a bias tensor inside the selected region }

No module is added or replaced and no value changes: the step only flips ``requires_grad`` (the
pipeline freezes every parameter first because ``freezes_base`` is set, then BitFit unfreezes the
region's biases). A bias is a parameter whose own name is ``bias`` or ends in ``_bias`` (e.g. the
``q_bias``/``v_bias`` of BEiT-style attention), LayerNorm biases included, as in the paper.
Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199.

Obligations: no new modules (module names/types and parameter names unchanged); exactly the
region's bias tensors are trainable; outputs unchanged at initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.transforms.registry import Anchor, Params, obligation, transform


class BitFitParams(Params):
    """BitFit has no hyper-parameters: the selector chooses which biases train."""


def is_bias(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def biases(module: nn.Module) -> list[torch.Tensor]:
    """The bias tensors in `module`'s subtree (each once, even when tied under several names)."""
    return [p for name, p in module.named_parameters() if is_bias(name)]


@transform("bitfit", params=BitFitParams, anchor=Anchor.PARAMETERS, reference="https://arxiv.org/abs/2106.10199")
class BitFit:
    """BitFit: train only the bias terms of the selected region (no new modules)."""

    freezes_base = True

    def accepts(self, p: BitFitParams, target, module: nn.Module) -> bool:
        # A region without biases (any Llama region) is dropped, so planning reports "finds no anchor".
        return any(is_bias(name) for name, _ in module.named_parameters())

    def apply(self, p: BitFitParams, model: nn.Module, targets, edit) -> None:
        seen: set[int] = set()
        for target in targets:  # get_submodule("") is the model itself
            for param in biases(model.get_submodule(target.path)):
                if id(param) not in seen:
                    seen.add(id(param))
                    edit.requires_grad(param, True)

    @obligation("no new modules: module tree and parameter names unchanged", tol=0)
    def no_new_modules(self, p, check) -> float:
        def tree(model: nn.Module):
            return ({(name, type(m)) for name, m in model.named_modules()},
                    {name for name, _ in model.named_parameters(remove_duplicate=False)})

        (mods, params), (mods0, params0) = tree(check.surgered), tree(check.original)
        return float(len(mods ^ mods0) + len(params ^ params0))

    @obligation("only the region's bias tensors are trainable", tol=0)
    def only_biases(self, p, check) -> float:
        # Counts every wrong flag: a trainable non-bias, a region bias left frozen, a bias outside the
        # region made trainable; plus 1 if nothing at all became trainable.
        region = {id(b) for t in check.targets for b in biases(check.module(t.path))}
        wrong, trainable = 0, 0
        for name, param in check.surgered.named_parameters():
            trainable += param.requires_grad
            if is_bias(name):
                wrong += param.requires_grad != (id(param) in region)
            else:
                wrong += param.requires_grad
        return float(wrong + (trainable == 0))

    @obligation("outputs unchanged at init: logits max abs diff", tol=1e-6)
    def outputs_unchanged(self, p, check) -> float:
        ids = check.tokens()
        return check.max_abs(check.logits(check.surgered, ids), check.logits(check.original, ids))
