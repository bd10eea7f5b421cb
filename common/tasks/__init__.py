"""The task registry: one entry per kind of model fedlora can federate."""

from __future__ import annotations

from common.registry import Registry
from common.tasks.base import TaskSpec, model_fingerprint, model_outputs
from common.tasks.imaging import IMAGING_TASK
from common.tasks.tabular import TABULAR_TASK
from common.tasks.text import TEXT_TASK

TASKS: Registry[TaskSpec] = Registry(
    "task",
    [
        (IMAGING_TASK.name, IMAGING_TASK),
        (TABULAR_TASK.name, TABULAR_TASK),
        (TEXT_TASK.name, TEXT_TASK),
    ],
)

__all__ = ["TASKS", "TaskSpec", "model_fingerprint", "model_outputs"]
