"""Schedules in transformers' ``Trainer``: a callback, and a Trainer that also applies loss terms.

:class:`SurgeryCallback` drives :class:`~surgery.train.schedules.Schedules` from Trainer events: the
learning-rate scale just before each optimizer step (``on_pre_optimizer_step``, after gradient
clipping), the steps' after-step actions right after it (``on_optimizer_step``, before the
scheduler moves on), and the schedule state into every checkpoint (``surgery_schedules.json``),
which :meth:`SurgeryCallback.resume` reads back before ``trainer.train(resume_from_checkpoint=…)``.

A callback cannot change the loss, so a step with a loss term (``ia3(loss=tfew)``) needs
:class:`SurgeryTrainer`, which adds the callback itself and passes the loss through the schedules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import transformers
from transformers import TrainerCallback

from surgery.errors import SurgeryError
from surgery.train.schedules import Schedules, join_tensors, split_tensors

STATE_FILE = "surgery_schedules.json"
TENSOR_FILE = "surgery_schedules.safetensors"


class SurgeryCallback(TrainerCallback):
    """Runs `schedules` (or ``Schedules(result)``) inside a ``Trainer``: pass it in ``callbacks=[…]``."""

    def __init__(self, schedules: Schedules | Any):
        self.schedules = schedules if isinstance(schedules, Schedules) else Schedules(schedules)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The Trainer's count is the authority: after a resume it starts where the checkpoint was.
        self.schedules.step = state.global_step
        self.schedules.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.schedules.after_optimizer_step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            saved, tensors = split_tensors(self.schedules.state_dict())
            (checkpoint / STATE_FILE).write_text(json.dumps(saved, indent=1))
            if tensors:
                safetensors.torch.save_file(tensors, str(checkpoint / TENSOR_FILE))

    def resume(self, checkpoint: str | Path) -> None:
        """Load the schedule state a checkpoint of this run holds (call before ``trainer.train``)."""
        path = Path(checkpoint) / STATE_FILE
        if self.schedules and not path.is_file():
            raise SurgeryError(f"{checkpoint} has no {STATE_FILE}: it was not written by a run with these schedules")
        if path.is_file():
            tensors = Path(checkpoint) / TENSOR_FILE
            saved = json.loads(path.read_text())
            self.schedules.load_state_dict(
                join_tensors(saved, safetensors.torch.load_file(str(tensors)) if tensors.is_file() else {}))


class SurgeryTrainer(transformers.Trainer):
    """A ``Trainer`` running `schedules` (a :class:`Schedules` or a compile result): the callback, and
    every step's loss term applied to the model's loss."""

    def __init__(self, *args: Any, schedules: Schedules | Any, **kwargs: Any):
        self.surgery = SurgeryCallback(schedules)
        super().__init__(*args, **kwargs)
        self.add_callback(self.surgery)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extra = {key: inputs.pop(key) for key in self.surgery.schedules.batch_keys if key in inputs}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:  # evaluation reports the model's own loss
            loss = self.surgery.schedules.loss({**inputs, **extra}, outputs, loss)
        return (loss, outputs) if return_outputs else loss
