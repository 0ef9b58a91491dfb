"""The attention program: one per attention module, the single place attention-level transforms
contribute stages to (see :mod:`surgery.attention.program` and docs/attention.md)."""

from surgery.attention.frame import Table
from surgery.attention.implementation import ATTR, NAME, Call, install, require_causal, require_layer_index
from surgery.attention.program import Bounded, Clash, KVPrefix, MaskRule, Program, SinkFrame, Stage, WindowRule, clashes
from surgery.attention.rotary import RotaryRef, rotary_ref

__all__ = ["ATTR", "NAME", "Bounded", "Call", "Clash", "KVPrefix", "MaskRule", "Program", "RotaryRef", "SinkFrame",
           "Stage", "Table", "WindowRule", "clashes", "install", "require_causal", "require_layer_index", "rotary_ref"]
