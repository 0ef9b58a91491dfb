"""``surgery train``: a compiled result trained with transformers' ``Trainer`` (accelerate underneath).

The Trainer brings what a training run needs and `surgery` does not re-implement: devices and
data-parallel processes (``accelerate launch`` / ``torchrun``: the same command on more processes),
gradient accumulation, the optimizer and learning-rate scheduler (cosine by default; a step's
:class:`~surgery.transforms.registry.StepSchedule` scales it, e.g. ReLoRA's jagged cosine),
evaluation, checkpoints and resuming them. :class:`~surgery.train.callback.SurgeryTrainer` adds the
steps' schedules, whose state goes into each checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from surgery.errors import SurgeryError
from surgery.train.callback import SurgeryTrainer
from surgery.train.data import datasets

# Optimizers transformers takes from bitsandbytes: their kernels (and paging) run on CUDA.
BNB = {"adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "rmsprop_bnb",
       "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
       "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit"}


@dataclass
class Options:
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 10
    warmup_steps: int = 0
    schedule: str = "cosine"
    optim: str = "adamw_torch"
    device: str = "cpu"
    shuffle: bool = True
    eval_on_start: bool = False
    # Keep each layer's input only and recompute the rest in the backward pass: memory for long
    # sequences (LongLoRA at 16k tokens) for about one more forward's time.
    checkpointing: bool = False


def check_options(name: str, device: str, schedule: str = "cosine") -> None:
    """Refuse an optimizer or schedule transformers does not know, or a bitsandbytes optimizer without
    CUDA, before any work."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from surgery.errors import did_you_mean

    schedules = [s.value for s in SchedulerType]
    if schedule not in schedules:
        raise SurgeryError(f"unknown learning-rate schedule {schedule!r}{did_you_mean(schedule, schedules)}")
    known = [o.value for o in OptimizerNames]
    if name not in known:
        raise SurgeryError(f"unknown optimizer {name!r}{did_you_mean(name, known)}")
    if name in BNB and (device == "cpu" or not torch.cuda.is_available()):
        where = "--device cpu was asked for" if device == "cpu" else "no CUDA device is available"
        raise SurgeryError(f"--optim {name} is bitsandbytes' optimizer, which runs on CUDA (paged optimizers page "
                           f"their state between GPU and CPU memory), and {where}; on CPU use --optim adamw_torch")


def arguments(checkpoints: Path, opts: Options) -> transformers.TrainingArguments:
    """The Trainer's arguments for `opts`; a combination it refuses is a user error, not a traceback."""
    try:
        return _arguments(checkpoints, opts)
    except ValueError as e:
        raise SurgeryError(f"the Trainer refuses these options: {e}") from None


def _arguments(checkpoints: Path, opts: Options) -> transformers.TrainingArguments:
    eval_every = opts.eval_every
    return transformers.TrainingArguments(
        output_dir=str(checkpoints), max_steps=opts.steps, per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr, lr_scheduler_type=opts.schedule, warmup_steps=opts.warmup_steps, optim=opts.optim,
        seed=opts.seed, data_seed=opts.seed, use_cpu=opts.device == "cpu",
        # Several CPU processes (accelerate launch / torchrun) talk over gloo; one process needs none.
        ddp_backend="gloo" if opts.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is an added one the forward uses
        eval_strategy="steps" if eval_every else "no", eval_steps=eval_every or None,
        eval_on_start=opts.eval_on_start, activation_checkpointing=opts.checkpointing,
        save_strategy="steps" if opts.save_every else "no", save_steps=opts.save_every or 500,
        logging_strategy="steps", logging_steps=opts.log_every, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
        # In order, N processes of batch b see exactly the blocks one process of batch N·b sees.
        train_sampling_strategy="random" if opts.shuffle else "sequential")


class _Log(TrainerCallback):
    """Progress lines: the training loss every --log-every steps, the held-out loss at each evaluation."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.log(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                     f"lr {logs.get('learning_rate', 0):.2e}")
        if "eval_loss" in logs:
            self.log(f"eval step {state.global_step}  held-out loss {logs['eval_loss']:.4f}")


def _steps_done(checkpoint: str) -> int:
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SurgeryError(f"{checkpoint} is not a readable Trainer checkpoint: {e}") from None


def train(result, tokenizer, data: Path, checkpoints: Path, opts: Options, *, resume: bool = False,
          log: Callable[[str], None] = print) -> SurgeryTrainer:
    """Train `result.model` (a compile result) on `data`; returns the Trainer after training.

    With `resume`, training continues from the last checkpoint in `checkpoints` (schedule state
    included); without it, `checkpoints` must not hold a checkpoint already, so a run never mixes
    with an earlier one unasked.
    """
    check_options(opts.optim, opts.device, opts.schedule)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume and last is None:
        raise SurgeryError(f"--resume: no checkpoint in {checkpoints}")
    if resume and _steps_done(last) >= opts.steps:
        raise SurgeryError(f"{last} already reached --steps {opts.steps}; give more --steps to train further")
    if not resume and last is not None:
        raise SurgeryError(f"{checkpoints} holds checkpoints of an earlier run; continue it with --resume, "
                           "or remove them")
    train_set, eval_set = datasets(tokenizer, data, opts.seq_len)
    transformers.set_seed(opts.seed)
    model = result.model
    model.train()
    trainer = SurgeryTrainer(model=model, args=arguments(checkpoints, opts),
                             train_dataset=train_set, eval_dataset=eval_set, schedules=result)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; _Log prints lines
    trainer.add_callback(_Log(log))
    if last is not None:
        trainer.surgery.resume(last)
        log(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    if not opts.eval_every or opts.steps % opts.eval_every:
        trainer.evaluate()  # the held-out loss at the end (logged like the periodic ones); every process takes part
    model.eval()
    return trainer
