"""``surgery check | plan | verify | diff | apply | train | import-peft | eval | demo``.

Exit codes: 0 success, 1 a failed obligation, 2 a user error (spec, model directory, arguments).
User errors print a message (with file:line:col and a caret for spec errors), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from surgery.errors import ModelError, SurgeryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A declarative model-surgery compiler for Hugging Face models.")
# soft_wrap: never insert line breaks into paths, carets or diffs; when piped (CI logs, tests),
# give tables room instead of rich's default 80 columns, which would truncate module paths.
_WIDTH = None if sys.stdout.isatty() else 160
out = Console(soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, soft_wrap=True, width=_WIDTH)

DEFAULT_MODEL = "smollm2"
MODEL_HELP = ("a transformers model directory, or 'smollm2' for the built-in SmolLM2-135M-Instruct "
              "(a path named smollm2 that exists wins)")
# Seeds reach torch.manual_seed and generators after arithmetic (seed * 1000 + …), which must stay
# inside 64 bits; 32 bits is plenty of seeds and leaves that room.
SEED = dict(min=0, max=2**32 - 1, help="seed for inputs and initialisation (0 to 2**32 - 1)")


@contextmanager
def _status(message: str):
    with err.status(message, spinner="dots") as status:
        yield status


def _model_dir(model_dir: str) -> Path:
    # A directory the user has that happens to be called "smollm2" is theirs, not the built-in model.
    if model_dir == DEFAULT_MODEL and not Path(model_dir).exists():
        from surgery.models import smollm2_dir

        with _status("preparing SmolLM2-135M-Instruct (first run de-quantises the GGUF, ~1 min)"):
            return smollm2_dir()
    return Path(model_dir)


def _load(model_dir: str, *, meta: bool = False):
    from surgery.models import load_model

    path = _model_dir(model_dir)
    with _status(f"loading {path}"):
        return load_model(path, meta=meta), path


def _spec(path: Path):
    from surgery.syntax import parse_file

    return parse_file(path)


def _check_writable(path: Path, *, make_parents: bool = False) -> None:
    """Refuse now a path that could not be written at the end, after minutes of loading and verifying.

    The write itself is still guarded: this is the early answer, not the only one.
    """
    existing = path if path.exists() else path.parent
    while make_parents and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():
        problem = f"no directory {existing}"
    elif existing == path and path.is_dir():
        problem = "it is a directory"
    elif existing != path and not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise SurgeryError(f"cannot write {path}: {problem}")


def _check_outside(output: Path, model_dir: Path) -> None:
    """MODEL_DIR is never written: refuse an output that is it or lies inside it (through symlinks too)."""
    out, model = output.resolve(), model_dir.resolve()
    if out == model or model in out.parents:
        raise SurgeryError(f"{output} is inside the model directory {model_dir}, which is never written; "
                           "choose an output elsewhere")


def _counts_table(plan) -> Table:
    table = Table(title="parameters")
    for col in ("", "total", "trainable", "added"):
        table.add_column(col, justify="right")
    b, a = plan.base_counts, plan.counts
    table.add_row("before", f"{b.total:,}", f"{b.trainable:,}", "")
    table.add_row("after", f"{a.total:,}", f"{a.trainable:,}", f"{a.added:,}")
    return table


def _steps_table(plan) -> Table:
    table = Table(title=f"plan ({plan.arch})")
    for col in ("step", "transform", "targets", "at"):
        table.add_column(col)
    for step, described in zip(plan.steps, plan.described_steps()):
        paths = [(t.path or f"({t.role or 'model'})") + (f" ({t.option})" if t.option else "") for t in step.targets]
        shown = "\n".join(paths[:4]) + (f"\n… {len(paths) - 4} more" if len(paths) > 4 else "")
        table.add_row(str(step.index), described, shown, f"{step.span.file}:{step.span.line}:{step.span.column}")
    return table


def _report_table(report) -> Table:
    table = Table(title="obligations")
    for col in ("step", "transform", "obligation", "error", "tol", "ok"):
        table.add_column(col, justify="right" if col in ("error", "tol") else "left")
    for m in report.measurements:
        table.add_row(str(m.step), m.transform, m.obligation, m.shown_error, f"{m.tol:.0e}",
                      f"[dim]n/a: {m.not_applicable}[/]" if m.not_applicable else "[green]yes[/]" if m.ok else "[red]NO[/]")
    return table


@app.command()
def check(spec: Path = typer.Argument(..., help="a .surg file")):
    """Check a spec without a model: every check of `plan` that needs no model."""
    from surgery.planner import check as check_spec

    parsed = _spec(spec)
    check_spec(parsed)
    out.print(f"[green]ok[/]: {spec} — {len(parsed.rules)} rule(s)")


@app.command()
def plan(spec: Path = typer.Argument(..., help="a .surg file"),
         model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP)):
    """Show the concrete steps and parameter counts (meta device: no weights are read)."""
    from surgery.api import plan as make_plan

    parsed = _spec(spec)
    model, _ = _load(model_dir, meta=True)
    result = make_plan(model, parsed)
    out.print(_steps_table(result))
    out.print(_counts_table(result))


@app.command()
def verify(spec: Path = typer.Argument(..., help="a .surg file"),
           model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
           seed: int = typer.Option(0, **SEED)):
    """Run every step's equivalence obligations and print each with its error and tolerance."""
    from surgery.planner import build_plan
    from surgery.verify import verify as run

    parsed = _spec(spec)
    model, _ = _load(model_dir)
    the_plan = build_plan(parsed, model)
    with _status("verifying") as status:
        report = run(the_plan, model, seed=seed, progress=lambda m: status.update(f"verifying: {m}"))
    out.print(_report_table(report))
    if not report.ok:
        err.print(f"[red]{len(report.failures)} obligation(s) failed[/]")
        raise typer.Exit(1)


