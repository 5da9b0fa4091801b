"""The task registry: names -> Task classes, listed in ONE block below as import paths and imported on first use.

Owns `get_task` and `list_tasks`. It lives apart from the package `__init__` so that `tasks/evaluate.py` can look
tasks up without importing its own package (an import cycle).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, cast

from posprobe.errors import UnknownNameError
from posprobe.tasks.base import Task

# --- built-in tasks (name -> "module:attribute") -----------------------------------------------------------------
_BUILTIN_TASKS: dict[str, str] = {
    "kv_words": "posprobe.tasks.kv:KVWords",
    "kv_uuid": "posprobe.tasks.kv:KVUuid",
    "multidoc": "posprobe.tasks.multidoc:MultiDoc",
    "passkey": "posprobe.tasks.passkey:Passkey",
}
# ---------------------------------------------------------------------------------------------------------------


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(_BUILTIN_TASKS)


def get_task(task: str | Task, **overrides: Any) -> Task:
    """A task object from its name (or the object itself); keyword overrides replace config fields."""
    if isinstance(task, Task):
        return dataclasses.replace(cast(Any, task), **overrides) if overrides else task  # every task is a dataclass
    if not isinstance(task, str) or task not in _BUILTIN_TASKS:
        raise UnknownNameError("task", str(task), list_tasks(),
                               hint="Or pass a posprobe.tasks.Task object.")
    module, attr = _BUILTIN_TASKS[task].split(":")
    cls = getattr(importlib.import_module(module), attr)
    try:
        return cls(**overrides)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(cls)]
        bad = next((k for k in overrides if k not in fields), None)
        if bad is None:
            raise
        raise UnknownNameError(f"{task} option", bad, fields) from exc
