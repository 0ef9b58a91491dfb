"""Role maps and selector resolution on every tiny architecture."""

import pytest
import torch
import transformers

from surgery.arch import architectures, detect
from surgery.arch.select import RoleIndex, resolve
from surgery.errors import ModelError, SpecError
from surgery.models import TINY_ARCHS, tiny
from surgery.syntax import parse


@pytest.fixture(scope="module")
def models():
    return {arch: tiny(arch) for arch in TINY_ARCHS}


def paths(model, selector: str) -> list[str]:
    (sel,) = parse(f"{selector}: x").rules[0].selectors
    return [site.path for site in resolve(sel, RoleIndex(model, detect(model))).sites]


def failure(model, selector: str) -> str:
    with pytest.raises(SpecError) as info:
        paths(model, selector)
    return str(info.value)


LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")


def test_every_tiny_model_has_a_role_map(models):
    assert {"llama", "mistral", "qwen2", "gemma", "gpt2", "bert"} <= set(architectures())
    for arch, model in models.items():
        index = RoleIndex(model, detect(model))
        assert index.num_layers == 2, arch
        # Every role a map names exists in the model: a typo in a JSON file would show here.
        for role in index.arch.layer:
            for i in range(2):
                assert index.layer_role_paths(role, i), (arch, role, i)
        for role in [*index.arch.model, *index.arch.head]:
            assert role in index.model_roles, (arch, role)


@pytest.mark.parametrize("arch", LLAMA_LIKE)
def test_llama_like_roles(models, arch):
    m = models[arch]
    assert paths(m, "attn.q") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert paths(m, "mlp.down") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert paths(m, "layers[1].mlp.*") == [
        "model.layers.1.mlp", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert paths(m, "attn.*") == [
        f"model.layers.{i}.self_attn{suffix}" for i in range(2)
        for suffix in ("", ".q_proj", ".k_proj", ".v_proj", ".o_proj")
    ]
    assert paths(m, "attn") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert paths(m, "embed") == ["model.embed_tokens"]
    assert paths(m, "lm_head") == ["lm_head"]
    assert paths(m, "norm") == ["model.norm"]
    assert paths(m, "rotary") == ["model.rotary_emb"]
    assert paths(m, "norm.*") == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
    ]
    assert paths(m, "*.q") == paths(m, "attn.q")
    assert paths(m, "*") == paths(m, "model") == [""]


def test_layer_indices_and_slices(models):
    m = models["llama"]
    assert paths(m, "layers") == ["model.layers.0", "model.layers.1"]
    assert paths(m, "layers[0:8]") == ["model.layers.0", "model.layers.1"]  # slices clamp, like Python
    assert paths(m, "layers[1]") == ["model.layers.1"]
    assert paths(m, "layers[-1]") == ["model.layers.1"]
    assert paths(m, "layers[-4:]") == ["model.layers.0", "model.layers.1"]
    assert paths(m, "layers[-1:]") == ["model.layers.1"]
    assert paths(m, "layers[:1].attn.o") == ["model.layers.0.self_attn.o_proj"]
    assert paths(m, "layers[1].attn") == ["model.layers.1.self_attn"]
    assert paths(m, "layers[0].*") == [
        "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp",
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
    ]
    # Model-level roles are not inside a layer.
    assert "layers[0].embed" in failure(m, "layers[0].embed")


def test_gpt2_roles(models):
    m = models["gpt2"]
    assert paths(m, "attn.qkv") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert paths(m, "attn.o") == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert paths(m, "mlp.down") == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert paths(m, "mlp.up") == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert paths(m, "attn.*") == [
        "transformer.h.0.attn", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
    ]
    assert paths(m, "embed") == ["transformer.wte"]
    assert paths(m, "embed.*") == ["transformer.wte", "transformer.wpe"]
    assert paths(m, "layers[-1]") == ["transformer.h.1"]
    assert paths(m, "lm_head") == ["lm_head"]


def test_bert_roles(models):
    m = models["bert"]
    assert paths(m, "mlp") == [
        "bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output",
        "bert.encoder.layer.1.intermediate", "bert.encoder.layer.1.output",
    ]
    assert paths(m, "attn.q") == ["bert.encoder.layer.0.attention.self.query",
                                  "bert.encoder.layer.1.attention.self.query"]
    assert paths(m, "attn.o") == ["bert.encoder.layer.0.attention.output.dense",
                                  "bert.encoder.layer.1.attention.output.dense"]
    assert paths(m, "layers[0].mlp.*") == [
        "bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output", "bert.encoder.layer.0.output.dense",
    ]
    assert paths(m, "embed.*") == ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                                   "bert.embeddings.token_type_embeddings"]
    assert paths(m, "lm_head") == ["cls.predictions.decoder"]


