"""quantize: 4-bit NF4/FP4 bases, their obligations, QLoRA composition, meta planning, state-dict round trip."""

import copy
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, load_model, save_file, save_model

from surgery.apply import apply_plan
from surgery.errors import SpecError, SurgeryError
from surgery.layers import SurgeryLinear, linear_weight
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.quantize import QuantLinear4bit, error_bound_ratio
from surgery.verify import verify


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a shared 2-core machine, extra threads only spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan_for(text, model):
    return build_plan(parse(text), model)


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear4bit)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_obligations(arch):
    model = tiny(arch)
    plan = plan_for("attn.*, mlp.*: quantize(nf4)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    assert len(report.measurements) == 3
    errors = {m.obligation.split(" ")[0]: m.error for m in report.measurements}
    # The bound is tight: some weight lands near the middle of the widest code-book gap.
    assert 0.5 < errors["dequantisation"] <= 1.0


@pytest.mark.parametrize("options", ["fp4, double_quant=false", "nf4, block_size=128", "nf4, block_size=256",
                                     "fp4, compute_dtype=bfloat16"])
def test_obligations_options(options):
    model = tiny("llama")
    report = verify(plan_for(f"attn.*, mlp.down: quantize({options})", model), model)
    assert report.ok, report.text()


def test_conv1d_layout():
    """GPT-2 stores Conv1D weights [in, out]; the quantised layer holds them as nn.Linear [out, in]."""
    model = tiny("gpt2")
    original = model.transformer.h[0].attn.c_attn
    apply_plan(plan_for("attn.qkv: quantize(nf4)", model), model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SurgeryLinear) and isinstance(layer.base, QuantLinear4bit)
    assert (layer.in_features, layer.out_features) == (64, 192)
    w = original.weight.t()
    deq = layer.base.dequantized()
    assert deq.shape == w.shape
    # NF4 with a 64-block: the error is at most the widest half-gap (0.139) of each block's absmax.
    assert (deq - w).abs().max().item() <= 0.14 * w.abs().max().item()
    assert layer.base.bias is original.bias  # kept in float, not copied
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), x @ deq.t() + original.bias, atol=1e-5)


def test_bound_fails_on_corruption():
    model = tiny("llama")
    original = model.model.layers[0].self_attn.q_proj
    apply_plan(plan_for("attn.q: quantize(nf4)", model), model)
    layer = model.model.layers[0].self_attn.q_proj.base
    assert error_bound_ratio(original.weight, layer) <= 1.0
    corrupted = copy.deepcopy(layer)
    corrupted.weight.data ^= 0x08  # flip the top bit of every low nibble: each odd index moves by 8 codes
    assert error_bound_ratio(original.weight, corrupted) > 1.0
    rescaled = copy.deepcopy(layer)
    rescaled.weight.quant_state.offset.mul_(1.25)  # every block's scale off by a quarter of the mean scale
    assert error_bound_ratio(original.weight, rescaled) > 1.0


def test_cpu_kernel_row_blocks():
    """bitsandbytes' CPU dequantiser blocks rows; with in_features < block_size the layer must still be right."""
    model = tiny("llama")
    original = model.model.layers[0].self_attn.q_proj  # 64 inputs, blocks of 256
    apply_plan(plan_for("attn.q: quantize(nf4, block_size=256)", model), model)
    layer = model.model.layers[0].self_attn.q_proj.base
    assert error_bound_ratio(original.weight, layer) <= 1.0
    x = torch.randn(2, 64)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantized()), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora(arch):
    model = tiny(arch)
    plan = plan_for("attn.*: quantize(nf4) + lora(r=4)", model)
    report = verify(plan, model)
    assert report.ok, report.text()
    quant_only = copy.deepcopy(model)
    apply_plan(plan.restricted({0}), quant_only)
    qlora = copy.deepcopy(model)
    apply_plan(plan, qlora)
    layer = next(m for m in qlora.modules() if isinstance(m, SurgeryLinear))
    assert isinstance(layer.base, QuantLinear4bit) and layer.adapter is not None
    assert layer.adapter.lora_A.weight.dtype == layer.base.compute_dtype == torch.float32
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = quant_only(input_ids=ids).logits
        qlora_logits = qlora(input_ids=ids).logits
    # LoRA's B starts at zero: QLoRA at init is exactly the quantised model.
    assert (qlora_logits - base_logits).abs().max().item() <= 1e-6
    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Gradients reach the first layer's adapter back through the later layers' frozen 4-bit bases
    # (A's gradient is zero while B is).
    qlora(input_ids=ids).logits.sum().backward()
    grad = layer.adapter.lora_B.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(SurgeryError, match="cannot be merged"):
        layer.merge()


def test_lora_then_quantize_is_an_error():
    model = tiny("llama")
    with pytest.raises(SpecError, match="quantize replaces the layer itself"):
        plan_for("attn.*: lora(r=4) + quantize(nf4)", model)


