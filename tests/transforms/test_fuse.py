"""AdapterFusion over adapters saved by earlier runs: naming them, the obligations on a decoder, BERT
and SmolLM2, stage 2's trainable set, errors at the operand, and save/reload."""

import copy
import json
import os

import pytest
import torch

import surgery
from surgery.errors import SpecError, SpecErrors
from surgery.models import load_model, tiny
from surgery.planner import check_rule
from surgery.syntax import parse
from surgery.transforms.fuse import AdapterFusion, Output
from surgery.verify import verify
from tests.helpers import draw_adapters

SAVED = "alone in a fusion, equals the adapter its output holds (x, h seeded; tensors exact)"
ONE_HOT = "in its fusion, all attention on it equals it alone (logits, relative)"
AVERAGE = "at init, the fusion is the average of its adapters by hand (logits, relative)"
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def trained_output(base, spec, out, seed):
    """Stage 1 without the training: `spec`'s adapters with random (non-zero) up-projections, saved."""
    model = copy.deepcopy(base)
    result = surgery.compile(model, spec)
    draw_adapters(model, seed)
    return result.save(out)


@pytest.fixture(scope="module", params=["llama", "bert"])
def outputs(request, tmp_path_factory):
    """A tiny model and two outputs: Pfeiffer adapters at the FFN, Houlsby adapters (attn and FFN)."""
    root = tmp_path_factory.mktemp(request.param)
    base = tiny(request.param)
    trained_output(base, "mlp: adapter(pfeiffer)", root / "a", 1)
    trained_output(base, "layers: adapter(houlsby, reduction=8)", root / "b", 2)
    return base, root


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def test_the_obligations_hold(outputs):
    base, root = outputs
    report = verify(surgery.plan(base, f'mlp: fuse("{root / "a"}", "{root / "b"}")'), base)
    assert report.ok, report.text()
    assert [(m.step, m.obligation) for m in report.measurements] == [
        (s, o) for s in (0, 1) for o in (SAVED, ONE_HOT, AVERAGE)]


def test_a_fusion_of_one_adapter_is_that_adapter(outputs):
    base, root = outputs
    fused, alone = copy.deepcopy(base), surgery.load(root / "a")
    surgery.compile(fused, f'mlp: fuse("{root / "a"}")')
    assert torch.equal(logits(fused), logits(alone))


def test_at_init_the_fusion_averages_and_forced_attention_picks_one(outputs):
    base, root = outputs
    fused = copy.deepcopy(base)
    surgery.compile(fused, f'mlp: fuse("{root / "a"}", "{root / "b"}")')
    a, b = surgery.load(root / "a"), surgery.load(root / "b")
    fusion = fused.get_submodule(fused.config.model_type == "bert" and "bert.encoder.layer.0.output.dropout"
                                 or "model.layers.0.mlp").surgery_sublayer.adapter
    assert isinstance(fusion, AdapterFusion) and len(fusion.adapters) == 2
    x, h = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        deltas = [adapter(x, h) - h for adapter in fusion.adapters]
        assert torch.allclose(fusion(x, h), h + (deltas[0] + deltas[1]) / 2, atol=1e-6)
        assert torch.allclose(fusion.attention(h, fusion.deltas(x, h)), torch.full((2, 3, 2), 0.5))
        # With the query trained away from zero the attention moves, and the output with it.
        fusion.query.weight.normal_(0, 0.5)
        moved = fusion(x, h)
        assert (fusion.attention(h, fusion.deltas(x, h)) - 0.5).abs().max() > 0.05
        assert (moved - (h + (deltas[0] + deltas[1]) / 2)).abs().max() > 1e-3
    # The fused model differs from each adapter alone (so the fusion mixes something).
    assert (logits(fused) - logits(a)).abs().max() > 1e-3 and (logits(fused) - logits(b)).abs().max() > 1e-3


