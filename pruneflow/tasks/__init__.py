"""Tasks, one file each, registered by kind (see base.py)."""

from pruneflow.tasks import causal_lm, classification  # noqa: F401  (registration)
from pruneflow.tasks.base import (TASKS, Calibration, Column, Runner, Task, get_task, ort_runner, register,  # noqa: F401
                                  torch_runner)
