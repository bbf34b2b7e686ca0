"""The task registry: bundled offline tasks and the ACDC paper's tasks.

Each task module defines ``TASKS: list[Task]``; they are imported on first use, so that
``import acdc_viz`` stays light.
"""

from __future__ import annotations

import importlib

from acdc_viz.tasks.base import Task, TaskError

_MODULES = ("acdc_viz.tasks.induction", "acdc_viz.tasks.tracr", "acdc_viz.tasks.paper")
_registry: dict[str, Task] | None = None


def all_tasks() -> dict[str, Task]:
    """Every registered task, by name (bundled tasks first)."""
    global _registry
    if _registry is None:
        tasks: list[Task] = []
        for module in _MODULES:
            try:
                tasks.extend(importlib.import_module(module).TASKS)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
        _registry = {t.name: t for t in sorted(tasks, key=lambda t: (not t.bundled, t.name))}
    return _registry


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise TaskError(f"unknown task {name!r}: expected one of {sorted(tasks)} "
                        "(see `acdc-viz tasks`)")
    return tasks[name]


__all__ = ["Task", "TaskError", "all_tasks", "get_task"]
