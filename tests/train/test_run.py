"""`surgery train`: a tiny model learns a repetitive text, saves like `apply`, and resumes bit-exactly."""

import json
import shutil
import sys

import pytest
import torch

import surgery
from surgery import cli
from surgery.models import tiny

TEXT = "the cat sat on the mat. " * 120


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def run(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err


def spec(tmp_path, text):
    path = tmp_path / "s.surg"
    path.write_text(text)
    return path


def losses(out, kind="loss"):
    marker = "held-out loss" if kind == "eval" else "  loss"
    return [float(line.split(marker)[1].split()[0]) for line in out.splitlines()
            if line.startswith("eval" if kind == "eval" else "step ") and marker in line]


def test_train_lowers_the_loss_and_saves_a_result_that_loads(tmp_path, model_dir, data, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    code, out, err = run(["train", spec(tmp_path, "attn.*, mlp.*: lora(r=4, alpha=8)\n"), model_dir, "--data", data,
                          "-o", out_dir, "--steps", 20, "--batch-size", 4, "--seq-len", 24, "--lr", 3e-2,
                          "--eval-every", 10, "--log-every", 1], capsys, monkeypatch)
    assert code == 0, err
    train, held = losses(out), losses(out, "eval")
    assert len(train) == 20 and len(held) == 2
    assert train[-1] < train[0] - 0.5 and held[-1] < held[0]
    assert "obligations" in out
    model = surgery.load(out_dir)
    manifest = json.loads((out_dir / "surgery.json").read_text())
    assert manifest["peft"] == "written"  # the usual output: verified, saved, exported
    assert "schedules" not in manifest  # lora schedules nothing
    assert (tmp_path / "out.checkpoints" / "checkpoint-20").is_dir()
    ids = torch.tensor([[ord(c) for c in TEXT[:48]]])
    with torch.no_grad():
        trained, base = model(ids, labels=ids).loss.item(), tiny("llama")(ids, labels=ids).loss.item()
    assert trained < base - 0.5  # what was saved is the trained model


@pytest.mark.parametrize("rule", ["relora(r=2, restart_every=2, warmup=1)",
                                  "adalora(4, 2, total_step=6, tinit=1, tfinal=2)"])
def test_a_resumed_run_equals_an_uninterrupted_one(rule, tmp_path, model_dir, data, capsys, monkeypatch):
    """Checkpoint 3 holds ReLoRA's restart count, and AdaLoRA's importance statistics (tensors), which
    the mask fixed at step 4 depends on."""
    surg = spec(tmp_path, f"attn.q, attn.v: {rule}\n")
    common = [surg, model_dir, "--data", data, "--steps", 6, "--batch-size", 2, "--seq-len", 16, "--lr", 1e-2,
              "--eval-every", 3, "--log-every", 1]
    code, full, err = run(["train", *common, "-o", tmp_path / "a"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run(["train", *common, "-o", tmp_path / "b", "--checkpoints", tmp_path / "a.checkpoints",
                        "--resume"], capsys, monkeypatch)
    assert code == 2 and "already reached --steps 6" in err
    shutil.rmtree(tmp_path / "a.checkpoints" / "checkpoint-6")  # as if stopped after step 3's checkpoint
    code, resumed, err = run(["train", *common, "-o", tmp_path / "b", "--checkpoints", tmp_path / "a.checkpoints",
                              "--resume"], capsys, monkeypatch)
    assert code == 0, err
    assert "resuming from" in resumed and "checkpoint-3" in resumed
    assert losses(resumed) == losses(full)[3:]
    a, b = surgery.load(tmp_path / "a"), surgery.load(tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    schedules = [json.loads((tmp_path / d / "surgery.json").read_text())["schedules"] for d in "ab"]
    assert schedules[0] == schedules[1]
    if rule.startswith("relora"):
        assert schedules[0] == {"step": 6, "steps": {"0": {"restarts": 3, "last_restart": 5}}}
    else:
        assert (tmp_path / "a.checkpoints" / "checkpoint-3" / "surgery_schedules.safetensors").is_file()
        assert sum(not keep for layer in schedules[0]["steps"]["0"]["pattern"] for keep in layer) == 8


def test_user_errors_exit_2_with_a_message(tmp_path, model_dir, data, capsys, monkeypatch):
    surg = spec(tmp_path, "attn.q: lora(r=2)\n")
    code, _, err = run(["train", surg, model_dir, "--data", data, "-o", tmp_path / "o", "--optim", "paged_adamw_8bit"],
                       capsys, monkeypatch)
    assert code == 2 and "runs on CUDA" in err and "--optim adamw_torch" in err and "Traceback" not in err
    code, _, err = run(["train", surg, model_dir, "--data", data, "-o", tmp_path / "o", "--optim", "adamw_trch"],
                       capsys, monkeypatch)
    assert code == 2 and "did you mean 'adamw_torch'" in err
    code, _, err = run(["train", surg, model_dir, "--data", data, "-o", tmp_path / "o", "--schedule", "cosin"],
                       capsys, monkeypatch)
    assert code == 2 and "unknown learning-rate schedule 'cosin'" in err and "Traceback" not in err
    code, _, err = run(["train", surg, model_dir, "--data", tmp_path / "none.txt", "-o", tmp_path / "o"],
                       capsys, monkeypatch)
    assert code == 2 and "no such file" in err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run(["train", surg, model_dir, "--data", short, "-o", tmp_path / "o", "--seq-len", 8],
                       capsys, monkeypatch)
    assert code == 2 and "gives 1 block(s)" in err
    code, _, err = run(["train", surg, model_dir, "--data", data, "-o", tmp_path / "o", "--resume"],
                       capsys, monkeypatch)
    assert code == 2 and "no checkpoint" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, model_dir, data):
    """Data-parallel on CPU (gloo): 2 processes × batch 2 in order see what 1 process × batch 4 sees."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    surg = spec(tmp_path, "attn.*: relora(r=4, restart_every=2)\n")
    args = ["-m", "surgery.cli", "train", str(surg), str(model_dir), "--data", str(data), "--steps", "4",
            "--seq-len", "16", "--lr", "1e-2", "--log-every", "1", "--eval-every", "2", "--no-shuffle"]
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = {}
    for name, launch in {"two": [str(torchrun), "--nproc-per-node", "2", "--master-port", "29531"],
                         "one": [sys.executable]}.items():
        batch = "2" if name == "two" else "4"
        proc = subprocess.run([*launch, *args, "--batch-size", batch, "-o", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = proc.stdout
    assert len(losses(runs["one"])) == 4
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), abs=2e-4)
    assert losses(runs["two"], "eval") == pytest.approx(losses(runs["one"], "eval"), abs=2e-4)
    one, two = surgery.load(tmp_path / "one"), surgery.load(tmp_path / "two")
    for (name, x), y in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_trains_like_keeping_activations(tmp_path, model_dir, data, capsys, monkeypatch):
    """--activation-checkpointing recomputes in the backward what it did not keep: the same losses;
    --eval-on-start adds the held-out loss before the first step."""
    rule = spec(tmp_path, "attn.q, attn.v: lora(r=4, alpha=8); embed, norm.*: unfreeze\n")
    curves = []
    for name, flags in (("kept", []), ("recomputed", ["--activation-checkpointing"])):
        code, out, err = run(["train", rule, model_dir, "--data", data, "-o", tmp_path / name, "--steps", 6,
                              "--batch-size", 2, "--seq-len", 24, "--lr", 3e-2, "--eval-every", 3, "--log-every", 1,
                              "--eval-on-start", "--no-shuffle", *flags], capsys, monkeypatch)
        assert code == 0, err
        curves.append((losses(out), losses(out, "eval")))
    (train, held), (train_ckpt, held_ckpt) = curves
    assert len(train) == 6 and len(held) == 3 and held[-1] < held[0]
    assert train_ckpt == pytest.approx(train, rel=1e-5) and held_ckpt == pytest.approx(held, rel=1e-5)


def test_options_reach_the_trainer(tmp_path):
    from surgery.train.run import Options, arguments

    args = arguments(tmp_path, Options(checkpointing=True, eval_on_start=True))
    assert args.activation_checkpointing is True and args.eval_on_start is True
    args = arguments(tmp_path, Options())
    assert not args.activation_checkpointing and args.eval_on_start is False