def _example_ids(model, n: int = 12):
    import torch

    vocab = getattr(model.config, "vocab_size", 100)
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))


@app.command()
def diff(spec: Path = typer.Argument(..., help="a .surg file"),
         model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
         html: Optional[Path] = typer.Option(None, "--html", help="also write the diff as an HTML page"),
         graph: bool = typer.Option(True, help="include the torch.export computation-graph diff"),
         code: bool = typer.Option(False, "--code", help="show each changed module's computation as a code diff"),
         as_json: bool = typer.Option(False, "--json", help="print the whole diff as JSON (nothing else on stdout)")):
    """Show the module-tree and computation-graph diff the spec makes (verification is skipped)."""
    import json

    from surgery.api import compile as run

    parsed = _spec(spec)
    if html:
        _check_writable(html)
    model, _ = _load(model_dir)
    with _status("applying and capturing graphs"):
        result = run(model, parsed, check=False, graph_inputs=_example_ids(model) if graph else None)
        d = result.diff()
    if as_json:
        # Plain print: rich would wrap or highlight, and CI parses this.
        sys.stdout.write(json.dumps(d.to_json(), indent=1) + "\n")
    else:
        out.print(d.text(), markup=False, highlight=False)
        if code:
            out.print(d.code(), markup=False, highlight=False)
    if html:
        try:
            html.write_text(d.html(), encoding="utf-8")
        except OSError as e:
            raise SurgeryError(f"cannot write {html}: {e.strerror or e}") from None
        (err if as_json else out).print(f"HTML diff written to {html}")


