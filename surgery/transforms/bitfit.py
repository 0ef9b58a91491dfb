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

import copy
from itertools import combinations

import torch
from pydantic import Field
from torch import nn

from surgery.transforms.registry import Anchor, Params, obligation, transform


class BitFitParams(Params):
    """The selector chooses which biases train; ``add`` gives bias-free linear layers a zero bias first."""

    add: bool = Field(False, description="add a zero bias to each selected linear layer that has none")


def is_bias(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def biases(module: nn.Module) -> list[torch.Tensor]:
    """The bias tensors in `module`'s subtree (each once, even when tied under several names)."""
    return [p for name, p in module.named_parameters() if is_bias(name)]


def missing_biases(model: nn.Module, regions: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` layers inside `regions` (paths in `model`) that have no bias; the
    output embedding (the LM head) only where a region is that module itself."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    out: list[str] = []
    for region in regions:
        for name, module in model.get_submodule(region).named_modules():
            path = f"{region}.{name}" if region and name else region or name
            if (isinstance(module, nn.Linear) and module.bias is None and path not in out
                    and (module is not head or name == "")):
                out.append(path)
    return out


def _bias_flags(config) -> list[str]:
    return sorted(k for k, v in config.to_dict().items() if k.endswith("_bias") and v is False)


@transform("bitfit", params=BitFitParams, anchor=Anchor.PARAMETERS, reference="https://arxiv.org/abs/2106.10199")
class BitFit:
    """BitFit: train only the bias terms of the selected region (no new modules)."""

    freezes_base = True

    def accepts(self, p: BitFitParams, target, module: nn.Module) -> bool:
        # A region without biases (any Llama region) is dropped, so planning reports "finds no anchor";
        # with add=true a region with a bias-free linear layer has somewhere to put one.
        return any(is_bias(name) for name, _ in module.named_parameters()) or bool(
            p.add and missing_biases(module, [""]))

    def apply(self, p: BitFitParams, model: nn.Module, targets, edit) -> None:
        for path in missing_biases(model, [t.path for t in targets]) if p.add else []:
            layer = model.get_submodule(path)
            weight = layer.weight
            edit.set_attr(layer, "bias", nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                                  device=weight.device)))
        seen: set[int] = set()
        for target in targets:  # get_submodule("") is the model itself
            for param in biases(model.get_submodule(target.path)):
                if id(param) not in seen:
                    seen.add(id(param))
                    edit.requires_grad(param, True)

    def config_fields(self, p: BitFitParams, model: nn.Module) -> dict | None:
        """The config switches under which transformers builds `model`'s tensors (``{}`` when nothing
        was added), or None when no switches do: then only the surgery format holds the added biases."""
        if not p.add:
            return {}
        flags, keys = _bias_flags(model.config), set(model.state_dict())
        for k in range(len(flags) + 1):
            for chosen in combinations(flags, k):
                config = copy.deepcopy(model.config)
                for flag in chosen:
                    setattr(config, flag, True)
                with torch.device("meta"):
                    built = type(model)._from_config(config)
                if set(built.state_dict()) == keys:
                    return dict.fromkeys(chosen, True)
        return None

    @obligation("no new modules: module tree unchanged, parameter names but for the added biases", tol=0)
    def no_new_modules(self, p, check) -> float:
        (mods, params), (mods0, params0) = check.structure(check.surgered), check.structure(check.original)
        added = {f"{path}.bias" for path in missing_biases(check.original, [t.path for t in check.targets])} \
            if p.add else set()
        return float(len(mods ^ mods0) + len(params ^ (params0 | added)))

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
