"""Every runnable example and every spec in specs/ is exercised."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
from surgery.models import tiny

ROOT = Path(__file__).resolve().parent.parent


def test_finetune_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_lora.py"), "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the adapters train
    assert "reload bit-exact: True" in proc.stdout


@pytest.mark.parametrize("example", ["train_loop.py", "train_trainer.py"])
def test_training_examples_run_restarts_and_reload(example):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--steps", "10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(losses) == 10 and losses[-1] < losses[0]
    # Restarts after steps 3 and 7 (restart_every=4), recorded in the state that is saved.
    assert "schedule state: {'step': 10, 'steps': {'0': {'restarts': 2, 'last_restart': 7}}}" in proc.stdout
    assert "reload bit-exact: True" in proc.stdout


# specs/ on the architectures they are meant for (bitfit needs biases: llama has none).
SPEC_ARCH = {"bitfit.surg": "qwen2"}


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.surg")), ids=lambda p: p.name)
def test_every_spec_compiles_and_verifies(path):
    model = tiny(SPEC_ARCH.get(path.name, "llama"))
    result = surgery.compile(model, path)
    assert result.report.ok, result.report.text()
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 20))).logits
    assert torch.isfinite(out).all()


def test_readme_tour_is_a_spec_that_verifies():
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("```surg\n", 1)[1].split("```", 1)[0]
    model = tiny("llama")
    result = surgery.compile(model, tour)
    assert result.report.ok, result.report.text()
    assert [s.transform for s in result.plan.steps] == [
        "rope", "window", "logn", "alibi", "s2attn", "lora", "lora", "ia3", "quantize", "lora", "prompt_tuning",
        "adapter", "adapter_drop", "prefix_tuning", "lora", "nbce"]