@app.command()
def apply(spec: Path = typer.Argument(..., help="a .surg file"),
          model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
          output: Path = typer.Option(..., "-o", "--output", help="output directory (must not exist)"),
          merge: bool = typer.Option(False, "--merge", help="fold mergeable steps into the weights"),
          check_obligations: bool = typer.Option(True, "--verify/--no-verify", help="run obligations first"),
          seed: int = typer.Option(0, **SEED)):
    """Verify, apply and save: OUT appears whole or not at all; MODEL_DIR is never written."""
    from surgery.api import compile as run

    parsed = _spec(spec)
    if output.exists():
        raise SurgeryError(f"{output} already exists; choose a new output directory")
    _check_writable(output, make_parents=True)
    _check_outside(output, _model_dir(model_dir))
    model, _ = _load(model_dir)
    with _status("verifying and applying") as status:
        result = run(model, parsed, check=check_obligations, seed=seed,
                     progress=lambda m: status.update(f"verifying: {m}"))
    if result.report:
        out.print(_report_table(result.report))
    out.print(_steps_table(result.plan))
    out.print(_counts_table(result.plan))
    with _status(f"saving {output}"):
        result.save(output, merge=merge)
    out.print(f"[green]saved[/] {output}")


@app.command("import-peft")
def import_peft(peft_dir: Path = typer.Argument(..., help="a PEFT adapter directory (adapter_config.json + "
                                                        "adapter_model.safetensors)"),
                model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
                output: Path = typer.Option(..., "-o", "--output", help="output directory (must not exist)"),
                check_obligations: bool = typer.Option(True, "--verify/--no-verify", help="run obligations first")):
    """Move a PEFT adapter over: the equivalent spec, applied to MODEL_DIR with PEFT's trained tensors,
    saved as a surgery output (its spec.surg is the spec; peft/ is written again)."""
    from surgery.interop import import_peft as run

    if output.exists():
        raise SurgeryError(f"{output} already exists; choose a new output directory")
    _check_writable(output, make_parents=True)
    _check_outside(output, _model_dir(model_dir))
    model, _ = _load(model_dir)
    with _status("importing") as status:
        result = run(peft_dir, model, check=check_obligations, progress=lambda m: status.update(f"verifying: {m}"))
    out.print(result.plan.spec.source, markup=False, highlight=False)
    out.print(_steps_table(result.plan))
    out.print(_counts_table(result.plan))
    with _status(f"saving {output}"):
        result.save(output)
    out.print(f"[green]saved[/] {output}")
