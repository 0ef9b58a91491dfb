"""Shared fixtures: tiny random models of every architecture, and SmolLM2 (cached per machine)."""

import pytest

from surgery.models import tiny


@pytest.fixture(params=["llama", "qwen2"])
def decoder(request):
    """A tiny rotary decoder (two architectures, so every obligation is seen on two)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def smollm2_dir():
    from surgery.models import smollm2_dir

    return smollm2_dir()