def test_merge_quantized_layer_is_an_error():
    model = tiny("llama")
    apply_plan(plan_for("mlp.down: quantize(nf4)", model), model)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.mergeable is False
    before = layer.base.weight.data.clone()
    with pytest.raises(SurgeryError, match="cannot be merged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight.data, before)


def test_meta_model():
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(tiny("llama").config)
    text = "attn.*: quantize(nf4) + lora(r=4)"
    apply_plan(plan_for(text, meta), meta)
    real = tiny("llama")
    apply_plan(plan_for(text, real), real)
    meta_layers, real_layers = quantized_layers(meta), quantized_layers(real)
    assert meta_layers.keys() == real_layers.keys() and len(meta_layers) == 8
    for name, layer in meta_layers.items():
        assert layer.weight.device.type == "meta" and layer.weight.quant_state is None
        assert layer.weight.shape == real_layers[name].weight.shape
        assert layer.dequantized().shape == real_layers[name].dequantized().shape

    def count(m):
        return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert count(meta) == count(real)
    # LoRA r=4 on q (64→64), k and v (64→32), o (64→64) in 2 layers: r·(in + out) each
    assert count(real)[1] == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))


def test_rollback_restores_originals():
    model = tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    edit = apply_plan(plan_for("attn.*, mlp.*: quantize(nf4)", model), model)
    edit.rollback()
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _rebuild(text, arch, state, seed):
    fresh = tiny(arch, seed=seed)  # other random weights: the load must overwrite everything
    apply_plan(plan_for(text, fresh), fresh)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return fresh


@pytest.mark.parametrize("arch, text", [("llama", "attn.*, mlp.*: quantize(nf4) + lora(r=4)"),
                                        ("gpt2", "attn.*: quantize(fp4, double_quant=false, block_size=128)")])
def test_state_dict_round_trip(tmp_path, arch, text):
    model = tiny(arch)
    apply_plan(plan_for(text, model), model)
    saved = model.state_dict()
    assert any(k.endswith("weight.quant_state.bitsandbytes__" + text.split("quantize(")[1][:3]) for k in saved)
    assert all(isinstance(v, torch.Tensor) for v in saved.values())  # safetensors holds only tensors
    # GPT-2 ties lm_head to wte; safetensors refuses shared storage, so store independent copies.
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in saved.items()}, str(path))
    for state in (saved, load_file(str(path))):
        rebuilt = _rebuild(text, arch, state, seed=1)
        _assert_same(rebuilt, model, saved)
    # As surgery.io saves and loads: safetensors' save_model / load_model (which drop tied copies).
    save_model(model, str(tmp_path / "surgery.safetensors"))
    rebuilt = tiny(arch, seed=2)
    apply_plan(plan_for(text, rebuilt), rebuilt)
    missing, unexpected = load_model(rebuilt, str(tmp_path / "surgery.safetensors"), strict=False)
    assert not missing and not unexpected
    _assert_same(rebuilt, model, saved)


def _assert_same(rebuilt, model, saved):
    again = rebuilt.state_dict()
    assert again.keys() == saved.keys()
    assert [k for k in saved if not torch.equal(again[k], saved[k])] == []
    for name, layer in quantized_layers(rebuilt).items():
        assert torch.equal(layer.dequantized(), quantized_layers(model)[name].dequantized())
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_state_dict_mismatch_is_reported():
    model = tiny("llama")
    apply_plan(plan_for("attn.q: quantize(nf4)", model), model)
    saved = model.state_dict()
    other = tiny("llama")
    apply_plan(plan_for("attn.q: quantize(nf4, block_size=128)", other), other)
    with pytest.raises(RuntimeError, match="block size"):
        other.load_state_dict(saved, strict=True)
    missing = {k: v for k, v in saved.items() if not k.endswith("weight.absmax")}
    result = copy.deepcopy(model).load_state_dict(missing, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in saved if k.endswith("weight.absmax"))


def test_bad_block_size_is_a_spec_error():
    with pytest.raises(SpecError, match="block_size"):
        plan_for("attn.*: quantize(nf4, block_size=100)", tiny("llama"))


def test_bfloat16_model():
    model = tiny("llama").to(torch.bfloat16)
    report = verify(plan_for("attn.*: quantize(nf4, compute_dtype=bfloat16)", model), model)
    assert report.ok, report.text()
    apply_plan(plan_for("attn.*: quantize(nf4)", model), model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base.dequantized().dtype == torch.bfloat16 and layer.base.bias is None
    w, _ = linear_weight(layer.base)
    assert w.dtype == torch.bfloat16 and w.shape == (64, 64)


def test_bitsandbytes_is_imported_only_to_quantise():
    """Importing bitsandbytes takes over a second (it pulls in torch's inductor), and every command
    registers every transform: registering, checking a QLoRA spec and planning a spec without
    quantize must not import it. (Planning with quantize builds the 4-bit layers on the meta device.)"""
    code = ("import sys\n"
            "import surgery\n"
            "from surgery.models import tiny\n"
            "from surgery.planner import check\n"
            "from surgery.transforms.registry import lookup\n"
            "surgery.transforms.register_all()\n"
            "assert lookup('quantize').params.model_fields['quant_type'].default == 'nf4'\n"
            "check(surgery.parse('mlp.down: quantize(nf4) + lora(r=2)'))\n"
            "seen = ['bitsandbytes' in sys.modules]\n"
            "model = tiny('llama')\n"
            "surgery.plan(model, 'attn.*: lora(r=2); mlp.down: gate(lora(r=2) | ia3); layers: adapter(houlsby)')\n"
            "seen.append('bitsandbytes' in sys.modules)\n"
            "surgery.plan(model, 'mlp.down: quantize(nf4) + lora(r=2)')\n"
            "print(*seen, 'bitsandbytes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]
