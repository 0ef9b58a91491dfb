"""The anchor-kind registry: one plugin per kind, each finding its own targets."""

import pytest

from surgery import anchors
from surgery.anchors import KINDS, AnchorKind, anchor_kind, within
from surgery.arch import detect
from surgery.arch.select import RoleIndex, resolve
from surgery.models import tiny
from surgery.syntax import parse
from surgery.transforms.registry import Anchor, Installs


def test_every_anchor_has_one_kind_that_requires_something():
    assert set(KINDS) == set(Anchor)
    for anchor, kind in KINDS.items():
        assert kind.anchor is anchor and kind.required
    assert [a for a, k in KINDS.items() if k.wraps] == [Anchor.ATTENTION, Anchor.LINEAR, Anchor.SUBLAYER]
    assert [a for a, k in KINDS.items() if k.in_place] == [Anchor.PARAMETERS]


def test_a_kind_registers_once():
    with pytest.raises(RuntimeError, match="anchor kind 'rotary' registered twice"):
        anchor_kind(type("Again", (AnchorKind,), {"anchor": Anchor.ROTARY, "required": (Installs,)}))
    assert type(KINDS[Anchor.ROTARY]).__name__ == "Rotary"


def test_within_is_a_path_prefix_by_segments():
    assert within("model.layers.1.mlp", "model.layers.1") and within("anything", "")
    assert not within("model.layers.10.mlp", "model.layers.1")


@pytest.mark.parametrize("selector, anchor, paths", [
    ("mlp.down", Anchor.LINEAR, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
    ("layers[1].attn", Anchor.ATTENTION, ["model.layers.1.self_attn"]),
    ("attn", Anchor.ROTARY, ["model.rotary_emb"]),
    ("mlp", Anchor.ROTARY, []),
    ("embed", Anchor.EMBEDDINGS, ["model.embed_tokens"]),
    ("layers[0].attn.q", Anchor.PARAMETERS, ["model.layers.0.self_attn.q_proj"]),
])
def test_each_kind_finds_its_targets_in_the_regions(selector, anchor, paths):
    model = tiny("llama")
    index = RoleIndex(model, detect(model))
    regions = [resolve(s, index) for s in parse(f"{selector}: x").rules[0].selectors]
    assert [t.path for t in anchors.kind(anchor).find("x", regions, index)] == paths


def test_all_linear_layers_leave_the_output_head_out_unless_it_is_named():
    model = tiny("llama")
    index = RoleIndex(model, detect(model))
    everything = [resolve(s, index) for s in parse('*: x').rules[0].selectors]
    found = [t.path for t in anchors.kind(Anchor.LINEAR).find("x", everything, index)]
    assert len(found) == 2 * 7 and "lm_head" not in found
    head = [resolve(s, index) for s in parse('"lm_head": x').rules[0].selectors]
    assert [t.path for t in anchors.kind(Anchor.LINEAR).find("x", head, index)] == ["lm_head"]
