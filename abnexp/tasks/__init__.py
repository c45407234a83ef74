"""Tasks: the task table, one entry per ``task=`` option (the class implementing
:class:`~abnexp.tasks.base.Task` and the option's schema)."""
from __future__ import annotations

from dataclasses import dataclass

from abnexp.config import TaskConfig
from abnexp.errors import ConfigError
from abnexp.tasks.base import RunContext, Task
from abnexp.tasks.cls import ClassificationTask
from abnexp.tasks.detection import DetectionTask, DetectionTaskConfig
from abnexp.tasks.semseg import SegmentationTask, SegmentationTaskConfig


@dataclass(frozen=True)
class TaskSpec:
    """One ``task=`` option: ``task(cfg)`` -> :class:`Task`; ``options``: its schema."""

    task: type
    options: type = TaskConfig


TASKS: dict[str, TaskSpec] = {
    "cls": TaskSpec(ClassificationTask),
    "semseg": TaskSpec(SegmentationTask, SegmentationTaskConfig),
    "detection": TaskSpec(DetectionTask, DetectionTaskConfig),
}


def build_task(cfg) -> Task:
    """The task object for ``cfg.task.name``; raises ConfigError listing the valid names."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a task; valid: {', '.join(TASKS)}")
    return TASKS[cfg.task.name].task(cfg)


__all__ = ["TASKS", "TaskSpec", "Task", "RunContext", "build_task"]
