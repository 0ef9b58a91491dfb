"""Prompt tuning: obligations on three architectures (and that each can fail), padding, generate,
the loss, training surface, exact rollback, initialisations, and PEFT as the oracle."""

import copy
import json
import math

import pytest
import safetensors.torch
import torch

import surgery
import surgery.transforms.prompt_tuning as pt
from surgery.apply import apply_plan
from surgery.errors import ModelError, SpecError
from surgery.models import load_model, tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.verify import verify

N = 4  # virtual tokens


def surgered(arch, text=f"embed: prompt_tuning({N})"):
    model = tiny(arch)
    plan = build_plan(parse(text), model)
    return model, plan, apply_plan(plan, model)


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def embed_of(model):
    return model.get_input_embeddings()


def prompt_of(model):
    return pt.find_prompt(model).prompt_embeddings


@torch.no_grad()
def by_hand(original, prompt, ids, **kwargs):
    """The untouched model fed ``inputs_embeds = [P; e(ids)]``; all logits (virtual positions included)."""
    fed = torch.cat([prompt.expand(ids.shape[0], -1, -1), embed_of(original)(ids)], dim=1)
    return original(inputs_embeds=fed, **kwargs)


# ------------------------------------------------------------------------------- obligations


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_obligations_hold(arch):
    model = tiny(arch)
    report = verify(build_plan(parse(f"embed: prompt_tuning({N})"), model), model)
    assert report.ok, report.text()
    assert len(report.measurements) == 4
    checked = [m for m in report.measurements if m.not_applicable is None]
    assert all(m.error <= 1e-5 for m in checked)
    # An encoder has no decode path: said so, not reported as a measured 0.
    skipped = {m.obligation: m.not_applicable for m in report.measurements if m.not_applicable}
    assert list(skipped) == (["prefill + decode equals the full forward"] if arch == "bert" else [])
    if arch == "bert":
        assert "n/a" in report.text() and "no KV cache" in report.text()
        assert [r["error"] for r in report.to_json() if r["not_applicable"]] == [None]


def _sabotaged(monkeypatch, bug):
    """Wrap the real hooks with one realistic bug."""
    real = pt._hooks

    def hooks():
        before, after = real()

        def buggy_before(module, args, kwargs):
            if bug == "prompt on every call":  # ignores the cache: re-prepends on decode steps
                cache = kwargs.pop("cache", None)
                args, kwargs = before(module, args, kwargs)
                return args, {**kwargs, "cache": cache}
            given = kwargs.get("position_ids") is not None
            args, kwargs = before(module, args, kwargs)
            if bug == "mask dropped":
                kwargs.pop("attention_mask", None)
            if bug == "given positions shifted twice" and given:
                positions = kwargs["position_ids"].clone()
                positions[:, -module.surgery_prompt.length:] += module.surgery_prompt.length
                kwargs["position_ids"] = positions
            return args, kwargs

        def buggy_after(module, args, kwargs, output):
            mark = getattr(kwargs.get("inputs_embeds"), "_surgery_prompt", None)
            if bug == "strips one too few" and mark is not None:
                output.last_hidden_state = output.last_hidden_state[:, mark[0] - 1:]
                return output
            return after(module, args, kwargs, output)

        return buggy_before, buggy_after

    monkeypatch.setattr(pt, "_hooks", hooks)


BY_HAND, PADDED = "equals feeding the virtual embeddings by hand", "left-padded batch equals each row alone"


def failures(arch="llama", text=f"embed: prompt_tuning({N})"):
    model = tiny(arch)
    report = verify(build_plan(parse(text), model), model)
    return {m.obligation.split(" [crashed")[0] for m in report.failures}


@pytest.mark.parametrize("bug, fails", [
    ("mask dropped", "length 0 is the identity"),
    ("strips one too few", BY_HAND),
    ("prompt on every call", "prefill + decode equals the full forward"),
])
def test_obligations_catch_bugs(monkeypatch, bug, fails):
    _sabotaged(monkeypatch, bug)
    assert fails in failures()


