"""Attention blocks, one target per layer: their attention function, mask and KV cache.

Each step installs itself (a stage of the module's attention program). The kind wraps so that the
planner builds each module's composition tree: after every step, a ``gate(…)`` there gives the
module's K/V prefix stage a gate (:mod:`surgery.gating`); the planner has already refused a gate
over anything but a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from surgery import gating
from surgery.anchors import AnchorKind, SelfInstalling, anchor_kind, covered
from surgery.arch.select import Region, RoleIndex
from surgery.compose import Gate
from surgery.transforms.registry import Anchor, AttentionStage, Installs, ModelPeftTensors, Target

if TYPE_CHECKING:
    from surgery.apply import Edit
    from surgery.compose import Node


@anchor_kind
class Attention(AnchorKind):
    anchor = Anchor.ATTENTION
    required = (Installs,)
    optional = (ModelPeftTensors, AttentionStage)
    wraps = True

    def find(self, transform: str, regions: Sequence[Region], index: RoleIndex) -> list[Target]:
        return [Target(path, "attn", i) for i in range(index.num_layers)
                for path in index.layer_role_paths("attn", i) if covered(path, regions)]

    def installer(self, model: nn.Module, edit: Edit) -> AttentionInstaller:
        return AttentionInstaller(model, edit)


class AttentionInstaller(SelfInstalling):
    """Steps install themselves; a gate over a module's K/V prefix is added once they all have."""

    def finish(self, trees: Mapping[str, Node]) -> None:
        hidden: int = cast(Any, self.model).config.get_text_config().hidden_size
        for path, tree in trees.items():
            if any(isinstance(group, Gate) for group in tree.groups()):
                gating.gate_prefix(self.edit, self.model.get_submodule(path), hidden)
