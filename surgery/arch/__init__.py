"""Architecture knowledge as data: one JSON file per family in ``arch/data/``.

Each file names, relative to the model's backbone (``model.base_model``), the decoder layers'
``ModuleList`` and the module path of every role inside a layer (``attn``, ``attn.q``, ``mlp.down``…),
plus model-level roles (``embed``, ``norm``, ``rotary``) and head roles relative to the top model
(``lm_head``). Adding an architecture is adding a file; no code branches on ``model_type``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict
from torch import nn

from surgery.errors import ModelError


class Architecture(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    model_types: list[str]
    layers: str
    layer: dict[str, str | list[str]]
    model: dict[str, str]
    head: dict[str, str]
    causal: bool = True

    def layer_paths(self, role: str) -> list[str]:
        value = self.layer[role]
        return [value] if isinstance(value, str) else list(value)


@lru_cache(maxsize=1)
def architectures() -> dict[str, Architecture]:
    out = {}
    for entry in resources.files("surgery.arch").joinpath("data").iterdir():
        if entry.name.endswith(".json"):
            arch = Architecture.model_validate(json.loads(entry.read_text()))
            for model_type in arch.model_types:
                out[model_type] = arch
    return out


def detect(model: nn.Module) -> Architecture:
    """The role map for `model`, chosen by ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = architectures()
    if model_type not in known:
        # A model's type is a fact, not a typo: list what is supported rather than guess.
        raise ModelError(
            f"no role map for model type {model_type!r} (role maps exist for {', '.join(sorted(known))}); "
            "add a JSON file to surgery/arch/data/ or use quoted module paths"
        )
    return known[model_type]


def backbone_prefix(model: nn.Module) -> str:
    """Path of the backbone inside `model` ('' when `model` is the backbone itself)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""
