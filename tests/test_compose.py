"""Composition nodes and combinators: pruning, relabelling, the innermost step, registration."""

import pytest

from surgery.compose import COMBINATORS, Fuse, Gate, Leaf, NoParams, Par, Seq, called, combinator
from surgery.errors import SpecError
from surgery.planner import check_rule
from surgery.syntax import parse
from surgery.transforms.registry import Params

TREE = Seq((Leaf(0), Par((Leaf(1), Seq((Leaf(2), Leaf(3))))), Leaf(4)))


def test_prune_keeps_the_structure_of_what_is_left_and_collapses_single_items():
    assert TREE.prune({0, 1, 2, 3, 4}) == TREE
    assert TREE.prune({1, 3}) == Par((Leaf(1), Leaf(3)))
    assert TREE.prune({2, 4}) == Seq((Leaf(2), Leaf(4)))
    assert TREE.prune({3}) == Leaf(3)
    assert TREE.prune(set()) is None


def test_a_gate_of_one_operand_stays_a_gate_and_keeps_its_parameters():
    params = NoParams()
    gate = Gate((Leaf(0), Leaf(1)), None, params)
    pruned = gate.prune({1})
    assert pruned == Gate((Leaf(1),)) and pruned.params is params
    assert Fuse((Leaf(0),)).prune({0}) == Fuse((Leaf(0),)) != Gate((Leaf(0),))


def test_relabel_drops_calls_that_became_no_step():
    assert TREE.relabel([10, None, 12, 13, None]) == Seq((Leaf(10), Seq((Leaf(12), Leaf(13)))))


def test_head_is_the_step_applied_first_and_alone():
    assert TREE.head() == 0 and TREE.prune({2, 3}).head() == 2
    assert Par((Leaf(0), Leaf(1))).head() is None and Gate((Leaf(0),)).head() is None
    assert TREE.leaves() == [0, 1, 2, 3, 4]
    assert [type(g).__name__ for g in TREE.groups()] == ["Seq", "Par", "Seq"]


def test_only_gate_and_fuse_are_spelt_as_calls():
    assert called("gate") is Gate.combinator and called("fuse") is Fuse.combinator
    assert called("seq") is None and called("par") is None and called("lora") is None
    assert Gate.combinator.supported and Seq.combinator.supported


def test_a_gate_plans_as_a_node_over_its_operands_and_validates_its_arguments():
    checked = check_rule(parse("attn: lora(r=2) + gate(lora | ia3)").rules[0])
    assert checked.tree == Seq((Leaf(0), Gate((Par((Leaf(1), Leaf(2))),))))
    assert not checked.errors and sorted(checked.leaves) == [0, 1, 2]
    (e,) = check_rule(parse("attn: gate(lora | ia3, foo=1)").rules[0]).errors  # a gate has no parameters
    assert e.message == "gate() has no argument 'foo'" and e.span.column == 24


def test_a_path_operand_of_fuse_reads_as_a_trained_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "surgery.json").write_text("{}")
    checked = check_rule(parse('mlp: fuse("a", trained("b")) + lora').rules[0])
    assert not checked.errors and Fuse.combinator.supported
    assert checked.tree == Seq((Fuse((Leaf(0), Leaf(1))), Leaf(2)))
    assert [c.name for c in checked.calls] == ["trained", "trained", "lora"]
    assert [checked.leaves[i].params.path for i in (0, 1)] == [str(tmp_path / "a"), str(tmp_path / "b")]


class MixParams(Params):
    weight: float = 1.0


@pytest.fixture
def mix():
    @combinator("mix", spelling="mix(…)", summary="a test combinator", one_anchor=True, params=MixParams)
    class Mix(Gate):
        pass

    yield Mix
    del COMBINATORS["mix"]


def test_a_supported_combinator_validates_its_own_parameters(mix):
    checked = check_rule(parse("attn: mix(lora | ia3, weight=0.5)").rules[0])
    assert not checked.errors
    assert checked.tree == mix((Par((Leaf(0), Leaf(1))),), None, MixParams(weight=0.5))
    (e,) = check_rule(parse("attn: mix(lora, wieght=0.5)").rules[0]).errors
    assert isinstance(e, SpecError) and e.message == "mix() has no argument 'wieght' (did you mean 'weight'?)"
    (e,) = check_rule(parse("attn: mix(lora, weight=true)").rules[0]).errors
    assert e.message == "mix() argument 'weight': Input should be a valid number"


def test_a_combinator_registers_once(mix):
    with pytest.raises(RuntimeError, match="registered twice"):
        combinator("mix", spelling="mix(…)", summary="again", one_anchor=True)(type("Again", (Gate,), {}))
