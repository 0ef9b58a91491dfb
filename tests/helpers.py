"""Functions the test modules share (fixtures live in conftest.py): a spec's plan, the error a spec
plans to, a model's logits, and bottleneck adapters drawn so that each changes its sublayer."""

import pytest
import torch

from surgery.errors import SpecError
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.adapter import BottleneckAdapter


def plan_for(text, model):
    """The plan of `text` on `model`: planned only, not verified or applied."""
    return build_plan(parse(text), model)


def spec_error(text, model, error=SpecError):
    """The `error` that planning `text` on `model` raises; the test fails where it plans."""
    with pytest.raises(error) as raised:
        plan_for(text, model)
    return raised.value


@torch.no_grad()
def logits(model, ids, **inputs):
    """`model`'s float32 logits on `ids` (more keyword inputs go to the forward), without gradients."""
    return model(input_ids=ids, **inputs).logits.float()


def draw_adapters(model, seed, tensors=("up.weight", "up.bias", "down.bias")):
    """Draw `tensors` of every bottleneck adapter of `model` from 0.1·N(0, 1), seeded, in module order,
    so each adapter changes its sublayer (at init its up-projection is zero: the identity). Returns `model`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                for name in tensors:
                    tensor = module.get_parameter(name)
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model
