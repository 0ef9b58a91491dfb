"""Installing programs: registered on first install (not at import), switched and restored through
set_attn_implementation, per-call state that threads do not share, unprogrammed layers unchanged."""

import subprocess
import sys
import threading

import torch

from surgery.apply import apply_plan
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse


def _plan(text, model):
    return build_plan(parse(text), model)


def test_registered_on_first_install_not_at_import():
    code = ("import surgery, surgery.attention, surgery.transforms.window\n"
            "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A\n"
            "print('surgery' in A.valid_keys())\n"
            "from surgery.models import tiny\n"
            "m = tiny('llama'); surgery.compile(m, 'attn: window(8)', check=False)\n"
            "print('surgery' in A.valid_keys(), m.config._attn_implementation)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "surgery"]


def test_rollback_switches_back_through_the_public_api():
    model = tiny("llama", attn_implementation="eager")
    edit = apply_plan(_plan("attn: window(8)", model), model)
    assert model.config._attn_implementation == "surgery"
    edit.rollback()
    assert model.config._attn_implementation == "eager"


def test_layers_without_a_program_are_plain_attention():
    model, untouched = tiny("qwen2"), tiny("qwen2")
    apply_plan(_plan("layers[0].attn: window(4)", model), model)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Only layer 0 is windowed: run layer 1 of both models on the same input.
        x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(1))
        pos = torch.arange(20)[None]
        pe = untouched.model.rotary_emb(x, pos)
        got = model.model.layers[1].self_attn(x, position_embeddings=pe, attention_mask=None)[0]
        want = untouched.model.layers[1].self_attn(x, position_embeddings=pe, attention_mask=None)[0]
        assert (got - want).abs().max() < 1e-6
        assert (model(input_ids=ids).logits - untouched(input_ids=ids).logits).abs().max() > 1e-3  # layer 0 differs


def test_threads_sharing_a_model_get_the_serial_outputs():
    model = tiny("llama")
    apply_plan(_plan("attn: window(8, sinks=2)", model), model)
    prompts = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 14, 21)]

    def run(ids):
        return model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True)

    serial = [run(p) for p in prompts]
    results, errors = [None] * 4, []

    def worker(k):
        try:
            for _ in range(3):
                results[k] = run(prompts[k])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, serial):
        assert torch.equal(got.sequences, want.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)) < 1e-5
