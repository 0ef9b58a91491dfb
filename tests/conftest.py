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


@pytest.fixture(scope="session")
def char_tokenizer():
    """One token per ASCII character (ids 1–127, anything else 0): a real tokenizer for tiny models."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(1, 128)}
    vocab["<unk>"] = 0
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    inner.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="<unk>", pad_token="<unk>")
