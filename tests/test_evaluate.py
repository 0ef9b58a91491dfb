"""Long-context evaluation: chunked loss == transformers' loss, the split at L, the passkey prompt
and scorer, seeded prompts shared by every spec, user errors; SmolLM2's tokenizer path (slow)."""

import math

import pytest
import torch
import torch.nn.functional as F

from surgery import evaluate as ev
from surgery.errors import ModelError, SurgeryError
from surgery.models import tiny


@pytest.fixture(scope="module")
def tokenizer(char_tokenizer):
    return char_tokenizer


def text_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def per_target_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """−log p(x_t | x_<t) for t = 1..n−1 from the full logits (the reference the chunks must match)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none").double()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_loss_equals_transformers_loss(arch, chunk):
    model = tiny(arch)
    ids = text_ids(50)
    with torch.no_grad():
        expected = model(input_ids=ids[None], labels=ids[None]).loss.item()
    got = ev.sequence_loss(model, ids, trained_length=64, chunk=chunk)
    assert got.count_first == 49 and got.count_past == 0
    assert math.log(got.ppl) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("L", [2, 20, 49, 50])
def test_split_at_the_trained_length(L):
    # Targets t < L are "first L" (L − 1 of them), targets t ≥ L "past L".
    model = tiny("llama")
    ids = text_ids(50, seed=3)
    nll = per_target_nll(model, ids)  # entry k is target t = k + 1
    got = ev.sequence_loss(model, ids, trained_length=L, chunk=8)
    assert (got.count_first, got.count_past) == (L - 1, 50 - L)
    assert math.log(got.ppl_first) == pytest.approx(nll[:L - 1].mean().item(), abs=1e-5)
    if L < 50:
        assert math.log(got.ppl_past) == pytest.approx(nll[L - 1:].mean().item(), abs=1e-5)
    else:
        assert got.ppl_past is None


def test_the_head_never_sees_more_than_a_chunk():
    model = tiny("llama")
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    try:
        ev.sequence_loss(model, text_ids(40), trained_length=16, chunk=16)
    finally:
        handle.remove()
    assert rows == [16, 16, 7]


def test_passkey_prompt_places_the_key_at_the_asked_depth(tokenizer):
    filler = len(" " + ev.PASSKEY_FILLER)
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        prompt = ev.passkey_prompt(tokenizer, 2000, key=4321, depth=depth)
        text = tokenizer.decode(list(prompt.ids))
        assert len(prompt.ids) <= 2000 and len(prompt.ids) > 2000 - filler
        assert prompt.fillers_before == round(depth * prompt.fillers)
        assert text.startswith(ev.PASSKEY_TASK) and text.endswith(" " + ev.PASSKEY_QUESTION)
        after = tokenizer.decode(list(prompt.ids[prompt.key_position:]))
        assert after.startswith(" The pass key is 4321. Remember it. 4321 is the pass key.")
        before = tokenizer.decode(list(prompt.ids[:prompt.key_position]))
        assert before.count("There and back again.") == prompt.fillers_before
        assert text.count("There and back again.") == prompt.fillers


def test_passkey_prompt_too_short_and_bad_depth(tokenizer):
    with pytest.raises(ev.EvalError, match="too short"):
        ev.passkey_prompt(tokenizer, 100, key=1, depth=0.5)
    with pytest.raises(ev.EvalError, match="depth"):
        ev.passkey_prompt(tokenizer, 2000, key=1, depth=1.5)


@pytest.mark.parametrize("text, expected", [
    (" 12345. Remember it", 12345), ("The pass key is 007", 7), ("no digits here", None),
    (" -42 and 17", 42), ("", None), ("x9y8", 9)])
def test_first_integer(text, expected):
    assert ev.first_integer(text) == expected


def test_passkey_prompts_are_seeded_per_length(tokenizer):
    a = ev.passkey_prompts(tokenizer, 1500, trials=4, seed=7)
    assert a == ev.passkey_prompts(tokenizer, 1500, trials=4, seed=7)
    assert [p.key for p in a] != [p.key for p in ev.passkey_prompts(tokenizer, 1500, trials=4, seed=8)]
    assert all(1 <= p.key <= ev.PASSKEY_MAX_KEY and 0 <= p.depth < 1 for p in a)
    assert len({p.key for p in a}) == 4


def test_every_spec_sees_the_same_prompts(tokenizer):
    model = tiny("llama")
    result = ev.evaluate(model, ["attn: rope(linear, scale=2)", "attn: rope(yarn, scale=2)"], ids=text_ids(100),
                         tokenizer=tokenizer, lengths=[80], passkey=3, passkey_lengths=[600], seed=5, check=False)
    assert result.specs == ["untouched", "attn: rope(linear, scale=2)", "attn: rope(yarn, scale=2)"]
    trials = {spec: [(t.key, t.depth, t.tokens) for t in result.row(spec, 600).passkey] for spec in result.specs}
    assert len(trials["untouched"]) == 3
    assert trials["untouched"] == trials["attn: rope(linear, scale=2)"] == trials["attn: rope(yarn, scale=2)"]
    expected = [(p.key, p.depth, len(p.ids)) for p in ev.passkey_prompts(tokenizer, 600, 3, seed=5)]
    assert trials["untouched"] == expected
    # The specs change the model past L = 64: perplexities differ from the untouched model's.
    ppl = {spec: result.row(spec, 80).loss.ppl_past for spec in result.specs}
    assert len(set(ppl.values())) == 3


def test_evaluate_leaves_the_model_untouched_and_matches_a_direct_run():
    model = tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = text_ids(120, seed=2)
    result = ev.evaluate(model, ["attn: rope(ntk, scale=2)"], ids=ids, lengths=[90, 30])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.rotary_emb).__name__ == "Qwen2RotaryEmbedding"
    assert result.lengths == [30, 90]
    assert math.log(result.row("untouched", 90).loss.ppl) == pytest.approx(
        per_target_nll(model, ids[:90]).mean().item(), abs=1e-5)
    data = result.to_dict()
    assert [(r["spec"], r["length"]) for r in data["results"]] == [
        ("untouched", 30), ("untouched", 90), ("attn: rope(ntk, scale=2)", 30), ("attn: rope(ntk, scale=2)", 90)]
    assert data["results"][1]["targets_past_L"] == 90 - 64
    # Without the untouched model: the same spec's figures, no untouched row.
    alone = ev.evaluate(model, ["attn: rope(ntk, scale=2)"], ids=ids, lengths=[90, 30], untouched=False)
    assert alone.specs == ["attn: rope(ntk, scale=2)"]
    assert alone.row("attn: rope(ntk, scale=2)", 90).loss.ppl == result.row("attn: rope(ntk, scale=2)", 90).loss.ppl


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[1]), "at least 2"),
    (dict(lengths=[500]), "beyond the text"),
    (dict(lengths=[10], passkey=-1), "number of trials"),
    (dict(lengths=[10], passkey=1), "needs a tokenizer"),
    (dict(lengths=[10], untouched=False), "nothing to evaluate"),
])
def test_user_errors(kwargs, message):
    with pytest.raises(SurgeryError, match=message) as info:
        ev.evaluate(tiny("llama"), ids=text_ids(100), **kwargs)
    assert info.value.exit_code == 2


def test_text_errors(tmp_path):
    with pytest.raises(ev.EvalError, match="no text file"):
        ev.read_text(tmp_path / "missing.txt")
    with pytest.raises(ev.EvalError, match="directory"):
        ev.read_text(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(ev.EvalError, match="not UTF-8"):
        ev.read_text(tmp_path / "bad.txt")
    with pytest.raises(ModelError, match="tokenizer"):
        ev.load_tokenizer(tmp_path)


def test_default_text_is_every_pydoc_topic_sorted():
    from pydoc_data.topics import topics

    text = ev.default_text()
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    assert len(text) == sum(map(len, topics.values())) + 2 * (len(topics) - 1)


def test_plot_png_and_html(tmp_path, tokenizer):
    result = ev.evaluate(tiny("llama"), ["attn: rope(linear, scale=2)"], ids=text_ids(100), tokenizer=tokenizer,
                         lengths=[40, 80], passkey=1, passkey_lengths=[400], check=False)
    png = result.plot(tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = result.plot(tmp_path / "p.html").read_text()
    assert "data:image/png;base64," in page and "rope(linear, scale=2)" in page and "<script" not in page



@pytest.mark.parametrize(("lengths", "passkey", "titles"), [
    ([40, 80], 1, ["perplexity vs length", "passkey retrieval vs length"]),
    ([], 1, ["passkey retrieval vs length"]),     # a passkey-only run: no empty perplexity panel
    ([40], 0, ["perplexity vs length"]),
])
def test_plot_draws_the_panels_with_points(tokenizer, lengths, passkey, titles):
    import warnings

    result = ev.evaluate(tiny("llama"), ["attn: rope(linear, scale=2)"], ids=text_ids(100), tokenizer=tokenizer,
                         lengths=lengths, passkey=passkey, passkey_lengths=[400], check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing to label
        fig, plt = result._figure()
    try:
        assert [ax.get_title() for ax in fig.axes] == titles
        assert all(len(ax.lines) == 3 for ax in fig.axes)  # untouched + the spec + the trained-length line
        assert fig.axes[0].get_legend() is not None
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_smollm2_tokenizer_path(smollm2_dir):
    from surgery.models import load_model

    tokenizer = ev.load_tokenizer(smollm2_dir)
    ids = ev.tokenize(tokenizer, ev.default_text())
    assert ids.numel() > 16384  # the default text covers the 16k protocol
    model = load_model(smollm2_dir)
    result = ev.evaluate(model, ids=ids, tokenizer=tokenizer, lengths=[256], passkey=1, passkey_lengths=[512],
                         trained_length=128)
    row = result.row("untouched", 256)
    assert (row.loss.count_first, row.loss.count_past) == (127, 128)
    assert math.log(row.loss.ppl) == pytest.approx(per_target_nll(model, ids[:256]).mean().item(), abs=1e-4)
    trial = result.row("untouched", 512).passkey[0]
    assert 400 < trial.tokens <= 512
    # Byte-level BPE: the prompt assembled from pieces is the tokenization of its own text.
    prompt = ev.passkey_prompts(tokenizer, 512, 1, seed=0)[0]
    assert list(prompt.ids) == tokenizer.encode(tokenizer.decode(list(prompt.ids)), add_special_tokens=False)
    assert trial.found == trial.key, trial  # SmolLM2 retrieves a key from a short prompt


def test_partial_results_after_each_spec_and_progress_counts():
    seen, steps = [], []
    result = ev.evaluate(tiny("llama"), ["attn: rope(linear, scale=2)", "attn: rope(ntk, scale=2)"], ids=text_ids(100),
                         lengths=[20, 70], check=False, partial=lambda so_far: seen.append(
                             (list(so_far.specs), [(r.spec, r.length) for r in so_far.rows])),
                         progress=lambda d, done, total: steps.append((done, total)))
    assert [specs for specs, _ in seen] == [result.specs[:1], result.specs[:2], result.specs]
    assert [len(rows) for _, rows in seen] == [2, 4, 6]
    assert steps == [(i, 8) for i in range(9)]  # 2 compiles + 3 specs × 2 lengths, then done


def test_streaming_compares_streamingllm_with_recompute():
    """--stream: token-by-token decoding as each model generates, teacher-forced, against by-hand losses."""
    import surgery

    model = tiny("llama")
    ids = text_ids(60, seed=3)
    specs = ["attn: window(8, sinks=2)", "generate: recompute(8)"]
    result = ev.evaluate(model, specs, ids=ids, lengths=[40], stream=50)
    untouched, window, recompute = (result.row(s, 50).stream for s in ["untouched", *specs])
    # Untouched: the KV cache decodes what one forward computes.
    assert math.log(untouched.ppl) == pytest.approx(per_target_nll(model, ids[:50]).mean().item(), abs=1e-5)
    # StreamingLLM: its cached decoding equals its own full forward (the window's obligation).
    windowed = surgery.compile(tiny("llama"), specs[0]).model
    assert math.log(window.ppl) == pytest.approx(per_target_nll(windowed, ids[:50]).mean().item(), abs=1e-5)
    # Recompute: each target from a fresh forward over the 8 tokens before it.
    with torch.no_grad():
        fresh = [-torch.log_softmax(model(input_ids=ids[max(0, t - 8):t][None]).logits[0, -1].float(), -1)[ids[t]]
                 for t in range(1, 50)]
    assert math.log(recompute.ppl) == pytest.approx(torch.stack(fresh).double().mean().item(), abs=1e-5)
    assert len({round(s.ppl, 3) for s in (untouched, window, recompute)}) == 3  # three different decodings
    assert all(s.count == 49 and s.tokens_per_s > 0 for s in (untouched, window, recompute))
    # A decoding spec changes generation, not the forward: no one-forward perplexity for it.
    assert result.row(specs[1], 40).loss is None and result.row(specs[0], 40).loss is not None
    data = {(r["spec"], r["length"]): r for r in result.to_dict()["results"]}
    assert data[(specs[1], 50)]["stream_ppl"] == pytest.approx(recompute.ppl)
    assert "stream ppl" in str(result.table().columns[2]._cells[2])


def test_passkey_gives_nbce_the_context_apart(tokenizer):
    """NBCE takes the prompt's context apart (generate(question, context=…)); given the whole
    400-token prompt it would refuse it (longer than its chunk), so the trial runs only if eval splits."""
    from transformers import GenerationConfig

    import surgery

    spec = "generate: nbce(chunk=64, beta=0.25)"
    result = ev.evaluate(tiny("llama"), [spec], tokenizer=tokenizer, lengths=[], passkey=1, passkey_lengths=[400],
                         seed=2, check=False)
    trial = result.row(spec, 400).passkey[0]
    prompt = ev.passkey_prompts(tokenizer, 400, 1, seed=2)[0]
    assert prompt.question == len(tokenizer.encode(" " + ev.PASSKEY_QUESTION, add_special_tokens=False))
    ids = torch.tensor([prompt.ids])
    cut = ids.shape[1] - prompt.question
    model = surgery.compile(tiny("llama"), spec).model
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    by_hand = model.generate(ids[:, cut:], context=ids[:, :cut], generation_config=config)
    assert trial.answer == tokenizer.decode(by_hand[0, prompt.question:].tolist(), skip_special_tokens=True)
    assert trial.tokens == len(prompt.ids) > 300  # the whole prompt, context and question
