"""Registration: capabilities are found once, checked against the anchor kind, and read by type."""

import re

import pytest
from torch import nn

from surgery.transforms.registry import (
    REGISTRY,
    Accepts,
    Adapter,
    AdapterPeftTensors,
    Anchor,
    ConfigPatch,
    Installs,
    ModelPeftTensors,
    Params,
    PeftExport,
    ReplacesBase,
    Schedule,
    lookup,
    obligation,
    transform,
)


class NoParams(Params):
    pass


def register(name, anchor, body):
    """Register a throwaway transform class with `body` (a dict of attributes) and one obligation."""
    body = {"ok": obligation("ok", 0.0)(lambda self, p, check: 0.0), **body}
    try:
        return transform(name, params=NoParams, anchor=anchor, reference="test")(type(name, (), body))
    finally:
        REGISTRY.pop(name, None)


def adapter(self, p, base, target):
    return nn.Identity()


def apply(self, p, model, targets, edit):
    pass


@pytest.mark.parametrize("anchor, body, needs", [
    (Anchor.LINEAR, {}, "Adapter (adapter) or ReplacesBase (replace_base)"),
    (Anchor.LINEAR, {"apply": apply}, "Adapter (adapter) or ReplacesBase (replace_base)"),  # not at linear
    (Anchor.ATTENTION, {"adapter": adapter}, "Installs (apply)"),
    (Anchor.EMBEDDINGS, {}, "Installs (apply)"),
])
def test_a_transform_without_what_its_anchor_kind_requires_does_not_register(anchor, body, needs):
    with pytest.raises(RuntimeError, match=re.escape(f"t_missing is at {anchor.value} anchors, so it must implement {needs}")):
        register("t_missing", anchor, body)
    assert "t_missing" not in REGISTRY


def test_capabilities_are_those_the_class_offers_among_those_its_anchor_kind_reads():
    cls = register("t_linear", Anchor.LINEAR, {"adapter": adapter, "apply": apply,
                                               "peft": lambda self, p, targets: {"peft_type": "X"}})
    assert cls.spec.capabilities == {Adapter, PeftExport}  # apply means nothing at a linear anchor
    assert isinstance(cls.spec.offers(Adapter), cls) and cls.spec.offers(ReplacesBase) is None
    cls = register("t_attention", Anchor.ATTENTION, {"apply": apply, "peft_tensors": lambda self, model: {}})
    assert cls.spec.capabilities == {Installs, ModelPeftTensors}


def test_the_registered_transforms_declare_what_save_and_plan_read():
    caps = {name: lookup(name).capabilities for name in ["lora", "ia3", "quantize", "rope", "bitfit", "window",
                                                          "prompt_tuning"]}
    assert caps["lora"] == {Adapter, Accepts, PeftExport}  # accepts: r ≤ min(in, out)
    assert caps["ia3"] == {Adapter, Accepts, PeftExport, AdapterPeftTensors, Schedule}  # Schedule: loss=tfew
    assert lookup("relora").capabilities == {Adapter, Accepts, Schedule}  # no PEFT: restarts change the base
    assert lookup("adalora").capabilities == {Adapter, Accepts, PeftExport, Schedule}
    assert caps["quantize"] == {ReplacesBase}
    assert ConfigPatch in caps["rope"] and ConfigPatch not in caps["window"]
    assert caps["prompt_tuning"] >= {Installs, PeftExport, ModelPeftTensors}
    assert [n for n in caps if lookup(n).freezes_base] == ["lora", "ia3", "bitfit", "prompt_tuning"]
    assert [n for n in caps if lookup(n).peft_base] == ["quantize"]
    assert dict(lookup("lora").peft_patterns) == {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}


def test_flags_that_are_not_booleans_do_not_register():
    with pytest.raises(RuntimeError, match="freezes_base and peft_base are True or False"):
        register("t_flag", Anchor.LINEAR, {"adapter": adapter, "freezes_base": "yes"})


def test_a_transform_without_obligations_does_not_register():
    with pytest.raises(RuntimeError, match="declares no obligation"):
        transform("t_none", params=NoParams, anchor=Anchor.LINEAR, reference="test")(
            type("T", (), {"adapter": adapter}))