@app.command()
def train(spec: Path = typer.Argument(..., help="a .surg file"),
          model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
          data: Path = typer.Option(..., "--data", help="training text: a UTF-8 file, or .jsonl with a \"text\" per line"),
          output: Path = typer.Option(..., "-o", "--output", help="output directory (must not exist)"),
          steps: int = typer.Option(100, "--steps", min=1, help="optimizer steps"),
          batch_size: int = typer.Option(4, "--batch-size", min=1, help="blocks per step and process"),
          seq_len: int = typer.Option(256, "--seq-len", min=2, help="tokens per block"),
          lr: float = typer.Option(2e-4, "--lr", min=0, help="peak learning rate"),
          grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="micro-batches per optimizer step"),
          eval_every: int = typer.Option(50, "--eval-every", min=0, help="held-out loss every N steps (0: at the end only)"),
          save_every: Optional[int] = typer.Option(None, "--save-every", min=0,
                                                   help="checkpoint every N steps (default: --eval-every; 0: none)"),
          log_every: int = typer.Option(10, "--log-every", min=1, help="training loss every N steps"),
          warmup_steps: int = typer.Option(0, "--warmup-steps", min=0, help="linear learning-rate warm-up"),
          schedule: str = typer.Option("cosine", "--schedule", help="learning-rate schedule (transformers' names)"),
          optim: str = typer.Option("adamw_torch", "--optim", help="optimizer (transformers' names; "
                                    "paged_adamw_8bit: QLoRA's, CUDA only)"),
          device: str = typer.Option("cpu", "--device", help="cpu, or auto (a GPU when present)"),
          checkpoints: Optional[Path] = typer.Option(None, "--checkpoints",
                                                     help="checkpoint directory (default: OUT.checkpoints)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
          shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="visit the blocks in random order"),
          eval_on_start: bool = typer.Option(False, "--eval-on-start", help="the held-out loss before training too"),
          checkpointing: bool = typer.Option(False, "--activation-checkpointing",
                                             help="recompute activations in the backward pass (less memory, "
                                             "about one more forward per step)"),
          merge: bool = typer.Option(False, "--merge", help="fold mergeable steps into the weights when saving"),
          check_obligations: bool = typer.Option(True, "--verify/--no-verify", help="run obligations first"),
          seed: int = typer.Option(0, **SEED)):
    """Verify, apply, fine-tune (causal-LM loss) with transformers' Trainer, and save like `apply`.

    Several processes (data-parallel) with the same command: `accelerate launch -m surgery.cli train …`
    or `torchrun --nproc-per-node N -m surgery.cli train …`.
    """
    from surgery.api import compile as run
    from surgery.train.run import Options, check_options, train as run_training

    if device not in ("cpu", "auto"):
        raise SurgeryError(f"--device takes cpu or auto, not {device!r}")
    check_options(optim, device, schedule)
    parsed = _spec(spec)
    if output.exists():
        raise SurgeryError(f"{output} already exists; choose a new output directory")
    _check_writable(output, make_parents=True)
    model_path = _model_dir(model_dir)
    _check_outside(output, model_path)
    checkpoints = checkpoints or output.with_name(output.name + ".checkpoints")
    _check_outside(checkpoints, model_path)
    if not data.is_file():
        raise SurgeryError(f"--data {data}: no such file")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{model_path} has no usable tokenizer, which training needs to read --data: {e}") from None
    model, _ = _load(model_dir)
    with _status("verifying and applying") as status:
        result = run(model, parsed, check=check_obligations, seed=seed,
                     progress=lambda m: status.update(f"verifying: {m}"))
    chief = int(os.environ.get("RANK", "0")) == 0  # under accelerate/torchrun one process reports and saves
    if chief:
        if result.report:
            out.print(_report_table(result.report))
        out.print(_steps_table(result.plan))
        out.print(_counts_table(result.plan))
    opts = Options(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, grad_accum=grad_accum, seed=seed,
                   eval_every=eval_every, save_every=eval_every if save_every is None else save_every,
                   log_every=log_every, warmup_steps=warmup_steps, schedule=schedule, optim=optim, device=device,
                   shuffle=shuffle, eval_on_start=eval_on_start, checkpointing=checkpointing)
    transformers.logging.set_verbosity_error()  # our progress lines, not the Trainer's notices
    run_training(result, tokenizer, data, checkpoints, opts, resume=resume,
                 log=lambda line: out.print(line, markup=False, highlight=False))
    if chief:
        with _status(f"saving {output}"):
            result.save(output, merge=merge)
        out.print(f"[green]saved[/] {output} (checkpoints in {checkpoints})")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SurgeryError(f"{option} takes comma-separated token counts such as 4096,8192, got {text!r}") from None


