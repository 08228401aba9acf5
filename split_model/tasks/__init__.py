"""Reasoning benchmarks behind one interface, and the registry that names them.

Every task gives `Example(question, steps, answer)` per split and scores a
prediction; `get_task("prosqa", valid_path=...)` builds one by name, and
configs can instead name a class with `class_path` / `init_args`.
"""

from __future__ import annotations

from split_model.tasks.base import SPLITS, Example, FileTask, Split, Task
from split_model.tasks.coconut_json import (
    CoconutJSON,
    ProntoQA,
    ProsQA,
    ProsQAGenConfig,
    generate_prosqa,
    prontoqa_graph,
    prontoqa_statistics,
    prontoqa_without_link_cue,
    prosqa_statistics,
    prosqa_vocabulary,
    write_prosqa,
)
from split_model.tasks.icot import GSM8K, IcotMultiplication, column_steps, column_totals
from split_model.tasks.reasoning_gym import ReasoningGym
from split_model.tasks.state_tracking import StateTracking
from split_model.tasks.world import CITIES, KnowledgeWorld, World, WorldConfig, chance_accuracy, write_world

# Keyed by each class's own `name`, so the key and the class cannot disagree.
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (StateTracking, IcotMultiplication, GSM8K, ProsQA, ProntoQA,
                                                          ReasoningGym, KnowledgeWorld)}


def get_task(name: str, **kwargs: object) -> Task:
    """Build the task registered as `name`, passing `kwargs` to its constructor."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = [
    "CITIES",
    "SPLITS",
    "TASKS",
    "CoconutJSON",
    "Example",
    "FileTask",
    "GSM8K",
    "IcotMultiplication",
    "KnowledgeWorld",
    "ProntoQA",
    "ProsQA",
    "ProsQAGenConfig",
    "ReasoningGym",
    "Split",
    "StateTracking",
    "Task",
    "World",
    "WorldConfig",
    "chance_accuracy",
    "column_steps",
    "column_totals",
    "generate_prosqa",
    "get_task",
    "prontoqa_graph",
    "prontoqa_statistics",
    "prontoqa_without_link_cue",
    "prosqa_statistics",
    "prosqa_vocabulary",
    "write_prosqa",
    "write_world",
]
