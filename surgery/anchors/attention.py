"""Attention blocks, one target per layer: their attention function, mask and KV cache."""

from __future__ import annotations

from collections.abc import Sequence

from surgery.anchors import AnchorKind, anchor_kind, covered
from surgery.arch.select import Region, RoleIndex
from surgery.transforms.registry import Anchor, AttentionStage, Installs, ModelPeftTensors, Target


@anchor_kind
class Attention(AnchorKind):
    anchor = Anchor.ATTENTION
    required = (Installs,)
    optional = (ModelPeftTensors, AttentionStage)

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        return [Target(path, "attn", i) for i in range(index.num_layers)
                for path in index.layer_role_paths("attn", i) if covered(path, regions)]
