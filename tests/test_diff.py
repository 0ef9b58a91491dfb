"""surgery.diff: module-tree and computation-graph diffs of a model before and after surgery."""

import json

import pytest
import torch
from torch import nn

from surgery.apply import apply_plan
from surgery.diff import Diff, GraphSnapshot, _module_path, capture_graph, snapshot_tree
from surgery.models import tiny
from surgery.plan import build_plan
from surgery.syntax import parse

LAYERS = (0, 1)
Q = [f"model.layers.{i}.self_attn.q_proj" for i in LAYERS]
R = 4
HIDDEN = 64


def _surgered(arch: str, spec: str, graphs: bool = True):
    model = tiny(arch)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    before = snapshot_tree(model), capture_graph(model, ids) if graphs else None
    apply_plan(build_plan(parse(spec), model), model)
    after = snapshot_tree(model), capture_graph(model, ids) if graphs else None
    return model, ids, before, after


@pytest.fixture(scope="module")
def llama_lora():
    model, ids, (bt, bg), (at, ag) = _surgered("llama", f"attn.q: lora(r={R})")
    return model, ids, Diff(bt, at, bg, ag)


def test_lora_tree_diff_exact_paths_and_counts(llama_lora):
    model, _, diff = llama_lora
    assert diff.wrapped == Q
    assert diff.wrapped_at == {q: q + ".base" for q in Q}
    assert diff.replaced == [] and diff.removed == [] and diff.moved == [] and diff.changed == []
    assert diff.added == [f"{q}.adapter{leaf}" for q in Q for leaf in ("", ".lora_A", ".lora_B", ".dropout")]

    added_params = len(LAYERS) * (HIDDEN * R + R * HIDDEN)
    assert diff.added_params == added_params == 1024
    counts = {p: diff.after_tree.modules[p].own for p in diff.added}
    with_params = {f"{q}.adapter.{ab}": HIDDEN * R for q in Q for ab in ("lora_A", "lora_B")}
    assert {p: n for p, n in counts.items() if n} == with_params

    # Totals: LoRA freezes the base, so exactly the added parameters are trainable.
    base_total = sum(p.numel() for p in tiny("llama").parameters())
    summary = diff.summary()
    assert summary["params"]["total"] == [base_total, base_total + added_params]
    assert summary["params"]["trainable"] == [base_total, added_params]
    assert summary["params"]["frozen"] == [0, base_total]
    assert diff.after_tree.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == added_params

    # The wrapper's subtree: the original weight plus the adapter; only the adapter trains.
    wrapper = diff.after_tree.modules[Q[0]]
    lora = 2 * HIDDEN * R
    assert (wrapper.cls, wrapper.total, wrapper.trainable) == ("SurgeryLinear", HIDDEN * HIDDEN + lora, lora)
    # Every original module holding parameters was frozen, and is reported under its old path.
    holders = [p for p, m in diff.before_tree.modules.items() if m.own]
    assert diff.frozen == holders and diff.unfrozen == []


def test_lora_graph_diff_charges_new_ops_to_q_proj_only(llama_lora):
    _, _, diff = llama_lora
    assert diff.graph is not None and diff.graph_error is None
    changes = diff.graph_changes()
    assert sorted(changes) == Q
    for q in Q:
        delta = next(d for d in diff.graph if d.path == q)
        assert delta.before == {"linear": 1}
        assert delta.after["linear"] == 3       # base, lora_A, lora_B
        assert changes[q]["linear"] == 2 and changes[q]["mul"] == 1 and changes[q]["add"] == 1
    mlp = [d for d in diff.graph if ".mlp" in d.path]
    assert len(mlp) == len(LAYERS) * 5        # mlp, gate/up/down_proj, act_fn per layer
    assert all(not d.changed and d.before == d.after for d in mlp)
    # Nothing is charged to the relocated or added paths themselves: they roll up to q_proj.
    assert not any(".base" in d.path or ".adapter" in d.path for d in diff.graph)


def test_graph_snapshot_paths_are_real_module_paths(llama_lora):
    model, ids, _ = llama_lora
    graph = capture_graph(model, ids)
    assert isinstance(graph, GraphSnapshot)
    modules = dict(model.named_modules())
    assert all(path in modules for path, _ in graph.nodes)
    ops = graph.ops()
    assert ops[f"{Q[0]}.adapter.lora_A"] == {"linear": 1}
    assert ops[f"{Q[0]}.base"] == {"linear": 1}
    assert ops["model.layers.0.mlp.down_proj"] == {"linear": 1}