@app.command("eval")
def eval_(specs: list[str] = typer.Argument(None, metavar="[SPEC]... MODEL_DIR",
                                          help="zero or more .surg files, then the model directory (or 'smollm2')"),
          text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score "
                                              "(default: Python's pydoc_data.topics, every topic sorted by key)"),
          lengths: str = typer.Option("4096,8192,16384", "--lengths", help="perplexity lengths, comma-separated "
                                      "(empty: none)"),
          passkey: int = typer.Option(0, "--passkey", min=0, help="passkey trials per length (0: none)"),
          passkey_lengths: Optional[str] = typer.Option(None, "--passkey-lengths",
                                                        help="passkey lengths (default: --lengths)"),
          stream: int = typer.Option(0, "--stream", min=0, help="decode the text's first N tokens one at a "
                                     "time: perplexity and tokens/s (0: none)"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
          plot: Optional[Path] = typer.Option(None, "--plot", help="write a plot: FILE.png, or FILE.html "
                                              "(self-contained page)"),
          check_obligations: bool = typer.Option(True, "--verify/--no-verify", help="run each spec's obligations"),
          untouched: bool = typer.Option(True, "--untouched/--no-untouched",
                                         help="also evaluate the untouched model (the anchor of every ratio)"),
          seed: int = typer.Option(0, **SEED)):
    """Perplexity per length (past / within the trained length) and passkey retrieval, specs side by side."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from surgery import evaluate as ev

    if not specs:
        raise SurgeryError("eval needs MODEL_DIR (e.g. 'smollm2'), after any specs")
    *spec_paths, model_dir = specs
    ppl_lengths = _int_list(lengths, "--lengths")
    key_lengths = None if passkey_lengths is None else _int_list(passkey_lengths, "--passkey-lengths")
    for path in filter(None, (json_out, plot)):
        _check_writable(path)
    if plot and plot.suffix.lower() not in (".png", ".html", ".htm"):
        raise SurgeryError(f"--plot writes .png or .html, not {plot.name}")
    parsed = [_spec(Path(p)) for p in spec_paths]
    source = ev.read_text(text)
    path = _model_dir(model_dir)
    if not path.is_dir():
        raise ModelError(f"no model directory {path}")
    tokenizer = ev.load_tokenizer(path)
    ids = ev.tokenize(tokenizer, source)
    model, _ = _load(model_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as bar:
        task = bar.add_task("evaluating", total=None)
        result = ev.evaluate(model, parsed, ids=ids, tokenizer=tokenizer, lengths=ppl_lengths, passkey=passkey,
                             passkey_lengths=key_lengths, stream=stream, seed=seed, check=check_obligations,
                             untouched=untouched,
                             progress=lambda d, done, total: bar.update(task, description=d, completed=done,
                                                                        total=total),
                             partial=lambda so_far: _write_eval(so_far, json_out, plot))
    out.print(result.table())
    _write_eval(result, json_out, plot)
    for path in filter(None, (json_out, plot)):
        out.print(f"written: {path}")


def _write_eval(result, json_out: Optional[Path], plot: Optional[Path]) -> None:
    """Write the JSON and plot (also after each spec, so a stopped long run keeps what finished)."""
    if json_out:
        try:
            json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise SurgeryError(f"cannot write {json_out}: {e.strerror or e}") from None
    if plot:
        result.plot(plot)


@app.command()
def demo(spec: list[Path] = typer.Argument(None, help="specs to apply (default: the examples in specs/)"),
         model_dir: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
         tokens: int = typer.Option(12, help="tokens to generate before and after")):
    """The main job on the built-in model: apply, verify, diff, generate before and after."""
    import copy

    import torch
    import transformers

    from surgery.api import compile as run

    specs = spec or sorted(Path("specs").glob("demo*.surg"))
    if not specs:
        raise SurgeryError("no specs given and none found in specs/demo*.surg")
    parsed = [(s, _spec(s)) for s in specs]
    model, path = _load(model_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"the demo generates text, so {path} needs a tokenizer: {e}") from None
    prompt = "The three primary colours are"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    out.rule(f"before: {path.name}")
    out.print(repr(tokenizer.decode(before[0])))
    for spec_path, spec_ast in parsed:
        out.rule(str(spec_path))
        out.print(spec_ast.source.strip(), markup=False, highlight=False)
        working = copy.deepcopy(model)
        with _status("verifying and applying") as status:
            result = run(working, spec_ast, graph_inputs=ids,
                         progress=lambda m: status.update(f"verifying: {m}"))
        out.print(_report_table(result.report))
        out.print(_counts_table(result.plan))
        out.print(result.diff().text(), markup=False, highlight=False)
        with torch.no_grad():
            after = working.generate(ids, max_new_tokens=tokens, do_sample=False)
        same = "the same tokens as before" if torch.equal(after, before) else "tokens differ from before"
        out.print(f"after ({same}): " + repr(tokenizer.decode(after[0])))


def main() -> None:
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except SurgeryError as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown command, missing argument) are click exceptions; typer vendors click,
        # so recognise them by their interface rather than by class.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
