"""Shared fixtures: tiny random models of every architecture, and SmolLM2 (cached per machine)."""

import pytest
import torch

from surgery.models import tiny

# Tiny models: thread start-up costs more than it saves, and CI has two cores.
torch.set_num_threads(1)


@pytest.fixture(params=["llama", "qwen2"])
def decoder(request):
    """A tiny rotary decoder (two architectures, so every obligation is seen on two)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def smollm2_dir():
    from surgery.models import smollm2_dir

    return smollm2_dir()