def test_stage_two_trains_only_the_fusion(outputs):
    base, root = outputs
    model = copy.deepcopy(base)
    result = surgery.compile(model, f'mlp: fuse("{root / "a"}", "{root / "b"}")')
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.surgery_sublayer.adapter.{name}" for path in
                         (t.path for t in result.plan.steps[0].targets)
                         for name in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight")}
    assert result.plan.counts.trainable == 2 * (3 * 64 * 64 + 2 * 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable


def test_saves_reloads_and_diffs(outputs, tmp_path):
    base, root = outputs
    model = copy.deepcopy(base)
    result = surgery.compile(model, f'mlp: fuse("{root / "a"}", "{root / "b"}")')
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterFusion):
                module.query.weight.normal_(0, 0.3)  # as if stage 2 had trained it
    loaded = surgery.load(result.save(tmp_path / "fused"))
    assert torch.equal(logits(loaded), logits(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    text = result.diff().text()
    assert "added: AdapterFusion" in text and "adapter.query  added: Linear; 4,160 params (4,160 trainable)" in text


def test_relative_paths_resolve_against_the_spec_file(outputs, tmp_path, monkeypatch):
    base, root = outputs
    spec = root / "specs" / "fuse.surg"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text('mlp: fuse("../a", "../b")\n')
    monkeypatch.chdir(tmp_path)  # not where the spec is: the working directory does not matter
    model = copy.deepcopy(base)
    result = surgery.compile(model, spec)
    assert [s.params.path for s in result.plan.steps] == [str(root / "a"), str(root / "b")]
    out = result.save(tmp_path / "fused")
    assert json.loads((out / "surgery.json").read_text())["spec_file"] == str(spec)
    os.chdir(root)  # and loading reads the outputs where the spec said, from anywhere
    assert torch.equal(logits(surgery.load(out)), logits(model))


def test_text_specs_resolve_against_the_working_directory(outputs, monkeypatch):
    base, root = outputs
    monkeypatch.chdir(root)
    plan = surgery.plan(base, 'mlp: fuse("a", trained("b"))')
    assert [s.describe() for s in plan.steps] == [f"trained(path={root / 'a'})", f"trained(path={root / 'b'})"]


def test_a_wrong_tensor_fails_the_saved_obligation_only(outputs, monkeypatch):
    base, root = outputs
    read = Output.tensors

    def from_another_block(self, adapter):
        other = next(a for a in self.adapters.values() if a.prefix != adapter.prefix)
        return read(self, other)

    monkeypatch.setattr(Output, "tensors", from_another_block)
    report = verify(surgery.plan(base, f'mlp: fuse("{root / "a"}", "{root / "b"}")'), base)
    assert {m.obligation for m in report.failures} == {SAVED}


def test_a_fusion_ignoring_its_attention_fails(outputs, monkeypatch):
    base, root = outputs
    # A realistic slip: the values summed without their attention weights.
    monkeypatch.setattr(AdapterFusion, "delta", lambda self, x, h: self.value(self.deltas(x, h).sum(-2)).to(h.dtype))
    report = verify(surgery.plan(base, f'mlp: fuse("{root / "a"}", "{root / "b"}")'), base)
    assert {m.obligation for m in report.failures} == {ONE_HOT, AVERAGE}


def error_of(spec, model):
    with pytest.raises(SpecErrors) as e:
        surgery.plan(model, spec)
    (error,) = e.value.errors
    return error


def test_errors_point_at_the_operand(outputs, tmp_path):
    base, root = outputs
    spec = f'mlp: fuse("{root / "a"}", "{tmp_path / "nowhere"}")'
    e = error_of(spec, base)
    assert e.message == (f"trained() argument 'path': no output directory '{tmp_path / 'nowhere'}' "
                         f"(looked for {tmp_path / 'nowhere'})")
    assert e.span.column == spec.index(f'"{tmp_path}') + 1
    e = error_of(f'mlp: fuse("{tmp_path}")', base)
    assert e.message == f"trained() argument 'path': {tmp_path} is not a surgery output (it has no surgery.json)"
    # Pfeiffer adapters are at the FFN only: fusing them at attention blocks names where they are.
    spec = f'attn: fuse("{root / "b"}", "{root / "a"}")'
    e = error_of(spec, base)
    assert e.message.startswith(f"{root / 'a'} holds no adapter at ") and "its adapters are at " in e.message
    assert "select only those blocks" in e.message and e.span.column == spec.index(f'"{root / "a"}') + 1


@pytest.mark.parametrize("text, message", [
    ('mlp: fuse(lora(r=2))', "each operand of fuse(…) is one trained adapter"),
    ('mlp: fuse(adapter(pfeiffer) + adapter_drop(1))', "each operand of fuse(…) is one trained adapter"),
    ('mlp: trained("x")', "trained(…) names a trained adapter for fuse(…): write it inside fuse(…)"),
    ('mlp: fuse("x", tau=2)', "fuse() has no argument 'tau'"),
])
def test_fuse_takes_trained_adapters_only(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "surgery.json").write_text("{}")
    checked = check_rule(parse(text).rules[0])
    assert len(checked.errors) == 1 and message in checked.errors[0].message
    assert isinstance(checked.errors[0], SpecError) and checked.errors[0].span is not None


def test_an_output_of_another_width_is_refused(outputs, tmp_path):
    base, root = outputs
    wide = tiny(base.config.model_type, hidden_size=96)
    trained_output(wide, "mlp: adapter(pfeiffer)", tmp_path / "wide", 3)
    with pytest.raises(SpecError, match=f"{tmp_path / 'wide'} was trained on a model of width 96; this model's is 64"):
        surgery.compile(copy.deepcopy(base), f'mlp: fuse("{root / "a"}", "{tmp_path / "wide"}")')


def test_a_dropped_layer_has_no_adapter_to_fuse(outputs, tmp_path):
    base, root = outputs
    trained_output(base, "mlp: adapter(pfeiffer) + adapter_drop(1)", tmp_path / "upper", 4)
    assert "holds no adapter at" in error_of(f'mlp: fuse("{tmp_path / "upper"}")', base).message
    model = copy.deepcopy(base)
    result = surgery.compile(model, f'layers[1].mlp: fuse("{root / "a"}", "{tmp_path / "upper"}")')
    assert result.report.ok and len([m for m in model.modules() if isinstance(m, AdapterFusion)]) == 1


@pytest.mark.slow
def test_smollm2_fuses_two_saved_adapters(smollm2_dir, tmp_path):
    base = load_model(smollm2_dir)
    trained_output(base, "layers[-2:].mlp: adapter(pfeiffer, reduction=64)", tmp_path / "a", 1)
    trained_output(base, "layers[-2:].mlp: adapter(parallel, reduction=64)", tmp_path / "b", 2)
    result = surgery.compile(base, f'layers[-2:].mlp: fuse("{tmp_path / "a"}", "{tmp_path / "b"}")')
    assert result.report.ok, result.report.text()
    assert result.plan.counts.trainable == 2 * (3 * 576 * 576 + 2 * 576)


def test_a_fusion_composes_with_random_drops(outputs):
    base, root = outputs
    report = verify(surgery.plan(base, f'mlp: fuse("{root / "a"}", "{root / "b"}") + adapter_drop(p=0.5)'), base)
    assert report.ok and len(report.measurements) == 2 * 3 + 2, report.text()


def test_both_stages_with_surgery_train(tmp_path, char_tokenizer, capsys, monkeypatch):
    """Stage 1 trains two adapters on two texts, stage 2 a fusion of them from a spec beside their outputs."""
    import sys

    from surgery import cli

    model_dir = tmp_path / "model"
    tiny("llama").save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)

    def train(spec_text, text, out, steps):
        (tmp_path / f"{out}.surg").write_text(spec_text)
        (tmp_path / f"{out}.txt").write_text(text * 100)
        monkeypatch.setattr(sys, "argv", ["surgery", "train", str(tmp_path / f"{out}.surg"), str(model_dir), "--data",
                                          str(tmp_path / f"{out}.txt"), "-o", str(tmp_path / out), "--steps", str(steps),
                                          "--batch-size", "2", "--seq-len", "16", "--lr", "3e-2", "--log-every", "1"])
        with pytest.raises(SystemExit) as info:
            cli.main()
            raise SystemExit(0)
        assert info.value.code in (0, None), capsys.readouterr().err
        return [float(line.split("  loss")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
                if line.startswith("step ") and "  loss" in line]

    train("mlp: adapter(pfeiffer)\n", "the cat sat on the mat. ", "a", 6)
    train("mlp: adapter(parallel)\n", "a dog ran in the fog. ", "b", 6)
    loss = train('mlp: fuse("a", "b")\n', "the cat ran in the fog. ", "fused", 8)
    assert loss[-1] < loss[0]
    fused, a, b = (surgery.load(tmp_path / name).state_dict() for name in ("fused", "a", "b"))
    for i, stage_one in enumerate((a, b)):  # the fused adapters are stage 1's, untouched by stage 2
        for key, value in stage_one.items():
            if ".surgery_sublayer.adapter." in key:
                assert torch.equal(fused[key.replace(".adapter.", f".adapter.adapters.{i}.")], value), key
    assert fused["model.layers.0.mlp.surgery_sublayer.adapter.query.weight"].abs().max() > 0  # it trained
