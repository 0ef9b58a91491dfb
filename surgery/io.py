"""Save and load surgered models; export to plain transformers and to PEFT where representable.

An output directory is written to a temporary sibling and renamed into place, so it appears whole
or not at all; an existing directory is never overwritten. Layout:

* ``surgery.json`` — the manifest, and the authority on what the directory holds: format version,
  the spec text and the file it came from (paths in it resolve against that file's directory, for
  a spec given as text against the working directory, when saved and when loaded), the plan, the seed, which steps were merged, the dtypes, what was (or could not
  be) exported elsewhere, the sha256 and size of every other file, and a digest of itself.
  ``spec.surg`` is a human-readable copy of its spec and ``report.json`` the verification report:
  neither is read to rebuild the model, and both must still match the manifest. A result that was
  trained with schedules (:mod:`surgery.train`) also records their state there (``schedules``; its
  tensors in ``schedules.safetensors``), for :func:`schedule_state` to give back.
* Surgery format (when some step is not expressible in plain transformers):
  ``base_config.json`` + ``surgery.safetensors`` (the whole surgered state dict). ``load`` builds the
  base model from the config, re-applies the plan, and loads the state dict: bit-exact.
* Plain format (every step merged into weights — with ``merge`` — or expressed in the config, e.g.
  rope scaling as ``config.rope_parameters``, or trained biases): ``config.json`` +
  ``model.safetensors`` from ``save_pretrained``, so ``transformers.AutoModel*.from_pretrained(out)``
  gives the same outputs.
* ``peft/`` — ``adapter_config.json`` + ``adapter_model.safetensors`` (keys ``base_model.model.…``)
  when the plan is adapters of a single PEFT type (LoRA, IA3, prompt tuning; a quantized base is fine).

Dtypes: tensors are written in the dtypes the model has in memory (a bf16 model gives a bf16 file,
half the float32 size); ``surgery.json`` records the model's dtype and every tensor that differs
from it, and ``load`` rebuilds each tensor in its dtype.

Integrity: ``load`` checks the whole directory before building anything, and any damage — a file
missing, truncated, replaced or edited (even a one-byte change in a tensor, in ``spec.surg``, or in a
config), a ``surgery.json`` that is not JSON, has a wrong field or an unknown format — is a
:class:`SaveError` naming the file. The cost is reading every file once more to hash it, on save
and on load, at about 1 GB/s on one core here: SmolLM2-135M (542 MB) takes 0.5 s to verify, of a
3.6 s load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

from surgery import anchors
from surgery.anchors.linear import wrappers
from surgery.apply import apply_plan, get_module
from surgery.errors import SaveError, SurgeryError
from surgery.gating import gates
from surgery.layers import SurgeryLinear
from surgery.models import model_class
from surgery.planner import Plan, Step, build_plan
from surgery.syntax import ast, parse as parse_text
from surgery.transforms.registry import ConfigPatch, PeftExport, PeftModulesToSave

FORMAT = 2  # 2: a manifest of sha256 hashes and the dtypes; 1 had neither
SCHEDULE_TENSORS = "schedules.safetensors"  # the tensors of the schedule state, when it has any


def _atomic_dir(out_dir: Path) -> Path:
    """A temporary sibling of `out_dir` to fill, named after its owner; stale ones are removed first."""
    if out_dir.exists():
        raise SaveError(f"{out_dir} already exists; choose a new output directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out_dir.parent)
        return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-{_owner()}-"))
    except OSError as e:
        raise SaveError(f"cannot write {out_dir}: {e.strerror or e}") from None


# A temporary is ``.NAME.partial-PID-BOOT-HOST-RANDOM``: the owner's pid, and hashes of the boot id and
# host name that make the pid meaningful (a pid is only unique on one host, between two boots).
_PARTIAL = re.compile(r"\..+\.partial-(\d+)-([0-9a-f]{8})-([0-9a-f]{8})-[^-]+")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _owner() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: a pid reused after a reboot then keeps a stale temporary (never the reverse)
        boot = ""
    return f"{os.getpid()}-{_short_hash(boot)}-{_short_hash(socket.gethostname())}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_partials(parent: Path) -> None:
    """Remove temporaries left in `parent` by saves of this host whose process is gone (e.g. SIGKILL).

    Only this boot's temporaries are judged; a live process's, another host's (a shared file system)
    or an unrecognised name are never touched.
    """
    _, boot, host = _owner().split("-")
    try:
        paths = list(parent.iterdir())
    except OSError:  # a directory we may write but not list: cleaning is a courtesy, not a condition
        return
    for path in paths:
        match = _PARTIAL.fullmatch(path.name)
        if (match and match[2] == boot and match[3] == host and not _alive(int(match[1]))
                and path.is_dir() and not path.is_symlink()):
            shutil.rmtree(path, ignore_errors=True)


class _Signalled(BaseException):
    """SIGINT or SIGTERM arrived during a save (a BaseException, so no ``except Exception`` eats it)."""


class _Interruptions:
    """For the duration of a save, SIGINT and SIGTERM become :class:`_Signalled`, so the temporary is
    removed; on exit the old handlers are back and the signal is delivered again to do what it would
    have done (SIGINT: ``KeyboardInterrupt``; default SIGTERM: the process ends).

    Raising is armed only while a temporary exists to clean; a signal at any other moment, or a second
    one during the cleanup, is held until the end. Handlers can only be set on the main thread; an
    ignored signal stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "_Interruptions":
        self.pending: int | None = None
        self.armed = False
        self.old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                if old not in (signal.SIG_IGN, None):  # None: set outside Python, so it could not be restored
                    self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pending = self.pending or signum
        if self.armed:
            self.armed = False
            raise _Signalled(signum)

    def arm(self) -> None:
        self.armed = True
        if self.pending is not None:
            self.armed = False
            raise _Signalled(self.pending)

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, kind, error, tb) -> bool:
        self.armed = False
        for sig, old in self.old.items():
            signal.signal(sig, old)
        if self.pending is None:
            return False
        try:
            signal.raise_signal(self.pending)
        except BaseException as e:  # e.g. KeyboardInterrupt from the default SIGINT handler
            raise e from None
        if isinstance(error, _Signalled):  # the old handler returned: the save still did not happen
            raise SaveError(f"interrupted by {signal.Signals(self.pending).name}; nothing was written") from None
        return False