def test_raw_selectors_are_fnmatch_globs(models):
    m = models["llama"]
    assert paths(m, '"model.layers.*.self_attn.q_proj"') == paths(m, "attn.q")
    assert paths(m, '"model.layers.1.mlp.*_proj"') == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert paths(m, "'model.layers.[1].self_attn.?_proj'") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"]
    assert paths(m, '"lm_head"') == ["lm_head"]
    # A raw path still knows its role, so transforms can use it.
    (sel,) = parse('"model.layers.0.mlp.down_proj": x').rules[0].selectors
    (site,) = resolve(sel, RoleIndex(m, detect(m))).sites
    assert (site.role, site.layer) == ("mlp.down", 0)
    message = failure(m, '"model.layer.*.q_proj"')
    assert "module path 'model.layer.*.q_proj' matches no module" in message


def test_unknown_roles_suggest(models):
    m = models["llama"]
    assert failure(m, "atn") == (
        "<spec>:1:1\n  atn: x\n  ^^^\n"
        "error: selector 'atn' matches nothing in this llama model (did you mean 'attn'?)"
    )
    assert "(did you mean 'mlp.down'?)" in failure(m, "mlp.donw")
    assert "(did you mean 'attn.q'?)" in failure(m, "attn.qq")
    # Nothing close: name the roles there are.
    assert "(its roles are attn, embed, generate, layers, lm_head, mlp, model, norm, rotary)" in failure(m, "xyz")


def test_fused_qkv_suggestions(models):
    assert failure(models["gpt2"], "attn.q").endswith(
        "error: selector 'attn.q' matches nothing in this gpt2 model (did you mean 'attn.qkv'?)")
    assert "(did you mean 'attn.qkv'?)" in failure(models["gpt2"], "layers[0].attn.v")
    assert "(did you mean 'attn.q' or 'attn.k' or 'attn.v'?)" in failure(models["llama"], "attn.qkv")


def test_no_rotary_on_gpt2(models):
    assert "(its roles are attn, embed, generate, layers, lm_head, mlp, model, norm)" in failure(models["gpt2"], "rotary")


def test_layer_index_out_of_range_names_the_range(models):
    m = models["llama"]
    assert failure(m, "layers[3].attn") == (
        "<spec>:1:1\n  layers[3].attn: x\n  ^^^^^^^^^^^^^^\n"
        "error: layer index 3 is out of range: the model has 2 layers (0..1)"
    )
    assert "layer index -3 is out of range: the model has 2 layers (0..1)" in failure(m, "layers[-3]")
    assert "layer slice selects no layer: the model has 2 layers (0..1)" in failure(m, "layers[5:]")
    assert "layer slice selects no layer" in failure(m, "layers[1:1]")


def test_only_layers_takes_an_index(models):
    assert "only 'layers' takes an index, not 'mlp'" in failure(models["llama"], "mlp[0]")
    assert "only 'layers' takes an index" in failure(models["llama"], "layers[0].mlp[1]")


def tiny_opt(device="cpu"):
    """A transformers architecture without a role map."""
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.OPTForCausalLM(config).eval()


def test_model_without_role_map_is_reached_by_quoted_paths():
    model = tiny_opt("meta")
    arch = detect(model)
    assert (arch.name, arch.mapped) == ("opt", False)
    assert paths(model, '"model.decoder.layers.*.self_attn.q_proj"') == [
        "model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.self_attn.q_proj"]
    assert paths(model, "*") == [""]  # the whole model needs no role either
    assert failure(model, "attn.q") == (
        "<spec>:1:1\n  attn.q: x\n  ^^^^^^\n"
        "error: role selector 'attn.q' needs a role map: this opt model has no role map (role maps exist for "
        "bert, gemma, gpt2, llama, mistral, qwen2); add surgery/arch/data/opt.json, or select modules by "
        'quoted path, e.g. "model.decoder.layers.*.self_attn.k_proj"')
    with pytest.raises(ModelError, match="Linear is not a transformers model"):
        detect(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match="DataParallel is not a transformers model .*, but it wraps one at 'module'"):
        detect(torch.nn.DataParallel(model))