def test_padded_obligation_catches_positions_shifted_twice(monkeypatch):
    # generate() numbers the tokens itself; adding n a second time only shows with given positions.
    _sabotaged(monkeypatch, "given positions shifted twice")
    assert failures() == {PADDED}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_obligations_catch_the_prompt_numbered_before_the_padding(monkeypatch, arch):
    # The bug of issue 5: without position_ids the model numbers [P, padding, x].
    monkeypatch.setattr(pt, "positions_after_padding", lambda mask, n: None)
    # GPT-2 shifts a padded row without positions anyway, so there only the by-hand reference sees it.
    assert failures(arch) == ({BY_HAND, PADDED} if arch == "llama" else {BY_HAND})


# ------------------------------------------------------------------------------ behaviour


def left_padded(ids, lengths):
    """Row r's first lengths[r] tokens, right-aligned after pad id 0: (ids, attention mask)."""
    width = ids.shape[1]
    padded, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, k in enumerate(lengths):
        padded[row, width - k:], mask[row, width - k:] = ids[row, :k], 1
    return padded, mask


def generate_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate() passes


LENGTHS = (9, 5, 2)


@pytest.mark.parametrize("arch, given", [("llama", False), ("qwen2", False), ("llama", True), ("gpt2", True)])
def test_left_padded_rows_equal_rows_alone(arch, given):
    """Issue 5: without position_ids a rotary model's padded rows were off (P numbered before the
    padding); with them (generate's), every architecture's are exact."""
    model, _, _ = surgered(arch)
    ids = tokens(3, 9)
    padded, mask = left_padded(ids, LENGTHS)
    extra = {"position_ids": generate_positions(mask)} if given else {}
    with torch.no_grad():
        batch = model(input_ids=padded, attention_mask=mask, **extra).logits
        for row, k in enumerate(LENGTHS):
            alone = model(input_ids=ids[row:row + 1, :k]).logits
            assert (batch[row, 9 - k:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch, given", [("llama", False), ("llama", True), ("gpt2", True)])
def test_decode_after_a_left_padded_prefill_equals_rows_alone(arch, given):
    model, _, _ = surgered(arch)
    ids = tokens(3, 9)
    padded, mask = left_padded(ids, LENGTHS)
    prefill = 7
    steps = []
    with torch.no_grad():
        cache = None
        for start, end in [(0, prefill), (7, 8), (8, 9)]:
            extra = {"position_ids": generate_positions(mask[:, :end])[:, start:]} if given else {}
            out = model(input_ids=padded[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True,
                        **extra)
            cache = out.cache
            steps.append(out.logits)
        batch = torch.cat(steps, dim=1)
        for row, k in enumerate(LENGTHS):
            alone = model(input_ids=ids[row:row + 1, :k]).logits
            assert (batch[row, 9 - k:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_learned_positions_put_the_prompt_after_the_padding(arch):
    """Without position_ids GPT-2 and BERT shift a padded row (the untouched model does too); the
    prompt then sits right after the padding: the original fed [padding, P, x] by hand."""
    model, _, _ = surgered(arch)
    original = tiny(arch)
    ids = tokens(3, 9)
    padded, mask = left_padded(ids, LENGTHS)
    prompt = prompt_of(model).detach()
    with torch.no_grad():
        ours = model(input_ids=padded, attention_mask=mask).logits
        embeds = embed_of(original)(padded)
        for row, k in enumerate(LENGTHS):
            pad = 9 - k
            fed = torch.cat([embeds[row, :pad], prompt, embeds[row, pad:]])[None]
            fed_mask = torch.cat([mask[row, :pad], torch.ones(N, dtype=mask.dtype), mask[row, pad:]])[None]
            reference = original(inputs_embeds=fed, attention_mask=fed_mask).logits
            assert (ours[row, pad:] - reference[0, pad + N:]).abs().max().item() <= 1e-5


def test_left_padded_loss_equals_the_rows_losses():
    model, _, _ = surgered("llama")
    ids = tokens(3, 9)
    padded, mask = left_padded(ids, LENGTHS)
    labels = padded.masked_fill(mask == 0, -100)
    for row, k in enumerate(LENGTHS):
        labels[row, 9 - k] = -100  # a row's first token has no prediction alone; in the batch, a pad's
    loss = model(input_ids=padded, attention_mask=mask, labels=labels).loss
    alone = [model(input_ids=ids[r:r + 1, :k], labels=ids[r:r + 1, :k]).loss for r, k in enumerate(LENGTHS)]
    weighted = sum(loss_r * (k - 1) for loss_r, k in zip(alone, LENGTHS)) / sum(k - 1 for k in LENGTHS)
    assert abs(loss.item() - weighted.item()) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_equals_greedy_by_hand(arch):
    model, _, _ = surgered(arch)
    original = tiny(arch)
    prompt = prompt_of(model).detach()
    ids = tokens(2, 6)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    seq = ids
    for _ in range(5):
        nxt = by_hand(original, prompt, seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_left_padded_batch_matches_rows(arch):
    model, _, _ = surgered(arch)
    ids = tokens(2, 6)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, :2], mask[0, :2] = 0, 0
    out = model.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, 2:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 2:], alone[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_labels_loss_equals_by_hand(arch):
    model, _, _ = surgered(arch)
    original = tiny(arch)
    ids = tokens()
    loss = model(input_ids=ids, labels=ids).loss
    # The same T-1 predictions the plain model scores: virtual positions and the first real token unscored.
    labels = torch.cat([torch.full((ids.shape[0], N + 1), -100), ids[:, 1:]], dim=1)
    reference = by_hand(original, prompt_of(model).detach(), ids, labels=labels).loss
    assert math.isfinite(loss.item())
    assert abs(loss.item() - reference.item()) <= 1e-5
    loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads == {name for name, p in model.named_parameters() if p.requires_grad}
    assert prompt_of(model).grad.abs().sum() > 0


def test_hidden_states_and_tuple_outputs_are_cut_to_the_real_tokens():
    model, _, _ = surgered("llama")
    original = tiny("llama")
    ids = tokens()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ref = by_hand(original, prompt_of(model).detach(), ids, output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states)
        for h, r in zip(out.hidden_states, ref.hidden_states):
            assert (h - r[:, N:]).abs().max().item() <= 1e-5
        # The backbone called directly, positionally, asking for a tuple.
        as_tuple = model.model(ids, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert (as_tuple[0] - out.hidden_states[-1]).abs().max().item() <= 1e-5


def test_deep_copy_uses_its_own_prompt():
    model, _, _ = surgered("llama")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        prompt_of(twin).mul_(-1)
    ids = tokens()
    original = tiny("llama")
    with torch.no_grad():
        for m in (model, twin):
            reference = by_hand(original, prompt_of(m), ids).logits[:, N:]
            assert (m(input_ids=ids).logits - reference).abs().max().item() <= 1e-5


def test_only_the_prompt_is_trainable():
    model, _, _ = surgered("qwen2")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.surgery_prompt.prompt_embeddings"]
    assert prompt_of(model).shape == (N, model.config.hidden_size)
    assert prompt_of(model).dtype == torch.float32


def test_model_selector_attaches_to_the_input_embedding():
    model = tiny("gpt2")
    plan = build_plan(parse(f"model: prompt_tuning({N})"), model)
    assert [t.path for t in plan.steps[0].targets] == ["transformer.wte"]


def test_rollback_is_exact():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad = {k: p.requires_grad for k, p in model.named_parameters()}
    hooks = (len(model.model._forward_pre_hooks), len(model.model._forward_hooks))
    ids = tokens()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    edit = apply_plan(build_plan(parse(f"embed: prompt_tuning({N})"), model), model)
    assert hasattr(model.model, pt.ATTRIBUTE)
    edit.rollback()
    assert not hasattr(model.model, pt.ATTRIBUTE)
    assert "surgery_prompt" not in model.model._modules
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == hooks
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)


# -------------------------------------------------------------------- learned positions


@pytest.mark.parametrize("arch, rows, path", [("gpt2", 64, "transformer.wpe"),
                                              ("bert", 64, "bert.embeddings.position_embeddings")])
def test_a_prompt_that_fills_the_position_table_is_refused_before_any_change(arch, rows, path):
    """Issue 5: such a spec could never verify and reported a bare "error inf"."""
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecError) as e:
        surgery.compile(model, f"embed: prompt_tuning({rows})")
    assert f"{arch} has {rows} learned positions ({path}); {rows} virtual tokens leave none for the input" \
        in str(e.value)
    assert "at most 63" in str(e.value)
    assert not any(isinstance(m, pt.PromptEmbedding) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_prompt_that_leaves_few_positions_verifies_and_limits_the_input():
    model = tiny("gpt2")
    result = surgery.compile(model, "embed: prompt_tuning(60)")
    assert result.report.ok, result.report.text()
    with torch.no_grad():
        assert model(input_ids=tokens(2, 4)).logits.shape == (2, 4, 128)
        with pytest.raises(ModelError, match="an input may hold at most 4 tokens; this one needs 5"):
            model(input_ids=tokens(2, 5))
        out = model(input_ids=tokens(2, 3), use_cache=True)
        with pytest.raises(ModelError, match="at most 4 tokens; this one needs 5"):
            model(input_ids=tokens(2, 2), cache=out.cache, use_cache=True)


# -------------------------------------------------------------------------- initialisation


def test_init_tokens_equals_prepending_those_tokens():
    model, _, _ = surgered("llama", "embed: prompt_tuning(5, init=tokens, token_ids=[7, 3])")
    original = tiny("llama")
    ids = tokens()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        prefix = torch.tensor([[7, 3, 7, 3, 7]]).expand(ids.shape[0], -1)  # repeated to fill, as PEFT's TEXT
        reference = original(input_ids=torch.cat([prefix, ids], dim=1)).logits[:, 5:]
    assert (ours - reference).abs().max().item() <= 1e-5


def test_init_vocab_copies_vocabulary_rows():
    model, _, _ = surgered("qwen2", f"embed: prompt_tuning({N}, init=vocab)")
    table = embed_of(model).weight.detach()
    for row in prompt_of(model).detach():
        assert (table == row).all(dim=1).any()


def test_init_random_is_standard_normal_and_seeded():
    a, _, _ = surgered("llama", "embed: prompt_tuning(64)")
    b, _, _ = surgered("llama", "embed: prompt_tuning(64)")
    w = prompt_of(a).detach()
    assert torch.equal(w, prompt_of(b).detach())
    assert abs(w.std().item() - 1) < 0.05 and abs(w.mean().item()) < 0.05


@pytest.mark.parametrize("text, message", [
    ("embed: prompt_tuning(4, init=tokens)", "init=tokens needs token_ids"),
    ("embed: prompt_tuning(4, token_ids=[1])", "token_ids is only used with init=tokens"),
    ("embed: prompt_tuning(4, init=tokens, token_ids=[1, 200])", "token id 200 is out of range"),
    ("embed: prompt_tuning(-1)", "'length'"),
    ("attn: prompt_tuning(2)", "attaches to embeddings anchors"),
])
def test_user_errors(text, message):
    with pytest.raises(SpecError, match=message):
        build_plan(parse(text), tiny("llama"))


# ------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_our_export(tmp_path, arch):
    import peft
    model, plan, _ = surgered(arch)
    step = plan.steps[0]
    impl = step.spec.instance()
    config = {**impl.peft(step.params, step.targets), "task_type": "CAUSAL_LM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in impl.peft_tensors(model).items()}
    safetensors.torch.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(tiny(arch), str(tmp_path))
    ids = tokens()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
        ours = model(input_ids=ids).logits
    assert theirs.shape[1] == N + ids.shape[1]
    assert (theirs[:, N:] - ours).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_left_padded_batch_equals_rows_alone(smollm2_dir):
    """Issue 5's figure: left-padded SmolLM2 rows against the rows alone, no position_ids, was off by
    up to 10 (the untouched model: 1e-4); now within the untouched model's own noise. The spec also
    verifies (its decode obligation had been absolute, below SmolLM2's own float32 noise)."""
    base = load_model(smollm2_dir)
    plan = build_plan(parse("embed: prompt_tuning(8)"), base)
    report = verify(plan, base)
    model = base
    apply_plan(plan, model)
    ids = torch.randint(0, 49152, (3, 12), generator=torch.Generator().manual_seed(0))
    lengths = (12, 7, 3)
    padded, mask = left_padded(ids, lengths)
    with torch.no_grad():
        batch = model(input_ids=padded, attention_mask=mask).logits
        errors = [(batch[row, 12 - k:] - model(input_ids=ids[row:row + 1, :k]).logits[0]).abs().max().item()
                  for row, k in enumerate(lengths)]
    assert max(errors) < 1e-3
    assert report.ok, report.text()
