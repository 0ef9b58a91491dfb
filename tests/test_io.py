"""Saving: atomic output (also when interrupted), bit-exact reload with dtypes, a verified manifest, --merge to
plain transformers, PEFT's adapter format."""

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import surgery
from surgery.models import tiny


def ids(seed=0, n=12):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def perturb(model):
    """Move adapters away from their identity init so saving/merging is actually tested."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch, spec", [
    ("llama", "attn.*: lora(r=4); mlp.down: lora(r=8, alpha=16) | ia3"),
    ("gpt2", "attn.*, mlp.*: lora(r=4)"),
    ("llama", "mlp.*: quantize(nf4) + lora(r=4)"),
    ("llama", "attn.*: rope(ntk_dynamic, scale=2) + window(8, sinks=2); embed: prompt_tuning(3)"),
])
def test_load_reproduces_the_surgered_model_bit_exactly(tmp_path, arch, spec):
    model = tiny(arch)
    result = surgery.compile(model, spec)
    perturb(model)
    out = result.save(tmp_path / "out")
    assert {"surgery.json", "spec.surg", "report.json", "surgery.safetensors", "base_config.json"} <= set(os.listdir(out))
    loaded = surgery.load(out)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_merge_writes_a_plain_transformers_model(tmp_path):
    model = tiny("llama")
    result = surgery.compile(model, "attn.*: lora(r=4) + ia3; mlp.*: lora(r=2); attn.*: rope(linear, scale=2)")
    perturb(model)
    out = result.save(tmp_path / "merged", merge=True)
    meta = json.loads((out / "surgery.json").read_text())
    assert meta["plain"] and meta["merged_steps"] == [0, 1, 2]
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert plain.config.rope_parameters["rope_type"] == "linear"
    long = ids(n=100)  # longer than max_position_embeddings=64, where the rope scaling matters
    assert (logits(plain, long) - logits(model, long)).abs().max() < 1e-4


def test_merge_keeps_unmergeable_steps_in_surgery_format(tmp_path):
    model = tiny("llama")
    result = surgery.compile(model, "attn.*: lora(r=4); attn: window(8)")
    perturb(model)
    out = result.save(tmp_path / "partly", merge=True)
    meta = json.loads((out / "surgery.json").read_text())
    assert not meta["plain"] and meta["merged_steps"] == [0]
    loaded = surgery.load(out)
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (logits(loaded, ids(n=30)) - logits(model, ids(n=30))).abs().max() < 1e-4


@pytest.mark.parametrize("arch, spec, targets", [
    ("llama", "attn.*, mlp.*: lora(r=4, alpha=8)", 14),
    ("gpt2", "attn.*, mlp.*: lora(r=4, alpha=8)", 8),
    ("llama", "attn.*: lora(r=4); mlp.down: lora(r=8, alpha=32)", 10),  # per-module rank and alpha
])
def test_lora_is_written_in_peft_format(tmp_path, arch, spec, targets):
    import peft
    model = tiny(arch)
    result = surgery.compile(model, spec)
    perturb(model)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == targets
    reloaded = peft.PeftModel.from_pretrained(tiny(arch), out / "peft").eval()
    assert (logits(reloaded, ids()) - logits(model, ids())).abs().max() < 1e-5


@pytest.mark.parametrize("spec, reason", [
    ("attn.*: lora(r=4) | ia3", "PEFT holds one adapter type per adapter"),
    ("attn.q: lora(r=4); attn.v: lora(r=4, dropout=0.1)", "differ in 'lora_dropout'"),
])
def test_peft_export_is_skipped_with_a_reason_when_not_representable(tmp_path, spec, reason):
    model = tiny("llama")
    out = surgery.compile(model, spec).save(tmp_path / "out")
    meta = json.loads((out / "surgery.json").read_text())
    assert not (out / "peft").exists()
    assert meta["peft"].startswith("not written:") and reason in meta["peft"]


def test_existing_output_is_refused_and_untouched(tmp_path):
    model = tiny("llama")
    result = surgery.compile(model, "attn.q: lora(r=2)")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(surgery.SaveError, match="already exists"):
        result.save(tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny("llama")
    result = surgery.compile(model, "attn.q: lora(r=2); attn: window(8)")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(surgery.SaveError, match="disk full"):
        result.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_load_refuses_a_directory_that_is_not_a_surgery_output(tmp_path):
    with pytest.raises(surgery.SaveError, match="not a surgery output"):
        surgery.load(tmp_path)


@pytest.mark.parametrize("spec, peft_type", [
    ("attn.*: ia3; mlp.*: ia3", "IA3"),
    ("embed: prompt_tuning(4)", "PROMPT_TUNING"),
    ("mlp.*: quantize(nf4) + lora(r=4)", "LORA"),  # QLoRA: the adapter is PEFT's; the base is loaded 4-bit
])
def test_other_adapters_are_written_in_peft_format(tmp_path, spec, peft_type):
    import peft
    model = tiny("llama")
    result = surgery.compile(model, spec)
    perturb(model)
    out = result.save(tmp_path / "out")
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    if peft_type == "LORA":
        return  # loading onto a 4-bit base is bitsandbytes' job; the keys are checked below
    reloaded = peft.PeftModel.from_pretrained(tiny("llama"), out / "peft").eval()
    theirs = logits(reloaded, ids())
    ours = logits(model, ids())
    if peft_type == "PROMPT_TUNING":
        theirs = theirs[:, 4:]  # PEFT's logits include the virtual positions
    assert (theirs - ours).abs().max() < 1e-5


def test_qlora_peft_keys_match_peft_names(tmp_path):
    import safetensors.torch

    model = tiny("llama")
    out = surgery.compile(model, "mlp.down: quantize(nf4) + lora(r=4)").save(tmp_path / "out")
    keys = sorted(safetensors.torch.load_file(out / "peft" / "adapter_model.safetensors"))
    assert keys == [f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{ab}.weight"
                    for i in range(2) for ab in "AB"]


def _forge(out, spec):
    """Change the spec and re-seal the manifest consistently: what only a deliberate edit would do."""
    from surgery.io import _digest, _sha256

    meta = json.loads((out / "surgery.json").read_text())
    meta["spec"] = spec
    (out / "spec.surg").write_text(spec)
    meta["files"]["spec.surg"] = {"sha256": _sha256(out / "spec.surg"), "bytes": (out / "spec.surg").stat().st_size}
    meta["digest"] = _digest(meta)
    (out / "surgery.json").write_text(json.dumps(meta))


def test_load_refuses_weights_that_do_not_match_the_plan(tmp_path):
    model = tiny("llama")
    out = surgery.compile(model, "attn.q: lora(r=2)").save(tmp_path / "out")
    _forge(out, "attn.k: lora(r=2)")  # a plan the saved tensors were not made for
    with pytest.raises(surgery.SaveError, match="does not match its plan: missing .*k_proj"):
        surgery.load(out)


@pytest.mark.parametrize("arch, spec", [
    ("llama", "attn.*: rope(yarn, scale=4)"),
    ("qwen2", "attn.*: rope(ntk, scale=2); model: bitfit"),
])
def test_steps_transformers_can_express_are_saved_as_a_plain_model(tmp_path, arch, spec):
    model = tiny(arch)
    result = surgery.compile(model, spec)
    perturb(model)  # bitfit's biases move
    out = result.save(tmp_path / "out")
    assert json.loads((out / "surgery.json").read_text())["plain"]
    assert not (out / "surgery.safetensors").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    long = ids(n=100)
    assert (logits(plain, long) - logits(model, long)).abs().max() < 1e-4
    assert torch.equal(logits(surgery.load(out), long), logits(plain, long))


def test_output_gets_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = surgery.compile(tiny("llama"), "attn.q: lora(r=2)").save(tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()} == {"0o644"}


# A child process that saves slowly: it writes the tensors, says so, then waits inside the save (in
# Python, between bytecodes, where signal handlers run) until the test signals it.
SLOW_SAVE = """
import pathlib, sys, time
import safetensors.torch, torch
torch.set_num_threads(1)
import surgery
from surgery.models import tiny