def _default_permissions(root: Path) -> None:
    """What a plain ``mkdir``/``open`` would have given (mkdtemp makes 0700; some writers 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _plain_copy(layer: SurgeryLinear) -> nn.Module:
    """The base layer's class (Linear or GPT-2 Conv1D) holding the folded weights."""
    weight, bias = layer.merged_weights()
    plain = copy.deepcopy(layer.base)
    if type(plain).__name__ == "Conv1D":
        weight = weight.t().contiguous()
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return plain


def merged_steps(plan: Plan, model: nn.Module) -> set[int]:
    """Indices of the steps that fold into the model's weights (every linear layer mergeable)."""
    return {step.index for step in plan.steps if anchors.kind(step.spec.anchor).mergeable(step, model)}


def _plain_representable(step: Step, merged: set[int], model: nn.Module) -> bool:
    """Whether plain transformers reproduces this step: merged weights, config, or trained biases."""
    patch = step.spec.offers(ConfigPatch)
    if patch is not None and patch.config_fields(step.params, model) is None:
        return False  # e.g. added biases that no config switch builds
    return patch is not None or step.index in merged or anchors.kind(step.spec.anchor).in_place


def _merged_model(model: nn.Module, plan: Plan, merged: set[int]) -> nn.Module:
    """A copy of `model` with every fully-mergeable linear folded back into its base class."""
    out = copy.deepcopy(model)
    mergeable_paths = {t.path for s in plan.steps if s.index in merged for t in s.targets}
    for path, layer in wrappers(out).items():
        if path in mergeable_paths:
            parent, _, name = path.rpartition(".")
            setattr(get_module(out, parent), name, _plain_copy(layer))
    return out


