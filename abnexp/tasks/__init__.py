"""Tasks: one explicit name → class table (``task=<name>``)."""
from __future__ import annotations

from abnexp.errors import ConfigError
from abnexp.tasks.cls import ClassificationTask
from abnexp.tasks.detection import DetectionTask
from abnexp.tasks.semseg import SegmentationTask

TASKS = {"cls": ClassificationTask, "detection": DetectionTask, "semseg": SegmentationTask}


def build_task(cfg):
    """The task object for ``cfg.task.name``; raises ConfigError listing the valid names."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a task; valid: {', '.join(TASKS)}")
    return TASKS[cfg.task.name](cfg)
