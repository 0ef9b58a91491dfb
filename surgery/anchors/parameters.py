"""The region's own parameters: the transform changes tensors the model already has (BitFit)."""

from __future__ import annotations

from collections.abc import Sequence

from surgery.anchors import AnchorKind, anchor_kind, sites
from surgery.arch.select import Region, RoleIndex
from surgery.transforms.registry import Anchor, Installs, Target


@anchor_kind
class Parameters(AnchorKind):
    anchor = Anchor.PARAMETERS
    required = (Installs,)
    in_place = True  # values and requires_grad of existing tensors: a plain save holds them

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        return [Target(s.path, s.role, s.layer) for s in sites(regions)]
