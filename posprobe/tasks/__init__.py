"""Seeded synthetic tasks and the position-sweep evaluation (docs/tasks.md: the behavioural U-curve).

Re-exports the task registry (`posprobe.tasks.registry`: names -> Task classes, imported on first use):
`get_task("kv_words")` returns a task object (a frozen dataclass; keyword overrides change its fields),
`list_tasks()` the valid names. Every task makes structured `Prompt`s with token spans of its items (see
`posprobe.tasks.base`); `evaluate_positions` sweeps the gold item through positions and scores greedy answers.
"""

from __future__ import annotations

from posprobe.tasks.base import Prompt, Segment, Task, build_prompt
from posprobe.tasks.evaluate import evaluate_positions, summarize_trials, wilson_interval
from posprobe.tasks.registry import get_task, list_tasks

__all__ = [
    "Prompt",
    "Segment",
    "Task",
    "build_prompt",
    "evaluate_positions",
    "get_task",
    "list_tasks",
    "summarize_trials",
    "wilson_interval",
]
