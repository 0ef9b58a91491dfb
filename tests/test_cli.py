"""The CLI: exit codes 0/1/2, no tracebacks for user errors, MODEL_DIR never written."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

from surgery import cli
from surgery.models import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    return path


def tree_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(full.encode())
            h.update(open(full, "rb").read())
            h.update(str(os.stat(full).st_mtime_ns).encode())
    return h.hexdigest()


def run(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


def spec(tmp_path, text, name="s.surg"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_ok_and_syntax_error(tmp_path, capsys, monkeypatch):
    code, out, _ = run(["check", spec(tmp_path, "attn.*: lora(r=4) | ia3\n")], capsys, monkeypatch)
    assert code == 0 and "ok" in out
    bad = spec(tmp_path, "attn.*: lora(r=4\n", "bad.surg")
    code, _, err = run(["check", bad], capsys, monkeypatch)
    assert code == 2
    assert f"{bad}:2:1" in err or f"{bad}:1:" in err
    assert "^" in err and "Traceback" not in err


def test_check_reports_every_argument_error(tmp_path, capsys, monkeypatch):
    path = spec(tmp_path, "attn: lora(rr=4)\nmlp: lora(r=0)\nembed: prompt_tunin(3)\n")
    code, _, err = run(["check", path], capsys, monkeypatch)
    assert code == 2
    assert f"{path}:1:12" in err and "did you mean 'r'" in err
    assert f"{path}:2:11" in err
    assert f"{path}:3:8" in err and "did you mean 'prompt_tuning'" in err


@pytest.mark.parametrize("text, message", [
    ("# nothing yet\n", "the spec has no rules"),
    ("attn.*: lora(r=4) | window(8)\n", "different anchor kinds (linear: lora; attention: window)"),
    ("mlp.down: lora(r=4) + quantize\n", "must come first in a sequence"),
])
def test_check_refuses_what_plan_refuses_without_a_model(tmp_path, model_dir, capsys, monkeypatch, text, message):
    path = spec(tmp_path, text)
    code, _, err = run(["check", path], capsys, monkeypatch)
    assert code == 2 and message in err and "Traceback" not in err
    code, _, plan_err = run(["plan", path, model_dir], capsys, monkeypatch)
    assert code == 2 and message in plan_err


def test_plan_verify_diff_apply(tmp_path, model_dir, capsys, monkeypatch):
    before = tree_hash(model_dir)
    path = spec(tmp_path, "attn.*: lora(r=4)\nmlp.down: lora(r=4) | ia3\n")
    code, out, _ = run(["plan", path, model_dir], capsys, monkeypatch)
    assert code == 0 and "model.layers.0.self_attn.q_proj" in out and "added" in out
    code, out, _ = run(["verify", path, model_dir], capsys, monkeypatch)
    assert code == 0 and "identity at init" in out
    html = tmp_path / "diff.html"
    code, out, _ = run(["diff", path, model_dir, "--html", html], capsys, monkeypatch)
    assert code == 0 and "q_proj" in out and html.read_text().startswith("<!DOCTYPE html>")
    code, out, _ = run(["apply", path, model_dir, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "out" / "surgery.json").exists()
    code, _, err = run(["apply", path, model_dir, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and "already exists" in err
    assert tree_hash(model_dir) == before


def test_plan_shows_gates(tmp_path, model_dir, capsys, monkeypatch):
    path = spec(tmp_path, "attn.v: gate(lora(r=4) | ia3)\nattn.q: lora(r=2)\n")
    code, out, _ = run(["plan", path, model_dir], capsys, monkeypatch)
    assert code == 0
    shown = dict(re.findall(r"^│ (\d+)\s+│ (\S+)", out, re.MULTILINE))  # step → its transform column's start
    assert shown == {"0": "gate(lora(r=4,", "1": "gate(ia3(loss=lm))", "2": "lora(r=2,"}


def test_apply_keeps_the_head_of_a_model_dir_without_architectures(tmp_path, capsys, monkeypatch):
    """The bug: without ``architectures`` the model was loaded as LlamaModel and OUT had no lm_head."""
    import json

    import torch
    from safetensors import safe_open

    import surgery

    original = tiny("llama")
    original.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    code, _, err = run(["apply", spec(tmp_path, "attn.q: lora(r=2)\n"), tmp_path / "model", "-o", tmp_path / "out"],
                       capsys, monkeypatch)
    assert code == 0, err
    with safe_open(str(tmp_path / "out" / "surgery.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), original.lm_head.weight)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # LoRA is the identity at init: the saved model computes the original logits
        assert torch.allclose(surgery.load(tmp_path / "out")(ids).logits, original(ids).logits, atol=1e-6)


def test_failed_obligation_exits_1_and_writes_nothing(tmp_path, model_dir, capsys, monkeypatch):
    from surgery.transforms.lora import LoRA

    monkeypatch.setattr(LoRA, "identity_model", lambda self, p, check: 0.5)
    path = spec(tmp_path, "attn.q: lora(r=2)\n")
    code, out, err = run(["apply", path, model_dir, "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "obligation" in err and not (tmp_path / "out").exists()
    code, out, err = run(["verify", path, model_dir], capsys, monkeypatch)
    assert code == 1 and "NO" in out


@pytest.mark.parametrize("args, message", [
    (["plan", "{spec}", "{missing}"], "is not a model directory"),
    (["plan", "{missing}.surg", "{model}"], "cannot read spec"),
    (["plan", "{nomatch}", "{model}"], "matches nothing"),
    (["bogus"], "No such command"),
    (["apply", "{spec}", "{model}", "-o", "/proc/no/such/dir"], "cannot write /proc/no/such/dir"),
    (["demo", "{spec}", "{model}"], "needs a tokenizer"),  # tiny test models ship no tokenizer
])
def test_user_errors_exit_2_without_traceback(tmp_path, model_dir, capsys, monkeypatch, args, message):
    names = {"spec": spec(tmp_path, "attn.q: lora(r=2)\n"), "missing": tmp_path / "missing",
             "model": model_dir, "nomatch": spec(tmp_path, "attn.z: lora(r=2)\n", "z.surg")}
    code, out, err = run([a.format(**names) for a in args], capsys, monkeypatch)
    assert code == 2 and message in out + err and "Traceback" not in out + err


def test_console_script_shows_no_traceback(tmp_path):
    bad = spec(tmp_path, "attn: lora(r=\n")
    proc = subprocess.run([sys.executable, "-m", "surgery.cli", "check", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{bad}:" in proc.stderr


def test_a_spec_that_is_not_utf8_is_a_spec_error(tmp_path, model_dir, capsys, monkeypatch):
    path = tmp_path / "latin1.surg"
    path.write_bytes("attn.q: lora(r=2)\nmlp.down: ia3  # café\n".encode("latin-1"))
    for command in (["check", path], ["plan", path, model_dir], ["demo", path, model_dir]):
        code, out, err = run(command, capsys, monkeypatch)
        assert code == 2 and "Traceback" not in out + err
        assert f"{path}:2:21" in err and "not UTF-8" in err
    path.write_bytes("\ufeffattn.q: lora(r=2)\n".encode("utf-8"))  # UTF-8 with a byte-order mark is UTF-8
    code, out, _ = run(["check", path], capsys, monkeypatch)
    assert code == 0 and "ok" in out


@pytest.mark.parametrize("literal, column", [("lora(r=9223372036854775808)", 16), ("lora(r=-9223372036854775809)", 16),
                                             ("lora(r=99999999999999999999999999)", 16)])
def test_integers_beyond_64_bits_are_spec_errors(tmp_path, model_dir, capsys, monkeypatch, literal, column):
    """The bug: such an integer reached torch, and the message was a C++ backtrace."""
    path = spec(tmp_path, f"attn.q: {literal}\n")
    code, out, err = run(["plan", path, model_dir], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out + err and "frame #" not in err
    assert f"{path}:1:{column}" in err and "integer out of range" in err


def test_integers_in_selectors_are_bounded_alike(tmp_path, model_dir, capsys, monkeypatch):
    path = spec(tmp_path, "layers[0:99999999999999999999].attn.q: lora(r=2)\n")
    code, _, err = run(["plan", path, model_dir], capsys, monkeypatch)
    assert code == 2 and f"{path}:1:10" in err and "integer out of range" in err
    path = spec(tmp_path, "layers[0:9223372036854775807].attn.q: lora(r=2)\n", "edge.surg")
    code, out, _ = run(["plan", path, model_dir], capsys, monkeypatch)  # the largest 64-bit integer is fine
    assert code == 0 and "model.layers.1.self_attn.q_proj" in out


def refuse_loading(monkeypatch):
    """Make loading a model fail loudly: a check that should come first did not."""
    import surgery.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(surgery.models, "load_model", load_model)


@pytest.mark.parametrize("command", ["verify", "apply"])
@pytest.mark.parametrize("seed", [2**32, 2**64, -1])
def test_seeds_out_of_range_are_refused_before_loading(tmp_path, model_dir, capsys, monkeypatch, command, seed):
    refuse_loading(monkeypatch)
    args = [command, spec(tmp_path, "attn.q: lora(r=2)\n"), model_dir, "--seed", seed]
    code, out, err = run(args + (["-o", tmp_path / "out"] if command == "apply" else []), capsys, monkeypatch)
    assert code == 2 and "--seed" in out + err and "Traceback" not in out + err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, message", [("{tmp}/no/such/dir/diff.html", "no directory"),
                                             ("{tmp}", "it is a directory"),
                                             ("{tmp}/file/diff.html", "is not a directory")])
def test_diff_html_to_an_unwritable_path_is_refused_before_the_work(tmp_path, model_dir, capsys, monkeypatch,
                                                                     target, message):
    """The bug: the HTML page was opened only after applying and capturing graphs, then a traceback."""
    (tmp_path / "file").write_text("")
    refuse_loading(monkeypatch)
    html = target.format(tmp=tmp_path)
    code, out, err = run(["diff", spec(tmp_path, "attn.q: lora(r=2)\n"), model_dir, "--html", html], capsys, monkeypatch)
    assert code == 2 and f"cannot write {html}: " in err and message in err and "Traceback" not in out + err


def test_an_unwritable_cache_is_refused_before_dequantising(tmp_path, capsys, monkeypatch):
    """The bug: SmolLM2 was de-quantised (~30 s) before the cache directory was found unwritable."""
    import transformers

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "file" / "cache"))

    def dequantise(*args, **kwargs):
        raise AssertionError("de-quantising started before the cache was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", dequantise)
    code, out, err = run(["plan", spec(tmp_path, "attn.q: lora(r=2)\n"), "smollm2"], capsys, monkeypatch)
    assert code == 2 and f"cannot write the model cache {tmp_path / 'file' / 'cache'}" in err
    assert "SURGERY_CACHE" in err and "Traceback" not in out + err


def test_a_local_directory_named_smollm2_wins_over_the_built_in_model(tmp_path, model_dir, capsys, monkeypatch):
    import shutil

    import surgery.models

    def built_in():
        raise AssertionError("the built-in model shadowed ./smollm2")

    monkeypatch.setattr(surgery.models, "smollm2_dir", built_in)
    shutil.copytree(model_dir, tmp_path / "smollm2")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["plan", spec(tmp_path, "attn.q: lora(r=2)\n"), "smollm2"], capsys, monkeypatch)
    # The tiny model: 2 layers of 64 wide (SmolLM2 has 30 of 576).
    assert code == 0 and "model.layers.1.self_attn.q_proj" in out and "model.layers.2." not in out
    code, out, _ = run(["plan", "--help"], capsys, monkeypatch)
    assert "exists wins" in out


@pytest.mark.parametrize("output", ["{model}", "{model}/sub", "{model}/a/b", "{link}/sub", "{model}/../{name}/x"])
def test_an_output_inside_the_model_directory_is_refused(tmp_path, model_dir, capsys, monkeypatch, output):
    """The bug: `-o MODEL_DIR/sub` was accepted, so the model directory was written."""
    refuse_loading(monkeypatch)
    before = tree_hash(model_dir)
    (tmp_path / "link").symlink_to(model_dir)
    target = output.format(model=model_dir, link=tmp_path / "link", name=model_dir.name)
    code, out, err = run(["apply", spec(tmp_path, "attn.q: lora(r=2)\n"), model_dir, "-o", target], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out + err
    assert "inside the model directory" in err or "already exists" in err
    assert tree_hash(model_dir) == before


# ------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama-tok")
    tiny("llama").save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def test_eval_writes_table_json_and_plot(model_with_tokenizer, tmp_path, capsys, monkeypatch):
    import json

    text = tmp_path / "t.txt"
    text.write_text("All happy families are alike; each unhappy family is unhappy in its own way. " * 3)
    s = spec(tmp_path, "attn.*: rope(yarn, scale=2)\n")
    before = tree_hash(model_with_tokenizer)
    code, out, err = run(["eval", s, model_with_tokenizer, "--text", text, "--lengths", "48,96", "--passkey", "2",
                          "--passkey-lengths", "400", "--json", tmp_path / "r.json", "--plot", tmp_path / "r.html"],
                         capsys, monkeypatch)
    assert code == 0, err
    assert "untouched" in out and "rope(yarn, scale=2)" in out and "passkey" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["trained_length"] == 64 and data["specs"][1] == "attn.*: rope(yarn, scale=2)"
    rows = {(r["spec"], r["length"]): r for r in data["results"]}
    assert rows[("untouched", 96)]["targets_past_L"] == 32 and rows[("untouched", 48)]["ppl_past_L"] is None
    assert len(rows[("attn.*: rope(yarn, scale=2)", 400)]["passkey"]) == 2
    assert "data:image/png" in (tmp_path / "r.html").read_text()
    assert tree_hash(model_with_tokenizer) == before


@pytest.mark.parametrize("args, message", [
    (["--text", "missing.txt"], "no text file"),
    (["--lengths", "10,1"], "at least 2"),
    (["--lengths", "4096"], "beyond the text"),
    (["--lengths", "8k"], "comma-separated"),
    (["--plot", "p.svg"], ".png or .html"),
])
def test_eval_user_errors_exit_2(model_with_tokenizer, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("short text " * 20)
    extra = [] if "--text" in args else ["--text", "t.txt"]
    code, _, err = run(["eval", model_with_tokenizer, *extra, *args], capsys, monkeypatch)
    assert code == 2 and message in err and "Traceback" not in err


def test_eval_needs_a_tokenizer(model_dir, capsys, monkeypatch):
    code, _, err = run(["eval", model_dir, "--lengths", "16"], capsys, monkeypatch)
    assert code == 2 and "tokenizer" in err and "Traceback" not in err
    code, _, err = run(["eval"], capsys, monkeypatch)
    assert code == 2 and "MODEL_DIR" in err