@pytest.mark.parametrize("raw, path", [
    ("model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("", ""),
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("getattr(L['self'].model.layers, '1').mlp", "model.layers.1.mlp"),
    ("L__self__.model._modules['norm']", "model.norm"),
    ("model.rotary_emb@1", "model.rotary_emb"),
])
def test_module_path_normalisation(raw, path):
    assert _module_path(raw) == path


def test_text_groups_layers_and_marks_changes(llama_lora):
    _, _, diff = llama_lora
    text = diff.text()
    lines = text.splitlines()
    assert "~ model.layers.{0-1}.self_attn.q_proj  wrapped: Linear → SurgeryLinear" in text
    assert sum(line.startswith("+ model.layers.{0-1}.self_attn.q_proj.adapter") for line in lines) == 4
    assert "total 90,432 → 91,456 (+1,024)" in text
    assert any(line.startswith("~ model.layers.{0-1}.self_attn.q_proj  ops 1 → ") and "+2 linear" in line
               for line in lines)
    flat = diff.text(group=False)
    for path in diff.added:
        assert f"+ {path}  added" in flat
    for q in Q:
        assert f"~ {q}  wrapped" in flat


def test_json_round_trips(llama_lora):
    _, _, diff = llama_lora
    data = json.loads(json.dumps(diff.to_json()))
    assert [a["path"] for a in data["added"]] == diff.added
    assert [w["path"] for w in data["wrapped"]] == Q
    assert data["summary"]["added_params"] == 1024
    assert {m["path"] for m in data["graph"]["modules"]} == set(Q)


def test_html_is_self_contained_and_escaped(llama_lora, tmp_path):
    model, ids, diff = llama_lora
    page = diff.html()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "http://" not in page and "https://" not in page
    for path in [*diff.added, *diff.wrapped]:
        assert f"title='{path}'" in page
    assert page.count("<li class='added'>") == len(diff.added)
    assert page.count("<li class='wrapped'>") == len(diff.wrapped)
    assert page.count("<details") == page.count("</details>")
    assert page.count("<ul") == page.count("</ul>")

    # A hostile module name reaches the page only escaped.
    before = snapshot_tree(model)
    model.add_module("x<b>&'y", nn.Identity())
    try:
        hostile = Diff(before, snapshot_tree(model)).html()
    finally:
        delattr(model, "x<b>&'y")
    assert "x<b>" not in hostile and "x&lt;b&gt;&amp;&#x27;y" in hostile
    (tmp_path / "diff.html").write_text(page)


def test_export_failure_still_gives_tree_diff(monkeypatch):
    model = tiny("llama")
    ids = torch.randint(0, 128, (1, 6))
    before_tree, before_graph = snapshot_tree(model), capture_graph(model, ids)
    assert isinstance(before_graph, GraphSnapshot)
    apply_plan(build_plan(parse(f"attn.q: lora(r={R})"), model), model)

    def refuse(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression u0 > 3\n(long explanation)")

    monkeypatch.setattr(torch.export, "export", refuse)
    after_graph = capture_graph(model, ids)
    assert after_graph == "RuntimeError: Could not guard on data-dependent expression u0 > 3"

    diff = Diff(before_tree, snapshot_tree(model), before_graph, after_graph)
    assert diff.wrapped == Q and diff.added_params == 1024
    assert diff.graph is None and diff.graph_failed
    text = diff.text()
    assert "could not be captured (after: RuntimeError: Could not guard on data-dependent expression u0 > 3)" in text
    assert "~ model.layers.{0-1}.self_attn.q_proj  wrapped" in text
    page = diff.html()
    assert "class='error'" in page and "data-dependent expression u0 &gt; 3" in page
    assert diff.to_json()["graph"] == {"error": diff.graph_error, "failed": True}

    # Without graphs at all the diff says so, without calling it a failure.
    quiet = Diff(before_tree, snapshot_tree(model))
    assert not quiet.graph_failed and "was not captured (no graph given for before and after)" in quiet.text()


def test_gpt2_conv1d_tree_diff():
    # GPT-2's fused qkv is a Conv1D (weight stored [in, out]); its embedding is tied to lm_head.
    model, _, (bt, _), (at, _) = _surgered("gpt2", f"attn.qkv: lora(r={R})", graphs=False)
    diff = Diff(bt, at)
    qkv = [f"transformer.h.{i}.attn.c_attn" for i in LAYERS]
    assert diff.wrapped == qkv
    assert {q: bt.modules[q].cls for q in qkv} == {q: "Conv1D" for q in qkv}
    assert diff.after_tree.modules[f"{qkv[0]}.base"].cls == "Conv1D"
    assert diff.added == [f"{q}.adapter{leaf}" for q in qkv for leaf in ("", ".lora_A", ".lora_B", ".dropout")]
    per_layer = HIDDEN * R + R * 3 * HIDDEN
    assert diff.added_params == len(LAYERS) * per_layer == 2048
    base_total = sum(p.numel() for p in tiny("gpt2").parameters())   # the tied weight counted once
    assert bt.total == base_total and at.total == base_total + diff.added_params
    assert at.trainable == diff.added_params
    assert "~ transformer.h.{0-1}.attn.c_attn  wrapped: Conv1D → SurgeryLinear" in diff.text()


def test_replaced_removed_and_wrapped_subtree_carry():
    model = tiny("llama")
    before = snapshot_tree(model)
    layer = model.model.layers[0]
    layer.mlp.act_fn = nn.GELU()                       # replaced
    del model.model.layers[1].mlp.act_fn               # removed

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = nn.Parameter(torch.ones(1))

    layer.self_attn = Wrap(layer.self_attn)             # wrapped, with its children carried along
    model.model.norm.weight = nn.Parameter(torch.ones(2 * HIDDEN))  # same class, new shape
    model.model.layers[1].mlp.up_proj.requires_grad_(False)

    diff = Diff(before, snapshot_tree(model))
    attn = "model.layers.0.self_attn"
    assert diff.replaced == ["model.layers.0.mlp.act_fn"]
    assert diff.removed == ["model.layers.1.mlp.act_fn"]
    assert diff.wrapped == [attn] and diff.wrapped_at == {attn: attn + ".inner"}
    assert diff.added == []            # the wrapper's only new thing is a parameter, no module
    assert diff.moved == []            # q_proj → self_attn.inner.q_proj is carried by the wrap
    assert diff.changed == ["model.norm"]
    assert diff.unfrozen == [] and diff.frozen == ["model.layers.1.mlp.up_proj"]
    assert diff.after_tree.modules[attn].total == before.modules[attn].total + 1
    text = diff.text(group=False)
    assert "~ model.layers.0.mlp.act_fn  replaced: SiLUActivation → GELU" in text
    assert "- model.layers.1.mlp.act_fn  removed: SiLUActivation" in text
    assert "~ model.norm  changed: LlamaRMSNorm parameters changed: weight [128] float32, weight [64] float32" in text
    page = diff.html()
    assert page.count("<li class='removed'>") == 1 and page.count("<li class='replaced'>") == 1


def test_graph_rolls_up_replaced_modules():
    model = tiny("llama")
    ids = torch.randint(0, 128, (1, 6))
    before = snapshot_tree(model), capture_graph(model, ids)
    model.model.layers[0].mlp.act_fn = nn.GELU()
    diff = Diff(before[0], snapshot_tree(model), before[1], capture_graph(model, ids))
    assert diff.graph_changes() == {"model.layers.0.mlp.act_fn": {"silu": -1, "gelu": 1}}


def test_runtime_changes_outside_the_tree_are_shown():
    """window() changes behaviour through a hook, a module setting and the attention implementation."""
    model = tiny("llama")
    before = snapshot_tree(model)
    apply_plan(build_plan(parse("layers[1].attn: window(8)"), model), model)
    diff = Diff(before, snapshot_tree(model))
    assert diff.runtime == [
        ("config", "_attn_implementation: sdpa → surgery"),
        ("model.layers.1.self_attn", "+pre-hook before_attention, +surgery_attention"),
    ]
    assert "~ model.layers.1.self_attn  +pre-hook before_attention, +surgery_attention" in diff.text()
    assert "<h2>Runtime</h2>" in diff.html() and diff.to_json()["runtime"][0]["where"] == "config"