def peft_adapter(plan: Plan, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """The plan as one PEFT adapter: (``adapter_config.json`` fields, tensors under PEFT's keys, as the
    model holds them — views of its parameters where the transform stores PEFT's layout), or why
    it cannot be one."""
    if gates(plan):
        return "PEFT has no gates (gate(…))"
    kinds, whole = {}, []
    for step in plan.steps:
        if step.spec.peft_base:  # e.g. quantize: the PEFT user loads the base quantized
            continue
        saved = step.spec.offers(PeftModulesToSave)
        if saved is not None:  # trained in full beside the adapter, whatever its type
            whole += [p for p in saved.peft_modules(step.params, step.targets) if p not in whole]
            continue
        if step.spec.offers(PeftExport) is None:
            return f"{step.transform} has no PEFT equivalent"
        kinds.setdefault(step.transform, []).append(step)
    if len(kinds) != 1:
        return "PEFT holds one adapter type per adapter, the plan has " + ", ".join(sorted(kinds)) if kinds \
            else "no adapter in the plan"
    (name, steps), = kinds.items()
    # One PEFT config holds every step: they may differ in where they attach, and in the fields PEFT
    # allows per module (the transform's ``peft_patterns``, e.g. LoRA's rank_pattern).
    spec = steps[0].spec
    impl = spec.offers(PeftExport)
    assert impl is not None  # every step was checked above
    first = impl.peft(steps[0].params, ())
    patterns: dict[str, dict] = {}
    for step in steps[1:]:
        fields = impl.peft(step.params, ())
        for key in sorted(set(fields) | set(first)):
            if fields.get(key) == first.get(key):
                continue
            if key not in spec.peft_patterns:
                return f"the {name} steps differ in {key!r}, which one PEFT config cannot hold"
            patterns.setdefault(spec.peft_patterns[key], {}).update({t.path: fields[key] for t in step.targets})
    all_targets = [t for s in steps for t in s.targets]
    config = {**impl.peft(steps[0].params, all_targets), **patterns}
    named = anchors.kind(spec.anchor).peft_tensors(steps, model, config)
    if isinstance(named, str):
        return named.removeprefix("not written: ")
    if whole:
        # PEFT's prompt-learning models (their configs count virtual tokens) hold the model itself as
        # ``base_model``, the others inside their tuner, as ``base_model.model``: the keys follow.
        extra = _modules_to_save(model, whole, "base_model." if "num_virtual_tokens" in config else "base_model.model.")
        if isinstance(extra, str):
            return extra
        config.update(extra[0])
        named.update(extra[1])
    config.setdefault("task_type", _task_type(model))
    config.setdefault("base_model_name_or_path", None)
    return config, named


def _modules_to_save(model: nn.Module, paths: list[str], prefix: str) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """PEFT's ``modules_to_save`` for the modules at `paths` (config fields, tensors under PEFT's keys:
    `prefix`, then the parameter's name in the model),
    or why it cannot hold them. PEFT keeps a trained copy of each module and saves its tensors under
    the module's own key; a tensor the input embeddings share with the output head stays shared
    through ``ensure_weight_tying``; any other sharing, or an adapter inside, PEFT cannot express."""
    if "" in paths:
        return "the whole model is trained in full: a plain model, not an adapter"
    params = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
    for path in paths:
        if any(isinstance(m, SurgeryLinear) for m in model.get_submodule(path).modules()):
            return f"{path} is trained in full and holds an adapter, which PEFT's modules_to_save cannot hold"
    inside = tuple(f"{path}." for path in paths)
    shared = [name for name, p in model.named_parameters(remove_duplicate=False)
              if id(p) in params and not name.startswith(inside)]
    fields: dict = {"modules_to_save": list(paths)}
    if shared:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and embed is not None and head.weight is embed.weight \
            and any(model.get_submodule(path) is embed for path in paths)
        if not tied or len(shared) != 1:
            return f"{shared[0]} shares a tensor trained in full, which PEFT's modules_to_save would untie"
        fields["ensure_weight_tying"] = True
    tensors = {f"{prefix}{path}.{name}": p for path in paths for name, p in model.get_submodule(path).named_parameters()}
    tensors.update({f"{prefix}{name}": model.get_parameter(name) for name in shared})  # PEFT reads both keys
    return fields, tensors


def _peft_export(plan: Plan, model: nn.Module, tmp: Path) -> str:
    """Write ``peft/`` if the plan is expressible as one PEFT adapter; returns what happened."""
    adapter = peft_adapter(plan, model)
    if isinstance(adapter, str):
        return f"not written: {adapter}"
    config, named = adapter
    tensors = {k: v.detach().contiguous().clone() for k, v in named.items()}
    peft_dir = tmp / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    return "written"


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("CausalLM", "LMHeadModel")) else "FEATURE_EXTRACTION"


