"""nbce(chunk, beta, pool): naive-Bayes context extension on tiny llama/qwen2/gpt2 and SmolLM2."""

import re

import pytest
import torch

from surgery.anchors.decoding import GenerationError
from surgery.apply import apply_plan
from surgery.errors import SpecErrors
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms import nbce
from surgery.verify import verify

OBLIGATIONS = ["one chunk equals the untouched model (tokens, log-probs)",
               "n identical chunks with beta = 0 equal the untouched model",
               "beta = 0 with mean pooling equals averaging by hand",
               "its beta and pooling equal the formula by hand"]


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


@pytest.mark.parametrize("arch, text", [
    ("llama", "generate: nbce(chunk=8)"),
    ("qwen2", "generate: nbce(5, beta=1.5, pool=mean)"),   # chunks that do not divide the tested context
    ("gpt2", "generate: nbce(chunk=4096, beta=0.25)"),      # absolute positions; a long chunk, tested at 8
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert [m.obligation for m in report.measurements] == OBLIGATIONS


def test_two_chunks_beta_0_mean_is_the_average_of_two_runs():
    model, reference = tiny("llama"), tiny("llama")
    apply_plan(_plan("generate: nbce(chunk=6, beta=0, pool=mean)", model), model)
    question, context = _ids(3, seed=1), _ids(11, seed=2)  # chunks of 6 and 5 tokens: one row padded
    out = model.generate(question, context=context, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    runs = [_log_probs(reference, torch.cat([c, question], 1)) for c in (context[:, :6], context[:, 6:])]
    want = torch.log_softmax((runs[0] + runs[1]) / 2, -1)
    assert (out.logits[0][0] - want).abs().max() < 1e-5
    assert (runs[0] - runs[1]).abs().max() > 1e-2  # the chunks disagree: the average is not either run
    assert int(out.sequences[0, -1]) == int(want.argmax())


def test_entropy_pooling_follows_the_most_certain_chunk_and_beta_sharpens_it():
    model, reference = tiny("qwen2"), tiny("qwen2")
    apply_plan(_plan("generate: nbce(chunk=7, beta=0.5)", model), model)
    question, context = _ids(4, seed=3), _ids(21, seed=4)
    out = model.generate(question, context=context, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    runs = torch.stack([_log_probs(reference, torch.cat([context[:, k:k + 7], question], 1)) for k in (0, 7, 14)])
    entropy = -(runs.exp() * runs).sum(-1)
    alone = _log_probs(reference, question)
    want = torch.log_softmax(1.5 * runs[entropy.argmin()] - 0.5 * alone, -1)
    assert (out.logits[0][0] - want).abs().max() < 1e-5
    assert entropy.max() - entropy.min() > 1e-3  # a real choice among the chunks


@pytest.mark.parametrize("bug, fails", [
    # the correction added instead of subtracted
    ("sign", ["its beta and pooling equal the formula by hand"]),
    # the most uncertain chunk instead of the most certain
    ("max_entropy", ["its beta and pooling equal the formula by hand"]),
    # padding columns attended: rows of shorter chunks see the pad tokens
    ("padding_seen", ["beta = 0 with mean pooling equals averaging by hand",
                      "its beta and pooling equal the formula by hand"]),
])
def test_injected_bugs_trip_named_obligations(monkeypatch, bug, fails):
    combine, batch = nbce.combine, nbce._batch

    def plus(lp, n, beta, pool):
        if n <= 1 or not beta:
            return combine(lp, n, beta, pool)
        return torch.log_softmax((1 + beta) * combine(lp[:n], n, 0.0, pool) + beta * lp[n], -1)

    def max_entropy(lp, n, beta, pool):
        if n <= 1 or pool != "entropy":
            return combine(lp, n, beta, pool)
        worst = lp[:n][(-(lp[:n].exp() * lp[:n]).sum(-1)).argmax()]
        return combine(torch.cat([worst[None], lp[n:]]).repeat_interleave(
            torch.tensor([n] + [1] * (len(lp) - n)), dim=0), n, beta, pool)

    if bug == "sign":
        monkeypatch.setattr(nbce, "combine", plus)
    elif bug == "max_entropy":
        monkeypatch.setattr(nbce, "combine", max_entropy)
    else:
        monkeypatch.setattr(nbce, "_batch", lambda rows: (batch(rows)[0], torch.ones_like(batch(rows)[1])))
    model = tiny("llama")
    report = verify(_plan("generate: nbce(chunk=8, beta=0.25)", model), model)
    assert [m.obligation for m in report.failures] == fails


def test_calls_it_cannot_serve_are_refused():
    model = tiny("llama")
    apply_plan(_plan("generate: nbce(chunk=8)", model), model)
    with pytest.raises(GenerationError, match="one question at a time"):
        model.generate(torch.cat([_ids(3), _ids(3, seed=1)]), context=_ids(20), max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"pass it apart from the question, model.generate\(question_ids, context="):
        model.generate(_ids(9), max_new_tokens=2)
    with pytest.raises(GenerationError, match="one context per call"):
        model.generate(_ids(3), context=torch.cat([_ids(8), _ids(8, seed=1)]), max_new_tokens=2)
    with pytest.raises(GenerationError, match="takes no argument 'contexts'"):
        model.generate(_ids(3), contexts=_ids(8), max_new_tokens=2)
    short = model.generate(_ids(8), max_new_tokens=2, do_sample=False)  # fits one chunk: the untouched model
    assert torch.equal(short, tiny("llama").generate(_ids(8), max_new_tokens=2, do_sample=False))


@pytest.mark.parametrize("text, message", [
    ("generate: nbce(chunk=0)", "nbce() argument 'chunk': Input should be greater than or equal to 1"),
    ("generate: nbce(chunk=8, pool=entropi)", "did you mean 'entropy'"),
    ("generate: nbce(chunk=8, beta=-1.0)", "argument 'beta'"),
])
def test_wrong_arguments_point_into_the_spec(text, message):
    with pytest.raises(SpecErrors, match=re.escape(message)):
        _plan(text, tiny("llama"))


@pytest.mark.slow
def test_smollm2_obligations_and_a_pass_key_four_chunks_away(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.evaluate import PASSKEY_QUESTION, passkey_prompt

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    report = verify(_plan("generate: nbce(chunk=256)", model), model)
    assert report.ok, report.text()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    question = len(tokenizer.encode(" " + PASSKEY_QUESTION, add_special_tokens=False))
    prompt = passkey_prompt(tokenizer, 1024, key=31_415, depth=0.6)
    ids = torch.tensor([prompt.ids])
    apply_plan(_plan("generate: nbce(chunk=256)", model), model)
    out = model.generate(ids[:, -question:], context=ids[:, :-question], max_new_tokens=8, do_sample=False)
    assert "31415" in tokenizer.decode(out[0, question:])
