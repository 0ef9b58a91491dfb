"""Reading a PEFT adapter directory into ``surgery``: the spec it amounts to, and its trained tensors.

``import_peft(peft_dir, model)`` reads ``adapter_config.json``, writes the equivalent spec (quoted
module patterns, one rule per distinct setting), compiles it onto `model` and copies PEFT's tensors
into the new modules. The copy goes through the exporter (:func:`surgery.io.peft_adapter`): it
names every tensor of the applied plan under PEFT's key, as a view of the parameter that holds it,
so the import is the export run backwards and the two cannot drift apart. Every key must be used
exactly once, with its shape, or nothing is changed.

Supported: ``LORA`` (``rank_pattern``/``alpha_pattern``, rsLoRA), ``IA3``, ``PROMPT_TUNING`` and
``P_TUNING`` (PEFT saves P-tuning's encoder output, so it is imported as the prompt it produces:
equal outputs, without the encoder), each with ``modules_to_save`` (modules trained in full beside
the adapter), which is ``unfreeze`` on the modules PEFT wraps, loaded with the weights PEFT trained.
Anything else, or a config field that changes the math and has no ``surgery`` equivalent (DoRA,
biases, layer subsets…), is refused with the field named; a ``modules_to_save`` that ``unfreeze``
cannot express (an entry matching no module, a module holding the adapter, a tied tensor PEFT
unties) is refused with the module named.

Obligation (tests/test_interop.py): PEFT → surgery gives PEFT's logits, and the ``peft/`` export of
the imported model loads in PEFT with the same logits (the round trip).
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from surgery.errors import ModelError, did_you_mean

# Fields that must hold these values (the math surgery implements); absent fields are fine.
_LORA_FIXED = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None,
               "layers_pattern": None, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None, "exclude_modules": None, "megatron_config": None}
_IA3_FIXED = {"fan_in_fan_out": False, "layers_to_transform": None, "exclude_modules": None}


def _matches(config: dict, name: str) -> bool:
    """PEFT's rule for the adapted modules: a ``target_modules`` regex string must match the whole
    name; a list entry equals the name or its last dotted segments; never a module in or under an
    entry of ``modules_to_save`` (a regex over whole dotted segments, there)."""
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.get("modules_to_save") or ()):
        return False
    target_modules = config.get("target_modules")
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules or ())


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _selectors(paths: list[str], every: list[str]) -> list[str]:
    """Quoted selectors for exactly `paths`: numeric segments become ``*`` where the pattern matches
    no other module of the model, else the paths one by one."""
    out, left = [], list(paths)
    while left:
        pattern = ".".join("*" if part.isdigit() else part for part in left[0].split("."))
        hits = [p for p in every if fnmatchcase(p, pattern)]
        if pattern != left[0] and set(hits) <= set(paths):
            out.append(pattern)
            left = [p for p in left if p not in hits]
        else:
            out.append(left.pop(0))
    return [json.dumps(s) for s in out]


def _check_fixed(config: dict, fixed: dict, kind: str) -> None:
    for key, value in fixed.items():
        if key in config and config[key] not in (value, [], {}) and not (value is None and not config[key]):
            raise ModelError(f"the PEFT {kind} adapter sets {key}={config[key]!r}, which surgery's "
                             f"{kind.lower()} does not implement (it needs {value!r})")


def spec_from_peft(config: dict, model: nn.Module) -> str:
    """The spec equivalent to a PEFT ``adapter_config.json`` on `model`: the adapter's rules, then
    ``unfreeze`` on the modules PEFT's ``modules_to_save`` trains in full."""
    _check_patterns(config)
    names = [name for name, _ in model.named_modules() if name]
    rules, adapted = _adapter_rules(config, model, names)
    saved = _saved_modules(config, model, adapted)
    if saved:
        rules.append(f"{', '.join(_selectors(saved, names))}: unfreeze")
    return "\n".join(rules)


