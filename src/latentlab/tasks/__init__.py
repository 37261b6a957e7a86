"""Tasks: where examples come from and how answers are judged (see `base.Task`)."""

from __future__ import annotations

from pydantic import ValidationError

from latentlab.errors import ConfigError
from latentlab.tasks.base import SPLITS, Example, Split, Task, TaskConfig
from latentlab.tasks.countdown import CountdownConfig, CountdownTask
from latentlab.tasks.gsm8k import GSM8KConfig, GSM8KTask
from latentlab.tasks.prosqa import ProsQAConfig, ProsQATask
from latentlab.tasks.text import TextConfig, TextTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    GSM8KTask, ProsQATask, CountdownTask, TextTask)}
# The config classes, e.g. for a pydantic union discriminated on `name`.
TASK_CONFIGS = tuple(cls.config_class for cls in TASKS.values())


def build_task(config: TaskConfig) -> Task:
    """The task a config describes."""
    if config.name not in TASKS:
        raise ConfigError(f"unknown task {config.name!r}",
                          fix=f"set task.name to one of {', '.join(TASKS)}")
    cls = TASKS[config.name]
    if not isinstance(config, cls.config_class):
        # A generic TaskConfig lacks this task's options (defaults): re-validate it as this task's.
        try:
            config = cls.config_class.model_validate(config.model_dump(exclude_unset=True))
        except ValidationError as exc:
            raise ConfigError(f"invalid options for task {config.name!r}: {exc}",
                              fix="correct the task section of the config") from None
    return cls(config)


__all__ = ["SPLITS", "TASKS", "TASK_CONFIGS", "CountdownConfig", "CountdownTask", "Example",
           "GSM8KConfig", "GSM8KTask", "ProsQAConfig", "ProsQATask", "Split", "Task",
           "TaskConfig", "TextConfig", "TextTask", "build_task"]
