"""The attention program under torch.export (surgery/attention/export.py): one ``surgery.attention``
node per attention call, whose text reads back as the same stages, and an exported program that
computes the eager model's logits; eager and training calls never reach the op."""

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

from surgery.apply import apply_plan
from surgery.attention import export
from surgery.attention.program import (
    Bounded,
    HeadRule,
    KVPrefix,
    PreRope,
    Program,
    RelativeFrame,
    SinkFrame,
    Stage,
    WindowRule,
)
from surgery.models import tiny
from surgery.transforms.alibi import AlibiBias
from surgery.transforms.logn import LogScale
from surgery.transforms.s2attn import s2attn_stage
from surgery.transforms.window import window_stage
from tests.helpers import logits, plan_for

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _export(model, **inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args=(), kwargs={**inputs, "use_cache": False}, strict=False)


def _ops(exported) -> list[str]:
    return [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]


def _surgered(spec: str):
    model = tiny("llama")
    apply_plan(plan_for(spec, model), model)
    return model.eval()


def _eager_and_exported(model, nodes: int):
    """(the eager logits, the exported program's) of `model` on IDS, whose exported graph must hold
    `nodes` attention-op nodes."""
    exported = _export(model, input_ids=IDS)
    assert _ops(exported).count("surgery.attention.default") == nodes
    return logits(model, IDS, use_cache=False), logits(exported.module(), IDS, use_cache=False)


# ------------------------------------------------------------------------------ the text


def test_window_with_sinks_reads_as_its_fields():
    text = export.encode(Program((window_stage(16, 2, rotary=object(), span="spec:1:1"),)))
    assert text == ("Stage(owner='window(16, sinks=2)', rules=(WindowRule(size=16, sinks=2),), "
                    "frame=SinkFrame(size=16, sinks=2), cache=Bounded(size=16, sinks=2, pre_rope=True))")
    # The rotary and the span are not written; they read back as None.
    assert export.decode(text) == Program((Stage("window(16, sinks=2)", rules=(WindowRule(16, 2),),
                                                 frame=SinkFrame(16, 2, None), cache=Bounded(16, 2, True)),))


@pytest.mark.parametrize("stages", [
    (window_stage(8, 0),),
    (s2attn_stage(4),),                                             # head rules: Fractions, a nested rule
    (Stage("alibi()", bias=(AlibiBias(0.5),), unrotated=True), Stage("logn(8)", scale=(LogScale(8),))),
    (Stage("prefix_tuning(3)", prefix=KVPrefix(3, kv=lambda module, kwargs: None)), window_stage(6, 2, rotary=1)),
    (Stage("leaky_rerope(window=4, k=2)", frame=RelativeFrame(4, 2.0, rotary=1), cache=PreRope()),),
    (Stage("rerope(4)", frame=RelativeFrame(4, None, rotary=1, trained=16), cache=PreRope()),),
], ids=["window", "s2attn", "alibi+logn", "prefix+sinks", "leaky_rerope", "rerope"])
def test_every_stage_kind_reads_back(stages):
    program = Program(stages)
    decoded = export.decode(export.encode(program))
    assert decoded == export.Program(export._strip(stages))
    assert [s.owner for s in decoded.stages] == [s.owner for s in stages]
    assert decoded.reach(8) == program.reach(8) and decoded.only_windows == program.only_windows
    if program.head_rules:
        assert decoded.head_rules[1].start == Fraction(1, 2) and decoded.head_rules[1].rule.shift == 2


def test_a_stage_the_text_cannot_carry_is_unwritable():
    @dataclass(frozen=True)
    class Local:   # a rule of no module the decoder reads: written, it could not be read back
        size: int = 3

        def visible(self, i, j):
            return i - j < self.size

        def reach(self):
            return self.size

    with pytest.raises(export.Unwritable):
        export.encode(Program((Stage("local()", rules=(Local(),)),)))
    with pytest.raises(export.Unwritable):
        export.encode(Program((Stage("ruled()", rules=(HeadRule(lambda i, j: i >= j),)),)))


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')",
    "Stage(owner='a', rules=(Unknown(size=1),))",
    "Stage(owner='a') + WindowRule(size=3)",
    "Stage(owner='a', **{'rules': ()})",
    "Stage('a')",
])
def test_decode_reads_stage_dataclasses_and_literals_only(text):
    with pytest.raises(ValueError):
        export.decode(text)


# ------------------------------------------------------------------------------ the exported graph


def test_each_attention_call_is_one_node(monkeypatch):
    base = _export(tiny("llama"), input_ids=IDS)
    ours = _export(_surgered("attn.*: window(6, sinks=2)"), input_ids=IDS)
    monkeypatch.setattr(export, "carried", lambda call, mask: None)   # every call traced op by op, as before
    traced = _export(_surgered("attn.*: window(6, sinks=2)"), input_ids=IDS)
    before, after = _ops(base), _ops(ours)
    assert after.count("surgery.attention.default") == 2                          # one per layer
    assert before.count("aten.scaled_dot_product_attention.default") == 2
    assert not any("flash_attention" in op or "scaled_dot_product" in op for op in after)
    # The op replaces sdpa and its grouped-head expansion, the model no longer builds a causal mask,
    # and the sink frame's table (the rotary called at positions 0 … 5) is traced once for both
    # layers: fewer nodes than the untouched model's graph, where the traced program had 4.5× as many.
    assert (len(before), len(after), len(_ops(traced))) == (196, 169, 765)
    assert (before.count("aten.cos.default"), after.count("aten.cos.default")) == (1, 2)   # the model's rotary, + the table
    assert "wrap_with_set_grad_enabled" not in after   # no grad-mode region per layer (each costs export a graph split)


