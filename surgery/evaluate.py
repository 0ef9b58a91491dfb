"""Judge context extension: perplexity per length and passkey retrieval, specs side by side.

:func:`evaluate` runs the untouched model and each spec (compiled on its own copy of the model, so
the model passed in is never changed) on the same inputs.

**Perplexity (truncate mode).** For each length n, one forward over the first n tokens of the text
x_0 … x_{n−1}. The loss at target position t (1 ≤ t < n) is −log p(x_t | x_{<t}); with L the trained
context length (``config.max_position_embeddings`` unless given), the mean loss is reported over all
targets, over the targets t < L ("first L") and over the targets t ≥ L ("past L"), each as
perplexity exp(mean). The backbone runs once; the output head and the cross-entropy run over chunks
of positions, so a [n × vocab] float32 logits tensor is never held (16k × 49k would be 3 GB): memory
is the backbone's activations plus one [chunk × vocab] block. Per position this is the loss
``model(ids, labels=ids)`` computes (its logits upcast to float32), only summed in float64.

**Passkey retrieval** (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300, as used by YaRN):
a task sentence, then the filler ``"The grass is green. … There and back again."`` repeated, with the
line ``"The pass key is K. Remember it. K is the pass key."`` inserted after a fraction `depth` of the
filler repetitions, then ``"What is the pass key? The pass key is"``. K is uniform in 1 … 50,000 and
depth uniform in [0, 1), drawn from a generator seeded by (seed, length), so every spec sees the same
prompts. The prompt is assembled from separately tokenized pieces (each but the first with its
leading space, which is how byte-level BPE splits the joined text), so its length (≤ the asked
length, as many whole filler repetitions as fit) and the key's token position are exact. The model
decodes a few tokens greedily; the answer is the first integer in them; a trial passes when it is K.

**Streaming** (``stream=N``, StreamingLLM's protocol): the first N tokens decoded one at a time as
the model generates — with its KV cache (a ``window(w, sinks=S)`` model's bounded one), or through
its decoding strategy (``generate: recompute(w)``: each token from a fresh forward over the last w),
teacher-forced — reporting the perplexity of every next token and tokens per second (wall clock,
with the untouched model's as the anchor of the ratio). A spec with a decoding step changes
generation, not the forward, so its per-length perplexity is not computed (it would be the
untouched model's); its figure is the stream's.

**Default text**: every topic of Python's bundled ``pydoc_data.topics`` (the help texts of the
language reference), sorted by key and joined by blank lines, tokenized without special tokens —
public, shipped with every Python, and long enough for 16k tokens (issue 7's protocol).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import ModelError, SurgeryError

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_MAX_KEY = 50_000
UNTOUCHED = "untouched"


class EvalError(SurgeryError):
    """An evaluation that cannot run as asked (text, lengths, tokenizer)."""


# ------------------------------------------------------------------------------------ text


def default_text() -> str:
    """Every topic of Python's bundled ``pydoc_data.topics``, sorted by key, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_tokenizer(model_dir: str | Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{model_dir} has no usable tokenizer, which eval needs to read text: {e}") from None


