"""Late binding to the model's rotary module, so stages compose with a ``rope(...)`` step."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgery.arch import backbone_prefix, detect


@dataclass(frozen=True)
class RotaryRef:
    """The rotary module, looked up at call time (a later ``rope`` step may replace it).

    Holds the parent module, not a path from the root: a deep copy of the model copies this with
    the same memo, so the copy's reference points into the copy. Not an ``nn.Module`` attribute,
    so it registers nothing."""

    parent: nn.Module
    name: str

    def __call__(self) -> nn.Module:
        return getattr(self.parent, self.name)


def rotary_ref(model: nn.Module) -> RotaryRef | None:
    """A reference to `model`'s rotary embedding (role ``rotary``), or None if it has none."""
    rel = detect(model).model.get("rotary")
    if rel is None:
        return None
    path = backbone_prefix(model) + rel
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        return None
    return RotaryRef(parent, name) if isinstance(getattr(parent, name, None), nn.Module) else None
