"""Tasks, one file each, registered by kind (see base.py)."""

from pruneflow.tasks import classification  # noqa: F401  (registration)
from pruneflow.tasks.base import TASKS, Runner, Task, get_task, ort_runner, register, torch_runner  # noqa: F401