def read_text(path: str | Path | None) -> str:
    """The text of `path` (UTF-8), or :func:`default_text` when None."""
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EvalError(f"no text file {path}") from None
    except IsADirectoryError:
        raise EvalError(f"{path} is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids (1-D, no special tokens)."""
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


# ------------------------------------------------------------------------------ perplexity


@dataclass
class Loss:
    """Summed negative log-likelihoods (nats) and target counts: all, targets t < L, targets t ≥ L."""

    nll_first: float = 0.0
    count_first: int = 0
    nll_past: float = 0.0
    count_past: int = 0

    @staticmethod
    def _ppl(nll: float, count: int) -> float | None:
        return math.exp(nll / count) if count else None

    @property
    def ppl(self) -> float | None:
        return self._ppl(self.nll_first + self.nll_past, self.count_first + self.count_past)

    @property
    def ppl_first(self) -> float | None:
        return self._ppl(self.nll_first, self.count_first)

    @property
    def ppl_past(self) -> float | None:
        return self._ppl(self.nll_past, self.count_past)


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        raise ModelError(f"{type(model).__name__} is not a causal language model with a separate output head; "
                         "eval needs one")
    return backbone, head


def sequence_loss(model: nn.Module, ids: torch.Tensor, trained_length: int, *, chunk: int = 1024) -> Loss:
    """The loss of `model` on the 1-D token ids `ids`, split at target position `trained_length`.

    One backbone forward; then the head and cross-entropy over `chunk` positions at a time.
    """
    backbone, head = _backbone_and_head(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.numel()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = Loss()
    with torch.inference_mode():
        hidden = backbone(input_ids=ids[None], use_cache=False).last_hidden_state[0]
        for start in range(0, n - 1, chunk):
            end = min(start + chunk, n - 1)  # hidden states start..end−1 predict targets start+1..end
            logits = head(hidden[start:end]).float()
            if softcap:  # Gemma 2's logit soft-capping, as its forward applies it
                logits = torch.tanh(logits / softcap) * softcap
            nll = F.cross_entropy(logits, ids[start + 1:end + 1], reduction="none").double()
            first = max(0, min(end, trained_length - 1) - start)  # targets t < L are the first ones
            loss.nll_first += nll[:first].sum().item()
            loss.count_first += first
            loss.nll_past += nll[first:].sum().item()
            loss.count_past += nll.numel() - first
    return loss


@dataclass
class Stream:
    """Teacher-forced token-by-token decoding of a stream: summed nll (nats), targets, wall-clock seconds."""

    nll: float
    count: int
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def tokens_per_s(self) -> float:
        return self.count / self.seconds if self.seconds else math.inf


def stream_loss(model: nn.Module, ids: torch.Tensor) -> Stream:
    """The loss of decoding the 1-D `ids` one token at a time as `model` generates (module docstring)."""
    from surgery.anchors.decoding import stream_log_probs

    start = time.perf_counter()
    log_probs = stream_log_probs(model, ids.to(next(model.parameters()).device))
    return Stream(-log_probs.double().sum().item(), log_probs.numel(), time.perf_counter() - start)


# --------------------------------------------------------------------------------- passkey


@dataclass(frozen=True)
class PasskeyPrompt:
    key: int
    depth: float            # the asked fraction of filler before the key line
    ids: tuple[int, ...]
    key_position: int       # token index where the key line starts
    fillers_before: int
    fillers: int
    question: int = 0       # trailing tokens that ask for the key (the rest is the context)


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> PasskeyPrompt:
    """The passkey prompt of at most `length` tokens with the key line after round(depth·R) of its R fillers."""
    if not 0 <= depth <= 1:
        raise EvalError(f"passkey depth must lie in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    task, filler = encode(PASSKEY_TASK), encode(" " + PASSKEY_FILLER)
    line, question = encode(" " + PASSKEY_LINE.format(key=key)), encode(" " + PASSKEY_QUESTION)
    room = length - len(task) - len(line) - len(question)
    fillers = room // len(filler)
    if fillers < 1:
        need = len(task) + len(line) + len(question) + len(filler)
        raise EvalError(f"a passkey prompt needs at least {need} tokens; {length} is too short")
    before = round(depth * fillers)
    ids = task + filler * before + line + filler * (fillers - before) + question
    return PasskeyPrompt(key, depth, tuple(ids), len(task) + before * len(filler), before, fillers, len(question))


def passkey_prompts(tokenizer, length: int, trials: int, seed: int) -> list[PasskeyPrompt]:
    """`trials` prompts of `length`, from a generator seeded by (seed, length) alone."""
    rng = random.Random(seed * 1_000_003 + length)
    draws = [(rng.randint(1, PASSKEY_MAX_KEY), rng.random()) for _ in range(trials)]
    return [passkey_prompt(tokenizer, length, key, depth) for key, depth in draws]


def first_integer(text: str) -> int | None:
    """The first run of digits in `text` as an integer (None if there is none)."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@dataclass
class Trial:
    key: int
    depth: float
    tokens: int
    answer: str
    found: int | None

    @property
    def ok(self) -> bool:
        return self.found == self.key


def run_passkey(model: nn.Module, tokenizer, prompt: PasskeyPrompt, *, answer_tokens: int = 8) -> Trial:
    """Greedy answer to `prompt`. A decoding strategy that takes the context apart (NBCE:
    ``splits_context``) gets the question as the prompt and the task, filler and key line as
    ``context=``, as its users call it; any other model gets the whole prompt."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    extra = {}
    if getattr(getattr(getattr(model, "generate", None), "strategy", None), "splits_context", False):
        cut = len(prompt.ids) - prompt.question
        ids, extra = ids[:, cut:], {"context": ids[:, :cut]}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **extra)
    answer = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return Trial(prompt.key, prompt.depth, len(prompt.ids), answer, first_integer(answer))


# ------------------------------------------------------------------------------ evaluation


@dataclass
class Row:
    """One spec at one length: perplexity (if asked at that length) and passkey trials (if any)."""

    spec: str
    length: int
    loss: Loss | None = None
    passkey: list[Trial] = field(default_factory=list)
    stream: Stream | None = None

    @property
    def passkey_accuracy(self) -> float | None:
        return sum(t.ok for t in self.passkey) / len(self.passkey) if self.passkey else None


@dataclass
class Evaluation:
    trained_length: int
    text_tokens: int
    seed: int
    specs: list[str]
    rows: list[Row]

    def row(self, spec: str, length: int) -> Row | None:
        return next((r for r in self.rows if r.spec == spec and r.length == length), None)

    @property
    def lengths(self) -> list[int]:
        return sorted({r.length for r in self.rows})

    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            entry = {"spec": r.spec, "length": r.length}
            if r.loss is not None:
                entry.update(ppl=r.loss.ppl, ppl_first_L=r.loss.ppl_first, ppl_past_L=r.loss.ppl_past,
                             targets_first_L=r.loss.count_first, targets_past_L=r.loss.count_past)
            if r.stream is not None:
                entry.update(stream_ppl=r.stream.ppl, stream_tokens_per_s=r.stream.tokens_per_s,
                             stream_targets=r.stream.count)
            if r.passkey:
                entry["passkey_accuracy"] = r.passkey_accuracy
                entry["passkey"] = [{**asdict(t), "ok": t.ok} for t in r.passkey]
            rows.append(entry)
        return {"trained_length": self.trained_length, "text_tokens": self.text_tokens, "seed": self.seed,
                "specs": self.specs, "results": rows}

    def table(self):
        """A rich table: one row per spec; per length, perplexity (past L / first L) and passkey accuracy."""
        from rich.table import Table

        table = Table(title=f"long-context evaluation (trained length L = {self.trained_length:,})")
        table.add_column("spec")
        for n in self.lengths:
            table.add_column(f"{n:,}", justify="right")
        for spec in self.specs:
            cells = []
            for n in self.lengths:
                r = self.row(spec, n)
                parts = []
                if r is not None and r.loss is not None:
                    if r.loss.count_past:
                        parts.append(f"ppl {r.loss.ppl:.2f} (past L {r.loss.ppl_past:.2f}, "
                                     f"first L {r.loss.ppl_first:.2f})")
                    else:
                        parts.append(f"ppl {r.loss.ppl:.2f}")
                if r is not None and r.stream is not None:
                    anchor = self.row(UNTOUCHED, n)
                    speed = (f" ({r.stream.tokens_per_s / anchor.stream.tokens_per_s:.2f}×)"
                             if anchor is not None and anchor.stream is not None and anchor is not r else "")
                    parts.append(f"stream ppl {r.stream.ppl:.2f}, {r.stream.tokens_per_s:.1f} tok/s{speed}")
                if r is not None and r.passkey:
                    parts.append(f"passkey {sum(t.ok for t in r.passkey)}/{len(r.passkey)}")
                cells.append("\n".join(parts) or "—")
            table.add_row(spec, *cells)
        return table

    def _figure(self):
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        series = {"ppl": {}, "passkey": {}}
        for spec in self.specs:
            rows = [r for r in self.rows if r.spec == spec]
            ppl = [(r.length, r.loss.ppl_past if r.loss.count_past else r.loss.ppl) for r in rows if r.loss is not None]
            acc = [(r.length, r.passkey_accuracy) for r in rows if r.passkey]
            for kind, points in (("ppl", ppl), ("passkey", acc)):
                if points:
                    series[kind][spec] = sorted(points)
        # one panel per measurement that has points (a passkey-only run gets no empty perplexity panel)
        kinds = [kind for kind in series if series[kind]] or ["ppl"]
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
        for kind, ax in zip(kinds, axes[0]):
            for spec, points in series[kind].items():
                ax.plot(*zip(*points), marker="o", label=spec)
            ax.axvline(self.trained_length, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("length (tokens)")
            ax.grid(alpha=0.3)
            if kind == "ppl":
                ax.set_yscale("log")
                ax.set_ylabel("perplexity (targets past L where the length exceeds L)")
                ax.set_title("perplexity vs length")
            else:
                ax.set_ylabel("passkey accuracy")
                ax.set_ylim(-0.05, 1.05)
                ax.set_title("passkey retrieval vs length")
        if series[kinds[0]]:
            axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        return fig, plt

    def plot(self, path: str | Path) -> Path:
        """Write the plot: a PNG, or (``.html``/``.htm``) a self-contained page with the PNG inlined and the table."""
        path = Path(path)
        fig, plt = self._figure()
        try:
            if path.suffix.lower() in (".html", ".htm"):
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=120)
                image = base64.b64encode(buffer.getvalue()).decode("ascii")
                data = json.dumps(self.to_dict(), indent=1).replace("<", "\\u003c")
                path.write_text(
                    "<!doctype html><html><head><meta charset='utf-8'><title>surgery eval</title></head><body>"
                    f"<h1>surgery eval</h1><img alt='perplexity and passkey accuracy vs length' "
                    f"src='data:image/png;base64,{image}'><h2>data</h2><pre>{_escape(data)}</pre></body></html>",
                    encoding="utf-8")
            else:
                fig.savefig(path, dpi=120)
        except OSError as e:
            raise EvalError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            plt.close(fig)
        return path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def spec_label(spec) -> str:
    """A spec as one line: its rules without comments, joined by '; '."""
    lines = [line.split("#", 1)[0].strip() for line in spec.source.splitlines()]
    return "; ".join(line for line in lines if line) or spec.file


def _check_lengths(name: str, lengths: Sequence[int], available: int | None) -> list[int]:
    lengths = sorted(set(int(n) for n in lengths))
    for n in lengths:
        if n < 2:
            raise EvalError(f"{name} must be at least 2 tokens (a target needs a token before it), got {n}")
        if available is not None and n > available:
            raise EvalError(f"{name} {n:,} is beyond the text, which has {available:,} tokens; "
                            "give a longer --text or shorter lengths")
    return lengths


def evaluate(model: nn.Module, specs: Sequence = (), *, ids: torch.Tensor | None = None, tokenizer=None,
             lengths: Sequence[int] = (4096, 8192, 16384), passkey: int = 0,
             passkey_lengths: Sequence[int] | None = None, stream: int = 0, seed: int = 0,
             trained_length: int | None = None, untouched: bool = True,
             check: bool = True, chunk: int = 1024, answer_tokens: int = 8,
             progress: Callable[[str, int, int], None] | None = None,
             partial: Callable[["Evaluation"], None] | None = None) -> Evaluation:
    """Evaluate the untouched `model` and each of `specs` (text, path or parsed spec) side by side.

    `ids` are the text's token ids (default: the tokenized :func:`default_text`, which needs
    `tokenizer`); perplexity runs at `lengths` (none if empty), `passkey` trials at `passkey_lengths`
    (default `lengths`; needs `tokenizer`), token-by-token decoding over the first `stream` tokens
    (none if 0). Each spec is compiled on a copy of `model` (its
    obligations checked first unless ``check=False``). `progress(description, done, total)` is
    called before each compile and each forward (`done` of `total` finished so far); `partial` with
    the results so far after each spec (to keep what finished when a long run is stopped).
    ``untouched=False`` skips the untouched model (its figures already measured with the same
    seed and text); a stream's tokens/s then has no anchor to be a ratio of.
    """
    from surgery.api import compile as compile_spec, parse
    from surgery.syntax import ast

    if passkey < 0:
        raise EvalError(f"--passkey is a number of trials, got {passkey}")
    if ids is None and lengths:
        if tokenizer is None:
            raise EvalError("perplexity needs the text's token ids or a tokenizer")
        ids = tokenize(tokenizer, default_text())
    if ids is not None:
        ids = ids.reshape(-1)
    if stream and ids is None:
        if tokenizer is None:
            raise EvalError("streaming needs the text's token ids or a tokenizer")
        ids = tokenize(tokenizer, default_text()).reshape(-1)
    lengths = _check_lengths("a length", lengths, None if ids is None else ids.numel())
    stream_at = _check_lengths("a stream length", [stream], None if ids is None else ids.numel())[0] if stream else 0
    key_lengths = _check_lengths("a passkey length", lengths if passkey_lengths is None else passkey_lengths, None)
    if passkey and tokenizer is None:
        raise EvalError("passkey retrieval needs a tokenizer")
    L = trained_length or model.config.max_position_embeddings
    prompts = {n: passkey_prompts(tokenizer, n, passkey, seed) for n in key_lengths} if passkey else {}
    parsed = [s if isinstance(s, ast.Spec) else parse(s) for s in specs]
    labels = [UNTOUCHED] * untouched + [spec_label(s) for s in parsed]
    if not labels:
        raise EvalError("nothing to evaluate: no spec, and the untouched model skipped")
    rows: list[Row] = []
    total = len(parsed) + len(labels) * (len(lengths) + sum(len(t) for t in prompts.values()) + bool(stream_at))
    done = 0

    def report(description: str) -> None:
        nonlocal done
        if progress:
            progress(description, done, total)
        done += 1

    for done_specs, (label, spec) in enumerate(zip(labels, [None] * untouched + parsed), start=1):
        working = model
        if spec is not None:
            report(f"{label}: compiling")
            working = copy.deepcopy(model)
            compile_spec(working, spec, check=check, seed=seed)
        working.eval()
        by_length: dict[int, Row] = {}
        decodes = hasattr(working, "surgery_decoding")  # its forward is the untouched model's: see the docstring
        for n in lengths:
            report(f"{label}: perplexity at {n:,}")
            by_length[n] = Row(label, n, loss=None if decodes else sequence_loss(working, ids[:n], L, chunk=chunk))
        if stream_at:
            report(f"{label}: streaming {stream_at:,} tokens")
            by_length.setdefault(stream_at, Row(label, stream_at)).stream = stream_loss(working, ids[:stream_at])
        for n, trials in prompts.items():
            row = by_length.setdefault(n, Row(label, n))
            for i, prompt in enumerate(trials):
                report(f"{label}: passkey at {n:,} ({i + 1}/{len(trials)})")
                row.passkey.append(run_passkey(working, tokenizer, prompt, answer_tokens=answer_tokens))
        rows.extend(by_length[n] for n in sorted(by_length))
        del working
        if partial:
            partial(Evaluation(L, 0 if ids is None else ids.numel(), seed, labels[:done_specs], list(rows)))
    if progress:
        progress("done", total, total)
    return Evaluation(L, 0 if ids is None else ids.numel(), seed, labels, rows)