SPECS = ["attn.*: window(6)", "attn.*: window(6, sinks=2)", "attn.*: prefix_tuning(3) + window(6, sinks=2)",
         "attn.*: rope(ntk_dynamic, scale=4) + window(8, sinks=2)", "attn.*: alibi() + logn(8)",
         "attn.*: leaky_rerope(window=4, k=2)"]


@pytest.mark.parametrize("spec", SPECS)
def test_the_exported_program_computes_the_eager_logits(spec):
    want, got = _eager_and_exported(_surgered(spec), nodes=2)
    untouched = logits(tiny("llama"), IDS, use_cache=False)
    assert (got - want).abs().max() < 1e-6
    assert (want - untouched).abs().max() > 1e-3   # the stages change the logits: the comparison can fail


def test_a_padded_batch_passes_its_mask_to_the_op():
    model = _surgered("attn.*: window(6, sinks=2)")
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0                                          # row 0 left-padded by 5
    exported = _export(model, input_ids=IDS, attention_mask=mask)
    node = next(n for n in exported.graph.nodes if str(n.target) == "surgery.attention.default")
    assert node.args[4] is not None and tuple(node.args[4].meta["val"].shape) == (2, 1, 1, 20)
    want = logits(model, IDS, attention_mask=mask, use_cache=False)
    got = logits(exported.module(), IDS, attention_mask=mask, use_cache=False)
    alone = logits(model, IDS[:1, 5:], use_cache=False)
    assert (got - want).abs().max() < 1e-6
    assert (got[0, 5:] - alone[0]).abs().max() < 1e-4      # the padded row equals the row alone


def test_the_prefix_is_an_input_of_the_op_not_a_constant():
    """The K/V prefix is computed from the model's parameters by traced code and handed to the op, so
    the exported program follows a change of those parameters, as the eager model does."""
    model = _surgered("attn.*: prefix_tuning(3) + window(6, sinks=2)")
    exported = _export(model, input_ids=IDS)
    node = next(n for n in exported.graph.nodes if str(n.target) == "surgery.attention.default")
    keys, values = node.args[9], node.args[10]
    assert tuple(keys.meta["val"].shape)[-2] == tuple(values.meta["val"].shape)[-2] == 3   # P = 3
    run = exported.module()
    prefix = [name for name, _ in run.named_parameters() if "prefix" in name]
    assert prefix
    before = logits(run, IDS, use_cache=False)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *run.named_parameters()]:
            if "prefix" in name:
                p.add_(0.5)
    want, got = logits(model, IDS, use_cache=False), logits(run, IDS, use_cache=False)
    assert (got - want).abs().max() < 1e-6 and (got - before).abs().max() > 1e-3


def test_a_consistent_frame_stays_traced():
    from surgery.attention.implementation import Call
    from surgery.attention.program import ConsistentFrame

    stage = Stage("rope(ntk_consistent, scale=4)", frame=ConsistentFrame(rotary=1), cache=PreRope())
    assert export.carried(Call(Program((stage,)), (IDS, IDS)), None) is None
    assert export.carried(Call(Program((window_stage(6, 0),))), None) is not None
    assert export.carried(Call(Program()), None) is None                  # plain attention: one sdpa node already


def test_eager_and_training_calls_never_reach_the_op(monkeypatch):
    model = _surgered("attn.*: window(6, sinks=2); attn.q: lora(r=2)")

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call reached the export op")

    monkeypatch.setattr(export, "attend", refuse)
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
        model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False)
    model.train()
    model(input_ids=IDS, use_cache=False).logits.sum().backward()
    with pytest.raises(AssertionError, match="reached the export op"):
        _export(model.eval(), input_ids=IDS)


def test_a_saved_program_runs_in_a_fresh_process(tmp_path):
    """Nothing is looked up in this process's state: a program saved with torch.export.save runs where
    only the op is registered (``import surgery.attention``) and gives the same logits."""
    model = _surgered("attn.*: prefix_tuning(3) + window(6, sinks=2)")
    torch.export.save(_export(model, input_ids=IDS), tmp_path / "model.pt2")
    torch.save({"ids": IDS, "logits": logits(model, IDS, use_cache=False)}, tmp_path / "want.pt")
    script = ("import sys, torch, surgery.attention\n"
              "want = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    got = torch.export.load(sys.argv[1]).module()(input_ids=want['ids'], use_cache=False).logits\n"
              "print(float((got - want['logits']).abs().max()))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt2"), str(tmp_path / "want.pt")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-6


def test_a_gated_prefix_stays_traced_and_computes_the_eager_logits():
    """UniPELT's gate on a prefix is a callable of the hidden states, which the op's text cannot carry:
    the call stays traced op by op, and the exported program still computes the gated attention."""
    model = _surgered("attn.*: gate(prefix_tuning(3))")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.normal_(0, 1, generator=torch.Generator().manual_seed(1))  # a gate that is not ½ everywhere
    want, got = _eager_and_exported(model, nodes=0)
    ungated = logits(_surgered("attn.*: prefix_tuning(3)"), IDS, use_cache=False)
    assert (got - want).abs().max() < 1e-5
    assert (want - ungated).abs().max() > 1e-4   # the gate changes the logits: the comparison can fail
