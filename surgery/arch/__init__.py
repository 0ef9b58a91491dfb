"""Architecture knowledge as data: one JSON file per family in ``arch/data/``.

Each file names, relative to the model's backbone (``model.base_model``), the decoder layers'
``ModuleList`` and the module path of every role inside a layer (``attn``, ``attn.q``, ``mlp.down``…),
plus model-level roles (``embed``, ``norm``, ``rotary``) and head roles relative to the top model
(``lm_head``), and the ``sublayers`` (``attn``, ``mlp``) as wholes: per sublayer, the module whose
first argument is its input and the module whose output is its output before the residual
connection (a string: one module is both). Adding an architecture is adding a file; no code
branches on ``model_type``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from surgery.errors import ModelError


class SublayerPaths(BaseModel):
    """Where a sublayer's input enters and its output leaves, relative to its decoder layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str
    output: str


class Architecture(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    model_types: list[str]
    layers: str
    layer: dict[str, str | list[str]]
    model: dict[str, str]
    head: dict[str, str]
    causal: bool = True
    sublayers: dict[str, SublayerPaths] = {}

    @field_validator("sublayers", mode="before")
    @classmethod
    def _one_module(cls, value: dict) -> dict:
        return {k: {"input": v, "output": v} if isinstance(v, str) else v for k, v in value.items()}

    @property
    def mapped(self) -> bool:
        """Whether roles are known; an unmapped model is reached by quoted module paths only."""
        return bool(self.model_types)

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
    """The role map for `model`, chosen by ``config.model_type``.

    A transformers model whose type has no role map gets an empty one (``mapped`` is False): quoted
    module paths still select its modules, and whatever needs a role says so when it is used.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = architectures()
    if model_type in known:
        return known[model_type]
    if not model_type:
        inner = next((p for p, m in model.named_modules() if getattr(getattr(m, "config", None), "model_type", None)),
                     None)
        where = f", but it wraps one at {inner!r}: plan on that module" if inner else ""
        raise ModelError(f"{type(model).__name__} is not a transformers model (it has no config.model_type){where}")
    return Architecture(name=model_type, model_types=[], layers="", layer={}, model={}, head={})


def no_role_map(arch: Architecture) -> str:
    """Why a role cannot be found in a model of an unmapped architecture, and what to do."""
    return (f"this {arch.name} model has no role map (role maps exist for {', '.join(sorted(architectures()))}); "
            f"add surgery/arch/data/{arch.name}.json")


def backbone_prefix(model: nn.Module) -> str:
    """Path of the backbone inside `model` ('' when `model` is the backbone itself)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""