out, ready = sys.argv[1:3]
real = safetensors.torch.save_model

def slow(*args, **kwargs):
    real(*args, **kwargs)
    pathlib.Path(ready).touch()
    while True:
        time.sleep(0.05)

safetensors.torch.save_model = slow
result = surgery.compile(tiny("llama"), "attn.q: lora(r=2); attn: window(8)", check=False)
try:
    result.save(out)
except KeyboardInterrupt:
    sys.exit(130)  # Ctrl-C came through as itself (not a SaveError)
"""


def _partials(parent, name="out"):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.partial-"))


def test_signals_during_save_clean_up_and_a_killed_save_is_cleaned_by_the_next(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        parent = tmp_path / sig.name
        parent.mkdir()
        child = subprocess.Popen([sys.executable, str(script), str(parent / "out"), str(parent / "ready")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        runs[sig] = (parent, child)
    deadline = time.monotonic() + 300
    for sig, (parent, child) in runs.items():
        while not (parent / "ready").exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never reached the slow save"
            time.sleep(0.05)
        assert len(_partials(parent)) == 1  # mid-save: the temporary exists
        child.send_signal(sig)
    for sig, (parent, child) in runs.items():
        output = child.communicate(timeout=60)[0].decode()
        assert child.returncode == {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM,
                                    signal.SIGKILL: -signal.SIGKILL}[sig], output
        assert not (parent / "out").exists()
    assert _partials(tmp_path / "SIGINT") == [] and _partials(tmp_path / "SIGTERM") == []

    # SIGKILL cannot be caught: the temporary stays until the next save into that directory, which
    # removes it because its process is gone, and leaves a live process's and another host's alone.
    parent = tmp_path / "SIGKILL"
    [stale] = _partials(parent)
    pid, boot, host = stale.split("partial-")[1].split("-")[:3]
    live = parent / f".out.partial-{os.getpid()}-{boot}-{host}-live"
    elsewhere = parent / f".out.partial-{pid}-{boot}-00000000-other"
    live.mkdir(), elsewhere.mkdir()
    result = surgery.compile(tiny("llama"), "attn.q: lora(r=2)", check=False)
    result.save(parent / "out")
    assert _partials(parent) == sorted([live.name, elsewhere.name])
    assert surgery.load(parent / "out") is not None


def test_a_signal_handled_by_the_caller_still_cleans_up_and_reaches_the_caller(tmp_path, monkeypatch):
    import signal

    import safetensors.torch

    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    real = safetensors.torch.save_model

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.torch, "save_model", interrupted)
    try:
        result = surgery.compile(tiny("llama"), "attn.q: lora(r=2); attn: window(8)", check=False)
        with pytest.raises(surgery.SaveError, match="interrupted by SIGTERM; nothing was written"):
            result.save(tmp_path / "out")
        assert seen == [signal.SIGTERM]  # delivered once, after the cleanup
        assert os.listdir(tmp_path) == []
        handler = signal.getsignal(signal.SIGTERM)
        assert handler is not None and handler.__name__ == "<lambda>"  # the caller's handler is back
        # Ctrl-C in the same place arrives as KeyboardInterrupt, with the temporary gone.
        monkeypatch.setattr(safetensors.torch, "save_model",
                            lambda *a, **k: (real(*a, **k), os.kill(os.getpid(), signal.SIGINT)))
        with pytest.raises(KeyboardInterrupt):
            result.save(tmp_path / "out")
        assert os.listdir(tmp_path) == []
    finally:
        signal.signal(signal.SIGTERM, old)


def test_save_from_another_thread_works_without_signal_handlers(tmp_path):
    import threading

    result = surgery.compile(tiny("llama"), "attn.q: lora(r=2)", check=False)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(result.save(tmp_path / "out")))
    thread.start(), thread.join()
    assert errors == [tmp_path / "out"] and surgery.load(tmp_path / "out") is not None


def _stored_bytes(model):
    """Bytes of the distinct tensors in `model`'s state dict (tied weights once)."""
    seen = {}
    for value in model.state_dict().values():
        seen[(value.untyped_storage().data_ptr(), value.storage_offset())] = value.numel() * value.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_reload_bit_exactly_with_their_dtypes(tmp_path, dtype):
    model = tiny("llama").to(dtype)
    result = surgery.compile(model, "attn.*: lora(r=4); attn: window(8, sinks=2); mlp.up: quantize(nf4) + lora(r=2)")
    model.model.layers[0].self_attn.v_proj.adapter.float()  # an adapter kept in float32 on a low-precision base
    perturb(model)
    out = result.save(tmp_path / "out")
    # The file holds the model as it is in memory: about half the float32 size, not float32.
    size = (out / "surgery.safetensors").stat().st_size
    assert _stored_bytes(model) <= size < _stored_bytes(model) + 50_000
    assert size < 0.6 * _stored_bytes(tiny("llama"))
    loaded = surgery.load(out)
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
    assert loaded.model.layers[0].self_attn.v_proj.adapter.lora_A.weight.dtype == torch.float32
    assert loaded.model.layers[0].self_attn.q_proj.adapter.lora_A.weight.dtype == dtype
    assert torch.equal(logits(loaded, ids(n=20)), logits(model, ids(n=20)))
    assert json.loads((out / "surgery.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_a_low_precision_adapter_is_exported_to_peft_in_its_dtype(tmp_path):
    import safetensors.torch

    model = tiny("llama").to(torch.bfloat16)
    out = surgery.compile(model, "attn.*: lora(r=4)").save(tmp_path / "out")
    tensors = safetensors.torch.load_file(out / "peft" / "adapter_model.safetensors")
    assert len(tensors) == 16 and {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_a_merged_low_precision_model_is_exported_in_its_dtype(tmp_path):
    model = tiny("qwen2").to(torch.bfloat16)
    result = surgery.compile(model, "attn.*, mlp.*: lora(r=4); model: bitfit")
    perturb(model)
    out = result.save(tmp_path / "out", merge=True)
    assert json.loads((out / "surgery.json").read_text())["plain"]
    size = (out / "model.safetensors").stat().st_size
    plain_bytes = _stored_bytes(tiny("qwen2").to(torch.bfloat16))
    assert plain_bytes <= size < plain_bytes + 50_000  # bf16, not float32 (twice the size)
    for layer in (m for m in model.modules() if hasattr(m, "merged_weights")):
        layer.merge()  # the in-memory model now holds the weights the export should hold
    expected = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for loaded in (surgery.load(out), transformers.AutoModelForCausalLM.from_pretrained(out)):
        for key, value in loaded.state_dict().items():
            assert value.dtype == torch.bfloat16 and torch.equal(value, expected[key]), key


# ------------------------------------------------------------------ damaged and edited outputs
# Three saved directories: the surgery format, the surgery format with a PEFT export, and the plain
# (merged) format. Each corruption is applied to a copy; load must refuse it with a SaveError that
# names the file, never raise something else or load a model with other outputs.
OUTPUTS = {
    "surgery": ("attn.*: lora(r=4); attn: window(8)", False,
                ["surgery.json", "spec.surg", "report.json", "base_config.json", "surgery.safetensors"]),
    "peft": ("attn.*: lora(r=4)", False, ["peft/adapter_config.json", "peft/adapter_model.safetensors"]),
    "plain": ("attn.*: lora(r=4); attn: rope(linear, scale=2)", True,
              ["surgery.json", "spec.surg", "report.json", "config.json", "generation_config.json",
               "model.safetensors"]),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    saved = {}
    for kind, (spec, merge, _) in OUTPUTS.items():
        model = tiny("llama")
        result = surgery.compile(model, spec)
        perturb(model)
        saved[kind] = (result.save(tmp_path_factory.mktemp(kind) / "out", merge=merge), model)
    return saved


def _json_edit(fn):
    def corrupt(path):
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data, indent=2))
    return corrupt


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01  # a single bit, past a safetensors header: inside a tensor
    path.write_bytes(bytes(data))


def _replace_with_directory(path):
    path.unlink()
    path.mkdir()


def _relabel_dtype(path):  # the header says F16 where it said F32: same size, other numbers
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"F32"', b'"F16"', 1))


GENERIC = {
    "deleted": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage of the same size": lambda p: p.write_bytes(
        bytes(torch.randint(0, 256, (p.stat().st_size,), generator=torch.Generator().manual_seed(0)).tolist())),
    "one bit flipped": _flip,
    "bytes appended": lambda p: p.write_bytes(p.read_bytes() + b"\n}"),
    "a directory instead": _replace_with_directory,
}


def _del(key):
    return _json_edit(lambda d: d.pop(key))


def _set(key, value):
    return _json_edit(lambda d: d.__setitem__(key, value))


SPECIFIC = [
    ("surgery", "surgery.json", "a JSON list", lambda p: p.write_text("[]")),
    ("surgery", "surgery.json", "not UTF-8", lambda p: p.write_bytes(b"\xff\xfe{" + p.read_bytes())),
    ("surgery", "surgery.json", "unknown format version", _set("format", 99)),
    ("surgery", "surgery.json", "an older format", _set("format", 1)),
    ("surgery", "surgery.json", "format as a string", _set("format", "2")),
    ("surgery", "surgery.json", "seed of the wrong type", _set("seed", "0")),
    ("surgery", "surgery.json", "plain of the wrong type", _set("plain", "yes")),
    ("surgery", "surgery.json", "merged_steps of the wrong type", _set("merged_steps", "0")),
    ("surgery", "surgery.json", "files of the wrong type", _set("files", [])),
    ("surgery", "surgery.json", "spec missing", _del("spec")),
    ("surgery", "surgery.json", "digest missing", _del("digest")),
    ("surgery", "surgery.json", "dtype not a dtype", _set("dtype", "float33")),
    ("surgery", "surgery.json", "spec edited", _set("spec", "attn.*: lora(r=4); attn: window(16)")),
    ("surgery", "surgery.json", "dtype edited", _set("dtype", "float16")),
    ("surgery", "surgery.json", "seed edited", _set("seed", 1)),
    ("surgery", "surgery.json", "a file left out of the manifest", _json_edit(lambda d: d["files"].pop("spec.surg"))),
    ("surgery", "surgery.json", "a hash edited",
     _json_edit(lambda d: d["files"]["surgery.safetensors"].__setitem__("sha256", "0" * 64))),
    ("surgery", "spec.surg", "window(8) edited to window(16)",
     lambda p: p.write_text(p.read_text().replace("window(8)", "window(16)"))),
    ("surgery", "base_config.json", "rope_theta edited",
     _json_edit(lambda d: d["rope_parameters"].__setitem__("rope_theta", 500000.0))),
    ("surgery", "report.json", "a verdict edited", _json_edit(lambda d: d[0].__setitem__("ok", False))),
    ("surgery", "surgery.safetensors", "a dtype relabelled in the header", _relabel_dtype),
    ("peft", "peft/adapter_config.json", "r edited", _json_edit(lambda d: d.__setitem__("r", 8))),
    ("plain", "config.json", "rope_theta edited",
     _json_edit(lambda d: d["rope_parameters"].__setitem__("rope_theta", 500000.0))),
    ("plain", "model.safetensors", "a dtype relabelled in the header", _relabel_dtype),
    ("plain", "surgery.json", "plain flipped to false", _set("plain", False)),
]

CORRUPTIONS = [(kind, file, how, fn) for kind, (_, _, files) in OUTPUTS.items() for file in files
               for how, fn in GENERIC.items()] + SPECIFIC


@pytest.mark.parametrize("kind, file, how, corrupt", CORRUPTIONS,
                         ids=[f"{kind}:{file}:{how}" for kind, file, how, _ in CORRUPTIONS])
def test_a_damaged_or_edited_output_is_a_save_error_naming_the_file(outputs, tmp_path, kind, file, how, corrupt):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(outputs[kind][0], out)
    corrupt(out / file)
    with pytest.raises(surgery.SaveError) as info:
        surgery.load(out)
    assert file in str(info.value)


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_the_untouched_outputs_still_load_bit_exactly(outputs, kind):
    import safetensors.torch

    out, model = outputs[kind]
    loaded = surgery.load(out).state_dict()
    if kind == "plain":  # the merged weights are what was written
        expected = safetensors.torch.load_file(out / "model.safetensors")
        assert set(expected) <= set(loaded)
    else:
        expected = model.state_dict()
        assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