def save(result, out_dir: str | Path, *, merge: bool = False) -> Path:
    """Write `result` (a :class:`surgery.api.Result`) to `out_dir`, atomically.

    On any failure or interruption (an exception, Ctrl-C, SIGTERM) the temporary is removed; an
    interruption is then passed on as it came. A save killed outright (SIGKILL, power loss) leaves its
    temporary, which the next save into the same parent directory removes once its process is gone.
    """
    out_dir = Path(out_dir)
    with _Interruptions() as interruptions:
        tmp = _atomic_dir(out_dir)
        try:
            interruptions.arm()
            _write(result, tmp, merge)
            _default_permissions(tmp)
            # From here a signal waits for the rename: the output is whole, so nothing is undone.
            interruptions.disarm()
            os.replace(tmp, out_dir)
        except BaseException as e:
            interruptions.disarm()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, SurgeryError) or not isinstance(e, Exception):
                raise
            raise SaveError(f"could not write {out_dir}: {type(e).__name__}: {e}") from e
    return out_dir


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtypes(model: nn.Module) -> dict:
    """The model's dtype, and each saved tensor whose dtype differs from it (quantized storage, an
    adapter kept in float32 on a bf16 base, …): what :func:`load` rebuilds, tensor by tensor."""
    dtype = _dtype_name(model.dtype)
    return {"dtype": dtype,
            "dtypes": {k: _dtype_name(v.dtype) for k, v in model.state_dict().items() if _dtype_name(v.dtype) != dtype}}


