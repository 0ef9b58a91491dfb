"""Pins every transformers internal listed in surgery/attention/internals.py: an upgrade that
changes one fails here, by name."""

import inspect
import subprocess
import sys

import pytest
import torch
import transformers

from surgery.attention import internals
from surgery.models import tiny


def test_transformers_is_the_pinned_version():
    assert transformers.__version__ == "5.24.0"


def test_modeling_utils_is_imported_with_a_model_not_with_surgery():
    """transformers.modeling_utils and masking_utils take ~2 s to import (dynamo, distributed tensors,
    FP8 and DeepGEMM integrations): `import surgery` (every command, `--help` included) must not
    import them; this module's names for their objects still resolve, to the same objects."""
    code = ("import sys\n"
            "import surgery, surgery.cli\n"
            "surgery.transforms.register_all()\n"
            "late = ['transformers.modeling_utils', 'transformers.masking_utils', 'torch._dynamo']\n"
            "print(*[m in sys.modules for m in late])\n"
            "from surgery.attention import internals\n"
            "import transformers.modeling_utils as mu\n"
            "print(internals.PreTrainedModel is mu.PreTrainedModel, internals.AttentionInterface is mu.AttentionInterface)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False", "True", "True"]


def test_registration_api():
    assert callable(internals.AttentionInterface.register) and callable(internals.AttentionMaskInterface.register)
    assert hasattr(internals.ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping")
    assert callable(internals.ALL_ATTENTION_FUNCTIONS.valid_keys)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "gpt2"])
def test_models_switch_through_set_attn_implementation(arch):
    model = tiny(arch)
    assert internals.can_switch(model)
    assert "attn_implementation" in inspect.signature(model.set_attn_implementation).parameters


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_module_calling_convention(arch):
    """Extra model kwargs reach the cache layer's update (as kwargs=…) and the attention function."""
    model = tiny(arch)
    seen = {}

    def spy_attention(module, q, k, v, mask, **kwargs):
        seen["attention"] = kwargs.get("probe")
        seen["scaling"] = kwargs.get("scaling")
        return internals.ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, **kwargs)

    class SpyLayer(internals.DynamicLayer):
        def update(self, k, v, *args, kwargs=None, **rest):
            seen["update"] = (kwargs or {}).get("probe")
            return super().update(k, v)

    internals.AttentionInterface.register("pin_probe", spy_attention)
    internals.AttentionMaskInterface.register("pin_probe", internals.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("pin_probe")
    cache = internals.DynamicCache()
    cache.layer_class_to_replicate = SpyLayer
    module = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")][0]
    grabbed = {}
    module.register_forward_pre_hook(lambda m, a, kw: grabbed.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True, probe="x")
    assert seen["attention"] == "x" and seen["update"] == "x" and isinstance(seen["scaling"], float)
    assert internals.cache_of(grabbed) is cache and "attention_mask" in grabbed
    assert isinstance(module.layer_idx, int) and module.is_causal
    if arch == "llama":
        cos, sin = grabbed["position_embeddings"]
        assert cos.shape == sin.shape == (1, 3, model.config.hidden_size // model.config.num_attention_heads)


def test_mask_function_keyword_arguments():
    model = tiny("llama")
    got = {}

    def spy_mask(**kwargs):
        got.update(kwargs)
        return None

    internals.AttentionInterface.register("pin_mask", internals.ALL_ATTENTION_FUNCTIONS["sdpa"])
    internals.AttentionMaskInterface.register("pin_mask", spy_mask)
    model.set_attn_implementation("pin_mask")
    mask = torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), attention_mask=mask)
    assert set(internals.MASK_KWARGS) <= set(got)
    assert got["attention_mask"].dtype == torch.bool and got["attention_mask"].tolist() == [[False, True, True, True]]
    assert got["kv_length"] == 4 and got["kv_offset"] == 0


def test_cache_layer_api():
    for name in internals.LAYER_API:
        assert hasattr(internals.DynamicLayer, name) or name in ("keys", "values", "is_initialized")
    layer = internals.DynamicLayer()
    for name in ("keys", "values", "is_initialized"):
        assert hasattr(layer, name)
    assert layer.get_mask_sizes(3) == (3, 0)
    cache = internals.DynamicCache()
    assert cache.layer_class_to_replicate is internals.DynamicLayer
    assert len(internals.cache_layers(cache, 2)) == 3


def test_torch_flash_kernel_returns_the_log_sum_exp():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    out, lse = internals.sdpa_with_lse(q, k, v, mask, 0.3)
    scores = (q @ k.transpose(-1, -2)) * 0.3 + mask
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 1e-5
    assert (out - torch.softmax(scores, -1) @ v).abs().max() < 1e-5
    # A row with every key masked: the kernel reports lse 0 and output 0 (the fast path masks it).
    mask[..., 0, :] = float("-inf")
    out, lse = internals.sdpa_with_lse(q, k, v, mask, 0.3)
    assert lse[..., 0].abs().max() == 0 and out[..., 0, :].abs().max() == 0