def _check_patterns(config: dict) -> None:
    """PEFT reads these as regular expressions (a modules_to_save entry is also a name suffix, and a
    regex that keeps adapters out of it): one that does not compile is refused with its field named."""
    patterns = [("modules_to_save", entry) for entry in config.get("modules_to_save") or ()]
    if isinstance(config.get("target_modules"), str):
        patterns.append(("target_modules", config["target_modules"]))
    patterns += [(field, key) for field in ("rank_pattern", "alpha_pattern") for key in config.get(field) or {}]
    for field, pattern in patterns:
        try:
            re.compile(pattern)
        except (TypeError, re.error):
            raise ModelError(f"the PEFT adapter's {field} entry {pattern!r} is not a module name or pattern") from None


def _adapter_rules(config: dict, model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(the rules of the adapter itself, the paths of the modules it adapts)."""
    kind = config.get("peft_type")
    if kind == "LORA":
        _check_fixed(config, _LORA_FIXED, "LORA")
        groups: dict[tuple, list[str]] = {}
        for name, module in model.named_modules():
            if name and _matches(config, name) and not list(module.children()):
                r = _pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
                alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
                groups.setdefault((r, alpha), []).append(name)
        if not groups:
            raise ModelError(f"the PEFT LoRA adapter targets {config.get('target_modules')!r}: no module of this model")
        options = (f", dropout={config['lora_dropout']}" if config.get("lora_dropout") else "") + \
                  (", rslora=true" if config.get("use_rslora") else "")
        return ([f"{', '.join(_selectors(paths, names))}: lora(r={r}, alpha={alpha}{options})"
                 for (r, alpha), paths in groups.items()], [p for paths in groups.values() for p in paths])
    if kind == "IA3":
        _check_fixed(config, _IA3_FIXED, "IA3")
        paths = [name for name in names if _matches(config, name)]
        if not paths:
            raise ModelError(f"the PEFT IA3 adapter targets {config.get('target_modules')!r}: no module of this model")
        return [f"{', '.join(_selectors(paths, names))}: ia3"], paths
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        if config.get("num_transformer_submodules", 1) != 1:
            raise ModelError("the PEFT prompt has one prompt per transformer submodule (encoder–decoder); "
                             "surgery's prompt_tuning prompts decoder-only and encoder models")
        return [f"embed: prompt_tuning(length={int(config['num_virtual_tokens'])})"], []
    raise ModelError(f"PEFT adapters of type {kind!r} cannot be imported; supported: LORA, IA3, PROMPT_TUNING, "
                     "P_TUNING")


# PEFT's EMBEDDING_LAYER_NAMES: ``ensure_weight_tying`` keeps a tied head tied only when an entry of
# modules_to_save ends in one of these.
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _saved_modules(config: dict, model: nn.Module, adapted: list[str]) -> list[str]:
    """The paths ``unfreeze`` trains for PEFT's ``modules_to_save`` on `model`.

    PEFT wraps every module whose name ends with an entry, as a plain string (``"norm"`` is also each
    ``input_layernorm``), and trains a copy of it in the module's place: ``unfreeze`` trains the module
    itself, the same wherever the copy shares nothing with the rest of the model. Modules without
    parameters are dropped (their copy computes what they do). Refused, with the module named: an
    entry matching nothing; a module that is, holds or sits in an adapted layer (PEFT copies the
    adapter with it); a module inside another saved one (PEFT wraps the copy again); a tensor shared
    with a module outside (PEFT unties it), except the tied input embeddings and head under
    ``ensure_weight_tying``, where PEFT trains one copy for both, i.e. ``unfreeze`` of the embeddings."""
    entries = config.get("modules_to_save") or []
    every = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    paths: list[str] = []
    for entry in entries:
        hits = [name for name in every if name.endswith(entry)]
        if not hits:
            raise ModelError(f"the PEFT adapter's modules_to_save entry {entry!r} matches no module of this model"
                             + did_you_mean(entry, (name.rpartition(".")[2] for name in every)))
        paths += [name for name in hits
                  if name not in paths and any(True for _ in model.get_submodule(name).parameters())]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed is not None and head is not None and head.weight is embed.weight and bool(config.get(
        "ensure_weight_tying")) and any(e.rpartition(".")[2] in _PEFT_EMBEDDING_NAMES for e in entries)
    if tied:  # PEFT saves the head through the input embeddings' copy
        embed_path = next(name for name in every if model.get_submodule(name) is embed)
        paths = list(dict.fromkeys(embed_path if model.get_submodule(p) is head else p for p in paths))
    for path in paths:
        layer = next((p for p in adapted if p == path or p.startswith(f"{path}.") or path.startswith(f"{p}.")),
                     None)
        if layer is not None:
            raise ModelError(f"the PEFT adapter's modules_to_save trains {path} in full, and the adapted layer "
                             f"{layer} overlaps it: PEFT trains a copy of the adapter too, which surgery's "
                             "unfreeze cannot express")
        inner = next((p for p in paths if p.startswith(f"{path}.")), None)
        if inner is not None:
            raise ModelError(f"the PEFT adapter's modules_to_save names {path} and {inner} inside it: PEFT wraps the "
                             "copy again, which surgery's unfreeze cannot express")
        own = {id(q) for q in model.get_submodule(path).parameters()}
        for name, q in model.named_parameters(remove_duplicate=False):
            outside = not name.startswith(f"{path}.") and not (tied and model.get_submodule(path) is embed
                                                                 and q is head.weight)
            if id(q) in own and outside:
                raise ModelError(f"the PEFT adapter's modules_to_save trains a copy of {path}, untied from {name} "
                                 "which shares its tensor; surgery's unfreeze trains the shared tensor "
                                 "(PEFT keeps tied embeddings tied with ensure_weight_tying)")
    return paths


def read_peft(peft_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT adapter directory."""
    peft_dir = Path(peft_dir)
    config_file, weights = peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise ModelError(f"{peft_dir} is not a PEFT adapter directory: it has no adapter_config.json")
    if not weights.is_file():
        raise ModelError(f"{peft_dir} has no adapter_model.safetensors (PEFT's pickled .bin files are not read)")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_file} is not valid JSON: {e}") from None
    try:
        return config, safetensors.torch.load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ModelError(f"{weights} cannot be read: {e}") from None