def _write(result, tmp: Path, merge: bool) -> None:
    """Fill the temporary directory `tmp` (see the module docstring for the layout)."""
    model, plan = result.model, result.plan
    merged = merged_steps(plan, model) if merge else set()
    # Plain transformers whenever it reproduces every step (rope scaling, trained biases, merged
    # adapters): then `from_pretrained` alone loads the result.
    plain = all(_plain_representable(s, merged, model) for s in plan.steps)
    to_save = _merged_model(model, plan, merged) if plain or merged else model
    meta = {
        "format": FORMAT,
        "spec": plan.spec.source,
        "spec_file": _spec_file(plan.spec),
        "seed": result.seed,
        "plan": plan.to_json(),
        "model_class": type(model).__name__,
        "merged_steps": sorted(merged),
        "plain": plain,
        **_dtypes(to_save),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    schedules = getattr(result, "schedules", None)
    if schedules:
        from surgery.train.schedules import split_tensors

        meta["schedules"], tensors = split_tensors(schedules.state_dict())
        if tensors:
            safetensors.torch.save_file(tensors, str(tmp / SCHEDULE_TENSORS))
    (tmp / "spec.surg").write_text(plan.spec.source)
    if result.report is not None:
        (tmp / "report.json").write_text(json.dumps(result.report.to_json(), indent=2))
    meta["peft"] = _peft_export(plan, model, tmp) if not merge else "not written: --merge folds the adapters"
    if plain:
        config = copy.deepcopy(model.config)
        for step in plan.steps:
            patch = step.spec.offers(ConfigPatch)
            fields = patch.config_fields(step.params, model) if patch else None
            for key, value in (fields or {}).items():
                setattr(config, key, value)
        to_save.config = config
        with torch.no_grad():
            # The rotary module was swapped; the config now says how transformers rebuilds it.
            to_save.save_pretrained(str(tmp), safe_serialization=True)
    else:
        (tmp / "base_config.json").write_text(model.config.to_json_string())
        safetensors.torch.save_model(to_save, str(tmp / "surgery.safetensors"))
    meta["files"] = {path.relative_to(tmp).as_posix(): {"sha256": _sha256(path), "bytes": path.stat().st_size}
                     for path in sorted(tmp.rglob("*")) if path.is_file()}
    meta = json.loads(json.dumps(meta, default=str))  # the digest covers exactly what load will read
    meta["digest"] = _digest(meta)
    (tmp / "surgery.json").write_text(json.dumps(meta, indent=2))


def _spec_file(spec: ast.Spec) -> str:
    """The spec's file as an absolute path (paths in the spec resolve against its directory), or its
    name in angle brackets for a spec given as text (they resolve against the working directory)."""
    return spec.file if spec.file.startswith("<") else str(Path(spec.file).resolve())


def saved_spec(out_dir: Path, manifest: Manifest) -> ast.Spec:
    """The spec of `out_dir` as it was planned: its text, read as if from the file it came from (so
    its paths, e.g. the outputs ``fuse`` reads, resolve as they did)."""
    return parse_text(manifest.spec, manifest.spec_file or str(out_dir / "spec.surg"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(meta: dict) -> str:
    """sha256 of the manifest's content without its digest (canonical JSON, so layout does not matter)."""
    rest = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _File(_Strict):
    sha256: str
    bytes: int


class Manifest(_Strict):
    """``surgery.json`` as :func:`load` reads it (a field missing or of the wrong type is damage)."""

    format: int
    spec: str
    seed: int
    spec_file: str | None = None  # absent in outputs written before it was recorded
    plan: dict
    model_class: str
    merged_steps: list[int]
    plain: bool
    dtype: str
    dtypes: dict[str, str]
    peft: str
    versions: dict[str, str]
    files: dict[str, _File]
    digest: str
    schedules: dict | None = None  # absent unless the result was trained with schedules

    @field_validator("dtype")
    @classmethod
    def _a_dtype(cls, name: str) -> str:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"{name!r} is not a torch dtype")
        return name

    @field_validator("dtypes")
    @classmethod
    def _dtypes(cls, names: dict[str, str]) -> dict[str, str]:
        for name in names.values():
            cls._a_dtype(name)
        return names


def read_manifest(out_dir: Path) -> Manifest:
    path = out_dir / "surgery.json"
    if not path.is_file():
        raise SaveError(f"{out_dir} is not a surgery output directory (no surgery.json)")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaveError(f"{path} is damaged: {e}") from None
    if not isinstance(meta, dict):
        raise SaveError(f"{path} is damaged: a JSON {type(meta).__name__}, not an object")
    version = meta.get("format")
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT:
        older = " (written before outputs had a manifest: run `surgery apply` again)" if version == 1 else ""
        raise SaveError(f"{path} has format {version!r}; this surgery reads format {FORMAT}{older}")
    try:
        manifest = Manifest.model_validate(meta)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise SaveError(f"{path} is damaged: {where}: {first['msg']}{more}") from None
    if manifest.digest != _digest(meta):
        raise SaveError(f"{path} was changed after it was saved (its content no longer matches its digest)")
    return manifest


def _verify_files(out_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is there, whole and unchanged."""
    for name, entry in manifest.files.items():
        path = out_dir / name
        if not path.is_file():
            raise SaveError(f"{path} is missing (surgery.json lists it)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise SaveError(f"{path} is damaged: {size} bytes, {entry.bytes} when saved")
        if _sha256(path) != entry.sha256:
            raise SaveError(f"{path} was changed after it was saved (sha256 differs from surgery.json's)")


def verified(out_dir: Path) -> Manifest:
    """The manifest of `out_dir`, once every file it lists is checked whole and unchanged."""
    manifest = read_manifest(out_dir)
    _verify_files(out_dir, manifest)
    return manifest


def load(out_dir: str | Path) -> nn.Module:
    """Rebuild the model saved in `out_dir` exactly as it was saved: every tensor bit-exact, dtype included.

    The directory is verified against its manifest first (see the module docstring); a damaged or
    edited directory is a :class:`SaveError` naming the file, never a model with other outputs.
    """
    out_dir = Path(out_dir)
    manifest = verified(out_dir)
    try:
        model = _rebuild(out_dir, manifest)
    except SaveError:
        raise
    except Exception as e:  # verified files that still do not rebuild, e.g. under another transformers
        raise SaveError(f"{out_dir} could not be rebuilt: {type(e).__name__}: {e}") from e
    wrong = {k: _dtype_name(v.dtype) for k, v in model.state_dict().items()
             if _dtype_name(v.dtype) != manifest.dtypes.get(k, manifest.dtype)}
    if wrong:
        raise SaveError(f"{out_dir / 'surgery.json'} records other dtypes than the rebuilt model has: "
                        + ", ".join(f"{k} ({v})" for k, v in sorted(wrong.items())[:5]))
    return model.eval()


def schedule_state(out_dir: str | Path) -> dict | None:
    """The training schedules' state saved with `out_dir` (None if it has none), verified like :func:`load`."""
    out_dir = Path(out_dir)
    manifest = verified(out_dir)
    if manifest.schedules is None or SCHEDULE_TENSORS not in manifest.files:
        return manifest.schedules
    from surgery.train.schedules import join_tensors

    return join_tensors(manifest.schedules, safetensors.torch.load_file(str(out_dir / SCHEDULE_TENSORS)))


def _rebuild(out_dir: Path, manifest: Manifest) -> nn.Module:
    dtype = getattr(torch, manifest.dtype)
    if manifest.plain:
        cls = getattr(transformers, manifest.model_class, None) or transformers.AutoModel
        model = cls.from_pretrained(str(out_dir), dtype=dtype)
        recast = _adopt_dtypes(model, manifest)
        if recast:  # from_pretrained gave these the model's dtype: read them again as they were saved
            for name in manifest.files:
                if "/" not in name and name.endswith(".safetensors"):
                    with safetensors.safe_open(str(out_dir / name), "pt") as f:
                        model.load_state_dict({k: f.get_tensor(k) for k in recast & set(f.keys())}, strict=False)
        return model
    config = transformers.AutoConfig.for_model(**json.loads((out_dir / "base_config.json").read_text()))
    cls = getattr(transformers, manifest.model_class, None) or model_class(config)
    model = cls._from_config(config, dtype=dtype)
    plan = build_plan(saved_spec(out_dir, manifest), model)
    if manifest.merged_steps:
        plan = plan.restricted({s.index for s in plan.steps} - set(manifest.merged_steps))
    apply_plan(plan, model, seed=manifest.seed)
    _adopt_dtypes(model, manifest)
    missing, unexpected = safetensors.torch.load_model(model, str(out_dir / "surgery.safetensors"), strict=False)
    if missing or unexpected:
        raise SaveError(f"{out_dir} does not match its plan: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    return model


def _adopt_dtypes(model: nn.Module, manifest: Manifest) -> set[str]:
    """Give every parameter and buffer the dtype it was saved in; returns the keys that changed.

    Loading copies into the existing tensors, so their dtype must be right first. (Entries that are
    not parameters or buffers, e.g. a quantized layer's statistics, take the saved tensors as they are.)
    """
    changed = set()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for key, tensor in named:
        dtype = getattr(torch, manifest.dtypes.get(key, manifest.dtype))
        if tensor.dtype != dtype and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
            changed.add(key)
    return changed
