"""Training surgered models: the steps' training-time behaviour, and ``surgery train``.

The pipeline, one module each:

* :mod:`~surgery.train.schedules` — :class:`Schedules`: every step's
  :class:`~surgery.transforms.registry.StepSchedule` (learning-rate scale, after-step action such as
  ReLoRA's restart, loss terms, saved state) behind one object; ``optimizer_step`` is the one call a
  hand-written loop makes.
"""

from surgery.train.schedules import BaseSchedule, Schedules, load

__all__ = ["BaseSchedule", "Schedules", "load"]
