"""The CLI: exit codes 0/1/2, no tracebacks for user errors, MODEL_DIR never written."""

import hashlib
import os
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
