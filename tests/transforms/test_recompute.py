"""recompute(w): sliding window with re-computation, on tiny llama/mistral/gpt2 and SmolLM2."""

import pytest
import torch

from surgery.apply import apply_plan
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse
from surgery.transforms.recompute import Recompute
from surgery.verify import verify

OBLIGATIONS = ["each step equals the untouched model on the last w tokens",
               "within the window it is the untouched model's generation"]


def _plan(text, model):
    return build_plan(parse(text), model)


def _ids(n, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, text", [
    ("llama", "generate: recompute(6)"),
    ("mistral", "generate: recompute(window=4096)"),   # tested with a window of 8
    ("gpt2", "generate: recompute(5)"),                # absolute positions: each window starts at 0
])
def test_obligations_hold(arch, text):
    model = tiny(arch)
    report = verify(_plan(text, model), model)
    assert report.ok, report.text()
    assert [m.obligation for m in report.measurements] == OBLIGATIONS


def test_each_token_comes_from_the_last_w_tokens_alone():
    model, reference = tiny("gpt2"), tiny("gpt2")
    apply_plan(_plan("generate: recompute(5)", model), model)
    prompt = _ids(9)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    full = reference.generate(prompt, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                              output_logits=True)
    seq = out.sequences[0]
    for t in range(6):
        with torch.no_grad():
            fresh = reference(input_ids=seq[9 + t - 5:9 + t][None]).logits[0, -1]
        assert (out.logits[t][0] - torch.log_softmax(fresh, -1)).abs().max() < 1e-5
    # Not the untouched model on the whole prompt: the window really cut it.
    assert (out.logits[0][0] - torch.log_softmax(full.logits[0][0], -1)).abs().max() > 1e-2


def _buggy(bug):
    """Recompute's strategy with one bug: a window one token too long, positions continuing, padding seen."""

    def next_token_scores(self, p, model, input_ids, attention_mask, extra):
        ids, mask = input_ids, attention_mask
        while True:
            w = p.window + 1 if bug == "off_by_one" else p.window
            window, seen = ids[:, -w:], mask[:, -w:]
            if bug == "padding_seen":
                seen = torch.ones_like(seen)
            position = (seen.cumsum(-1) - 1).clamp(min=0)
            if bug == "positions_continue":
                position = position + (ids.shape[1] - window.shape[1])
            logits = model(input_ids=window, attention_mask=seen, position_ids=position, use_cache=False).logits
            chosen = yield torch.log_softmax(logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, chosen[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)

    return next_token_scores


@pytest.mark.parametrize("bug, arch, fails", [
    ("off_by_one", "llama", OBLIGATIONS[:1]),
    ("padding_seen", "llama", OBLIGATIONS[:1]),
    ("positions_continue", "gpt2", OBLIGATIONS[:1]),   # rotary models are blind to a shift of all positions
])
def test_injected_bugs_trip_named_obligations(monkeypatch, bug, arch, fails):
    monkeypatch.setattr(Recompute, "next_token_scores", _buggy(bug))
    model = tiny(arch)
    report = verify(_plan("generate: recompute(8)", model), model)
    assert [m.obligation for m in report.failures] == fails


@pytest.mark.slow
def test_smollm2_obligations(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    report = verify(_plan("generate: recompute(4096)", model), model)
    assert report.ok, report.text()
