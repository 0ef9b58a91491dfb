"""PEFT → surgery: the imported model gives PEFT's logits, and its peft/ export loads back in PEFT
with the same logits (the round trip), for LoRA (with per-module ranks), IA3 and prompt tuning, each
also with modules_to_save (imported as unfreeze with PEFT's trained weights); surgery → PEFT →
surgery gives back the same tensors; what unfreeze cannot express is refused with the module named."""

import json
import re
import sys

import peft
import pytest
import torch

import surgery
from surgery.errors import ModelError
from surgery.interop import import_peft, spec_from_peft
from surgery.models import tiny


def _ids(n=10, batch=2):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(1))


def _perturb(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()[:, -ids.shape[1]:]  # PEFT's prompt adds rows for its tokens


CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}),
    "lora_regex": lambda: peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True,
                                          target_modules=r".*layers\.1\.self_attn\.(k|o)_proj"),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    # modules_to_save: PEFT's plain suffix rule ("norm" is also every input_layernorm), and no adapter
    # inside a saved module (layer 1's down_proj is trained in full, not scaled)
    "lora_saved": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["lm_head", "norm"]),
    "ia3_saved": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                        modules_to_save=["layers.1.mlp"]),
    "prompt_saved": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                    modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_round_trip_equals_peft(kind, arch, tmp_path):
    theirs = peft.get_peft_model(tiny(arch), CONFIGS[kind]())
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    want = _logits(theirs, ids)

    ours = tiny(arch)
    result = import_peft(tmp_path / "adapter", ours)
    moved = (_logits(ours, ids) - _logits(tiny(arch), ids)).abs().max()
    assert moved > 1e-2                                        # the trained tensors arrived …
    assert (_logits(ours, ids) - want).abs().max() < 1e-5      # … and give PEFT's outputs
    out = result.save(tmp_path / "out")
    assert json.loads((out / "surgery.json").read_text())["peft"] == "written"
    back = peft.PeftModel.from_pretrained(tiny(arch), out / "peft")
    assert (_logits(back, ids) - want).abs().max() < 1e-5
    assert (_logits(surgery.load(out), ids) - want).abs().max() < 1e-5


def test_spec_is_compact_and_keeps_per_module_settings():
    config = CONFIGS["lora"]().to_dict()
    text = spec_from_peft(json.loads(json.dumps(config, default=list)), tiny("llama"))
    assert text.splitlines() == [
        '"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj": lora(r=4, alpha=8)',
        '"model.layers.*.mlp.down_proj": lora(r=2, alpha=6)',
    ]


def test_modules_to_save_become_unfreeze_of_the_modules_peft_wraps():
    text = spec_from_peft(json.loads(json.dumps(CONFIGS["ia3_saved"]().to_dict(), default=list)), tiny("llama"))
    assert text.splitlines() == [
        '"model.layers.*.self_attn.k_proj", "model.layers.0.mlp.down_proj": ia3',
        '"model.layers.1.mlp": unfreeze',
    ]