def import_peft(peft_dir: str | Path, model: nn.Module, *, check: bool = True, progress=None):
    """Compile the spec equivalent to the PEFT adapter onto `model` and load its tensors.

    Returns the :class:`surgery.api.Result` (``plan.spec.source`` is the spec; ``save`` writes a
    ``surgery`` output, with ``peft/`` re-exported). On any error `model` is left as it was."""
    from surgery.api import compile as compile_spec
    from surgery.syntax import parse

    config_file = Path(peft_dir) / "adapter_config.json"
    if config_file.is_file():  # a type we cannot import is refused before the tensors are read
        spec_from_peft(json.loads(config_file.read_text()), model)
    config, tensors = read_peft(peft_dir)
    text = spec_from_peft(config, model)
    result = compile_spec(model, parse(text, file=f"<from {peft_dir}>"), check=check, progress=progress)
    try:
        _load(result, config, tensors)
    except BaseException:
        result.edit.rollback()
        raise
    return result


def _load(result, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from surgery.io import peft_adapter

    ours = peft_adapter(result.plan, result.model)
    if isinstance(ours, str):
        raise ModelError(f"the imported plan has no PEFT form to load the tensors into: {ours}")
    _, named = ours
    missing = sorted(set(named) - set(tensors))
    unexpected = sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise ModelError("the PEFT tensors do not fit the imported plan: "
                         + "; ".join(f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    storages = {p.untyped_storage().data_ptr() for p in result.model.parameters()}
    with torch.no_grad():
        for key, target in named.items():
            given = tensors[key]
            if tuple(given.shape) != tuple(target.shape):
                raise ModelError(f"PEFT tensor {key} has shape {tuple(given.shape)}, the imported plan "
                                 f"needs {tuple(target.shape)}")
            if target.untyped_storage().data_ptr() not in storages:
                raise ModelError(f"PEFT tensor {key} is derived from the model's parameters, not stored in one, "
                                 "so it cannot be loaded back")
            target.copy_(given.to(target.dtype))
