"""Tasks: one explicit name → class table (``task=<name>``)."""
from __future__ import annotations

from abnexp.errors import ConfigError
from abnexp.tasks.cls import ClassificationTask

TASKS = {"cls": ClassificationTask}


def build_task(cfg):
    """The task object for ``cfg.task.name``; raises ConfigError listing the valid names."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not a task; valid: {', '.join(TASKS)}")
    return TASKS[cfg.task.name](cfg)
