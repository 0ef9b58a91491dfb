"""The model's input embeddings: what a transform on the input side (prompt tuning) attaches to."""

from __future__ import annotations

from collections.abc import Sequence

from surgery.anchors import AnchorKind, anchor_kind, covered
from surgery.arch.select import Region, RoleIndex
from surgery.transforms.registry import Anchor, Installs, Target


@anchor_kind
class Embeddings(AnchorKind):
    anchor = Anchor.EMBEDDINGS
    required = (Installs,)

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        return [Target(p, "embed") for p in index.model_roles.get("embed", []) if covered(p, regions)]
