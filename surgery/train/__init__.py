"""Training surgered models: the steps' training-time behaviour, and ``surgery train``.

The pipeline, one module each:

* :mod:`~surgery.train.schedules` — :class:`Schedules`: every step's
  :class:`~surgery.transforms.registry.StepSchedule` (learning-rate scale, after-step action such as
  ReLoRA's restart, loss terms, saved state) behind one object; ``optimizer_step`` is the one call a
  hand-written loop makes.
* :mod:`~surgery.train.callback` — :class:`SurgeryCallback` runs them in transformers' ``Trainer``;
  :class:`SurgeryTrainer` also applies loss terms.
* :mod:`~surgery.train.losses` — T-Few's losses (``ia3(loss=tfew)``).
"""

from typing import Any

from surgery.train.schedules import BaseSchedule, Schedules, load

__all__ = ["BaseSchedule", "Schedules", "load", "SurgeryCallback", "SurgeryTrainer"]


def __getattr__(name: str) -> Any:
    # The Trainer side imports transformers' trainer (seconds); transforms import this package.
    if name in ("SurgeryCallback", "SurgeryTrainer"):
        from surgery.train import callback

        return getattr(callback, name)
    raise AttributeError(name)
