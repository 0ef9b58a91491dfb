"""Loading a model directory: the class fits the checkpoint exactly, in the checkpoint's own dtype."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from surgery.errors import ModelError
from surgery.models import load_model, tiny


def saved(path, model, config=None, tensors=None):
    """Save `model` to `path`, then let `config(dict)` and `tensors(dict)` edit what was written."""
    model.save_pretrained(path)
    if config:
        data = json.loads((path / "config.json").read_text())
        config(data)
        (path / "config.json").write_text(json.dumps(data))
    if tensors:
        state = load_file(path / "model.safetensors")
        tensors(state)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def no_architectures(c):
    c.pop("architectures")


def unknown_architecture(c):
    c["architectures"] = ["LlamaForSomethingElse"]


@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("edit", [no_architectures, unknown_architecture])
@pytest.mark.parametrize("tied", [False, True])
def test_a_causal_lm_without_a_usable_architecture_keeps_its_head(tmp_path, edit, tied, meta):
    """The bug: AutoModel gave a LlamaModel and `lm_head` was silently dropped (or, tied, never built)."""
    original = tiny("llama", tie_word_embeddings=tied)
    loaded = load_model(saved(tmp_path, original, edit), meta=meta)
    assert type(loaded) is transformers.LlamaForCausalLM
    if not meta:
        assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)
        assert torch.equal(logits(loaded), logits(original))


def test_a_base_model_checkpoint_gets_no_invented_head(tmp_path):
    base = transformers.LlamaModel(tiny("llama").config)
    loaded = load_model(saved(tmp_path, base, no_architectures))
    assert type(loaded) is transformers.LlamaModel


def test_gpt2_without_architectures_keeps_its_tied_head(tmp_path):
    original = tiny("gpt2")
    loaded = load_model(saved(tmp_path, original, no_architectures))
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert torch.equal(logits(loaded), logits(original))


def test_heads_that_share_their_tensors_are_refused_not_guessed(tmp_path):
    """BERT's masked and causal LM heads hold the same tensors: only `architectures` can tell them apart."""
    with pytest.raises(ModelError, match="BertForMaskedLM") as info:
        load_model(saved(tmp_path, tiny("bert"), no_architectures))
    assert "architectures" in str(info.value)


@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("config", [None, no_architectures])
@pytest.mark.parametrize("tensors, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), r"uninitialised\): model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"lm_head.extra": torch.zeros(3)}), r"dropped\): lm_head.extra"),
    (lambda s: s.update({"model.norm.weight": torch.ones(3)}), r"wrong shape: model.norm.weight \(3,\) vs \(64,\)"),
], ids=["missing", "unexpected", "mismatched"])
def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, tensors, message, config, meta):
    """The bug: a missing tensor was randomly initialised and an extra one dropped, without a word."""
    with pytest.raises(ModelError, match=message):
        load_model(saved(tmp_path, tiny("llama"), config, tensors), meta=meta)


@pytest.mark.parametrize("meta", [False, True])
def test_an_architecture_that_does_not_fit_is_refused(tmp_path, meta):
    """The bug: a sequence classifier was built with a random `score` head, and `lm_head` dropped."""
    path = saved(tmp_path, tiny("llama"), lambda c: c.update(architectures=["LlamaForSequenceClassification"]))
    with pytest.raises(ModelError, match="names LlamaForSequenceClassification") as info:
        load_model(path, meta=meta)
    assert "score.weight" in str(info.value) and "the checkpoint fits LlamaForCausalLM" in str(info.value)


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    original = tiny("llama")
    original.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM and torch.equal(logits(loaded), logits(original))


def test_a_config_without_weights_plans_with_the_class_it_names(tmp_path):
    config = tiny("llama").config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    assert type(load_model(tmp_path, meta=True)) is transformers.LlamaForCausalLM
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no weights"):
        load_model(tmp_path, meta=True)


@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_checkpoint_loads_in_its_own_dtype(tmp_path, dtype, meta):
    """The bug: every model was loaded as float32, so a bf16 MODEL_DIR was neither bit-exact nor its size."""
    original = tiny("llama").to(dtype)
    loaded = load_model(saved(tmp_path, original), meta=meta)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    if not meta:
        for (name, p), q in zip(loaded.state_dict().items(), original.state_dict().values()):
            assert torch.equal(p, q), name


def test_a_pytorch_bin_checkpoint_is_fitted_alike(tmp_path):
    original = tiny("llama")
    saved(tmp_path, original, no_architectures)
    (tmp_path / "model.safetensors").unlink()
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    for meta in (True, False):
        assert type(load_model(tmp_path, meta=meta)) is transformers.LlamaForCausalLM
    assert torch.equal(logits(load_model(tmp_path)), logits(original))
