"""The model's rotary position embedding: one module that every layer's attention shares."""

from __future__ import annotations

from collections.abc import Sequence

from surgery.anchors import AnchorKind, anchor_kind, covered
from surgery.arch.select import Region, RoleIndex
from surgery.errors import SpecError
from surgery.transforms.registry import Anchor, AttentionStage, Installs, Target


@anchor_kind
class Rotary(AnchorKind):
    anchor = Anchor.ROTARY
    required = (Installs,)
    optional = (AttentionStage,)  # a rotary step may also add a stage to every attention program (ntk_consistent)

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        """The rotary module, when the regions hold it or every layer's attention (never a subset)."""
        rotary = index.model_roles.get("rotary")
        if not rotary:
            return []
        attn = {p for i in range(index.num_layers) for p in index.layer_role_paths("attn", i)}
        selected = {p for p in attn if covered(p, regions)}
        if not selected and not covered(rotary[0], regions):
            return []
        if selected and selected != attn:
            raise SpecError(
                f"{transform} rewrites the rotary embedding that all {index.num_layers} layers share; "
                "select every layer's attention (e.g. 'attn'), not a subset",
                regions[0].selector.span,
            )
        return [Target(rotary[0], "rotary")]