@pytest.mark.parametrize("field, value, needle", [
    ("use_dora", True, "use_dora=True"), ("bias", "all", "bias='all'"),
    ("layers_to_transform", [0], "layers_to_transform=[0]"),
    ("modules_to_save", ["classifier"], "modules_to_save entry 'classifier' matches no module"),
])
def test_unsupported_fields_are_refused_by_name(field, value, needle):
    config = {**CONFIGS["lora"]().to_dict(), field: value}
    with pytest.raises(ModelError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        spec_from_peft(json.loads(json.dumps(config, default=list)), tiny("llama"))


@pytest.mark.parametrize("field, value, needle", [
    ("target_modules", "q_proj(", "target_modules entry 'q_proj(' is not a module name or pattern"),
    ("rank_pattern", {"q_proj[": 4}, "rank_pattern entry 'q_proj[' is not a module name or pattern"),
    ("alpha_pattern", {"*proj": 4}, "alpha_pattern entry '*proj' is not a module name or pattern"),
])
def test_malformed_patterns_are_refused_by_field(field, value, needle):
    config = {**CONFIGS["lora"]().to_dict(), field: value}
    with pytest.raises(ModelError, match=re.escape(needle)):
        spec_from_peft(json.loads(json.dumps(config, default=list)), tiny("llama"))


@pytest.mark.parametrize("saved, tied, needle", [
    (["lm_haed"], False, "entry 'lm_haed' matches no module of this model (did you mean 'lm_head'?)"),
    (["lm_head("], False, "entry 'lm_head(' is not a module name"), ([3], False, "entry 3 is not a module name"),
    (["_proj"], False, "trains model.layers.0.self_attn.q_proj in full, and the adapted layer "
                       "model.layers.0.self_attn.q_proj overlaps it"),
    (["mlp", "down_proj"], False, "names model.layers.0.mlp and model.layers.0.mlp.down_proj inside it"),
    (["embed_tokens"], True, "trains a copy of model.embed_tokens, untied from lm_head.weight"),
    (["lm_head"], True, "trains a copy of lm_head, untied from model.embed_tokens.weight"),
])
def test_modules_to_save_unfreeze_cannot_express_are_refused_by_module(saved, tied, needle):
    config = {**CONFIGS["lora"]().to_dict(), "modules_to_save": saved}
    with pytest.raises(ModelError, match=re.escape(needle)):
        spec_from_peft(json.loads(json.dumps(config, default=list)), tiny("llama", tie_word_embeddings=tied))


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_tied_embeddings_saved_with_ensure_weight_tying_stay_tied(saved, tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=[saved], ensure_weight_tying=True)
    theirs = peft.get_peft_model(tiny("llama", tie_word_embeddings=True), config)
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    ours = tiny("llama", tie_word_embeddings=True)
    result = import_peft(tmp_path / "adapter", ours)
    assert result.plan.spec.source.splitlines()[-1] == '"model.embed_tokens": unfreeze'
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (_logits(ours, ids) - _logits(tiny("llama", tie_word_embeddings=True), ids)).abs().max() > 1e-2
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_surgery_to_peft_to_surgery_gives_back_the_trained_tensors(tied, tmp_path):
    model = tiny("llama", tie_word_embeddings=tied)
    first = surgery.compile(model, "attn.q, attn.v: lora(r=2); embed, norm.*: unfreeze")
    _perturb(model)
    first.save(tmp_path / "out")
    ours = tiny("llama", tie_word_embeddings=tied)
    second = import_peft(tmp_path / "out" / "peft", ours)
    assert second.plan.spec.source.splitlines()[-1] == ('"model.embed_tokens", "model.layers.*.input_layernorm", '
                                                        '"model.layers.*.post_attention_layernorm", "model.norm": unfreeze')
    state, back = model.state_dict(), ours.state_dict()
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    ids = _ids()
    assert (_logits(ours, ids) - _logits(tiny("llama", tie_word_embeddings=tied), ids)).abs().max() > 1e-2


def test_wrong_tensors_leave_the_model_untouched(tmp_path):
    theirs = peft.get_peft_model(tiny("llama"), CONFIGS["lora"]())
    theirs.save_pretrained(tmp_path / "adapter")
    import safetensors.torch

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(3, 3)
    safetensors.torch.save_file(tensors, str(weights))
    ours = tiny("llama")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ModelError, match="has shape"):
        import_peft(tmp_path / "adapter", ours)
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(ModelError, match="no adapter_config.json"):
        import_peft(tmp_path, tiny("llama"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="LOHA"):
        import_peft(tmp_path, tiny("llama"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    with pytest.raises(ModelError, match="cannot be read"):
        import_peft(tmp_path, tiny("llama"))


def test_cli_import_peft(tmp_path, capsys, monkeypatch):
    from surgery.cli import main

    theirs = peft.get_peft_model(tiny("llama"), CONFIGS["ia3"]())
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    tiny("llama").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["surgery", "import-peft", str(tmp_path / "adapter"), str(tmp_path / "model"),
                                      "-o", str(tmp_path / "out")])
    for expected in (0, 2):  # the second time the output exists: a user error, exit 2, no traceback
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == expected
        captured = capsys.readouterr()
        if expected == 0:
            assert ('"model.layers.*.self_attn.k_proj", "model.layers.*.self_attn.v_proj", '
                    '"model.layers.*.mlp.down_proj": ia3') in captured.out
        else:
            assert "already exists" in captured.err and "Traceback" not in captured.err
    ids = _ids()
    assert (_logits(surgery.load(tmp_path / "out"), ids) - _logits(theirs, ids)).abs().max() < 1e-5


def test_cli_refuses_modules_to_save_matching_nothing_by_name(tmp_path, capsys, monkeypatch):
    from surgery.cli import main

    peft.get_peft_model(tiny("llama"), CONFIGS["lora_saved"]()).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "modules_to_save": ["score"]}))
    tiny("llama").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["surgery", "import-peft", str(tmp_path / "adapter"), str(tmp_path / "model"),
                                      "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert "modules_to_save entry 'score' matches no module" in " ".join(err.split())
    assert not (tmp_path / "out").exists()
