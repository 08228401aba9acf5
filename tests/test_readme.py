"""The README's promises: its task example runs, and its commands name real files."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_add_a_task_example_registers_a_working_task():
    from split_model.tasks import TASKS

    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    namespace: dict = {}
    try:
        exec(code, namespace)
        task = TASKS["parity"](length=4, n=8)
        examples = task.examples("train")
        assert len(examples) == 8
        for ex in examples:  # the running parity ends in the answer, one step per bit
            bits = [int(b) for b in ex.question.split()]
            assert ex.answer == str(sum(bits) % 2) == ex.steps[-1] and len(ex.steps) == 4
            assert task.score(ex.answer, ex) == 1.0
    finally:
        TASKS.pop("parity", None)


def test_readme_commands_point_at_existing_files():
    root = Path(__file__).resolve().parents[1]
    for path in set(re.findall(r"(configs/[\w.]+\.yaml|scripts/[\w.]+\.sh)", README)):
        assert (root / path).is_file(), path
    ci = (root / ".ci" / "run").read_text()
    test_command = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_command in README and test_command in ci  # CI runs exactly the README's test command
