"""P-tuning v2: deep prompts — P trainable keys and values at every attention layer, trained directly.

Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks", https://arxiv.org/abs/2110.07602: prefix tuning's per-layer prompts applied to
every layer (and to NLU tasks), without the reparameterisation MLP, which the paper finds of no
consistent benefit. Mechanically this is ``prefix_tuning(length, reparam=none)``
(:mod:`surgery.transforms.prefix_tuning`), whose stage, positions, export and obligations it shares:
every query sees the P unrotated prefix entries of its layer before the stream (numbered from P), a
bounded cache never evicts them, and the PEFT export is ``PREFIX_TUNING`` with
``prefix_projection=false`` — which is how PEFT runs P-tuning v2.

Obligations: prefix tuning's (attention over [prefix; keys] by hand, decode equals the full forward,
a left-padded row equals the row alone, the program equals its dense reference, the export
reproduces the outputs).
"""

from __future__ import annotations

from pydantic import Field

from surgery.transforms.prefix_tuning import PrefixSteps
from surgery.transforms.registry import Anchor, Params, transform


class PTuningV2Params(Params):
    length: int = Field(..., ge=1, description="number of prefix entries P per layer")


@transform("p_tuning_v2", params=PTuningV2Params, anchor=Anchor.ATTENTION, positional=("length",),
           reference="https://arxiv.org/abs/2110.07602")
class PTuningV2(PrefixSteps):
    """P-tuning v2: trainable keys and values before every query's keys at each layer (no reparameterisation)."""

    def settings(self, p: PTuningV2Params) -> tuple[str, int | None]:
        return "none", None
