"""The small interface every reasoning task implements.

A task hands out `Example`s per split and scores a predicted answer against one.
Training and evaluation code only ever talks to `Task`, so a new benchmark is one
subclass here plus one entry in `split_model.tasks.TASKS`.

`FileTask` covers the common case of a benchmark stored as one file per split,
given by path: it owns path checking, caching, the `max_examples` cap and the
error messages, and a subclass only parses a file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, get_args

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)


@dataclass(frozen=True)
class Example:
    """One question with its chain of thought and reference answer."""

    question: str  # the context, read once by the frozen memory backbone
    steps: tuple[str, ...]  # reasoning steps (chain of thought); may be empty
    answer: str  # the reference answer text
    # Optional: per reasoning step, the (start, end) character spans of `question` that the step
    # reads (ProsQA's label sets: the facts each hop of the search follows); see `evidence_loss`.
    evidence: tuple[tuple[tuple[int, int], ...], ...] | None = None


class Task(ABC):
    """A benchmark: examples per split, plus how a prediction is scored."""

    name: ClassVar[str]  # registry key in split_model.tasks.TASKS

    @abstractmethod
    def examples(self, split: Split) -> list[Example]:
        """All examples of `split`, in a fixed order (same call, same list)."""

    @property
    def label(self) -> str:
        """What reports call this task (the registry name, or more where one class holds many)."""
        return self.name

    def normalize(self, text: str) -> str:
        """Canonical form for comparison: stripped, whitespace runs as one space."""
        return " ".join(text.split())

    def score(self, prediction: str, example: Example) -> float:
        """1.0 for an exact match after `normalize`, else 0.0."""
        return float(self.normalize(prediction) == self.normalize(example.answer))


def check_split(split: str) -> Split:
    """Return `split` unchanged, or raise ValueError listing the valid splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]


def require_examples(examples: list[Example], task: str, split: str, source: str) -> list[Example]:
    """Return `examples`, or raise ValueError if there are none.

    An empty split is almost always a wrong path or a zero count in a config,
    and training on it would fail much later with a less useful message.
    """
    if not examples:
        raise ValueError(f"task {task!r}: split {split!r} has no examples (source: {source})")
    return examples


class FileTask(Task):
    """A task whose splits are files, one path per split.

    Subclasses set `name` and implement `parse_file`. Each split is read on
    first use and cached.
    """

    def __init__(
        self,
        train_path: str | None = None,
        valid_path: str | None = None,
        test_path: str | None = None,
        max_examples: int | None = None,
    ) -> None:
        """Point each split at its file.

        Args:
            train_path: file with the train split, or None if it is not used.
            valid_path: file with the valid split, or None if it is not used.
            test_path: file with the test split, or None if it is not used.
            max_examples: keep only the first this many examples of each split (None: all).
        """
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
        self.paths: dict[Split, str | None] = {
            "train": train_path,
            "valid": valid_path,
            "test": test_path,
        }
        self.max_examples = max_examples
        self._cache: dict[Split, list[Example]] = {}

    @abstractmethod
    def parse_file(self, path: Path) -> list[Example]:
        """Parse every example in `path`; raise ValueError naming the file on bad input."""

    def examples(self, split: Split) -> list[Example]:
        split = check_split(split)
        if split not in self._cache:
            self._cache[split] = self._load_split(split)
        return self._cache[split]

    def _load_split(self, split: Split) -> list[Example]:
        """Read one split; subclasses may override to build a split without a file."""
        path = self.split_file(split)
        examples = self.parse_file(path)[: self.max_examples]
        return require_examples(examples, self.name, split, str(path))

    def split_file(self, split: Split) -> Path:
        """The existing file configured for `split`, with an actionable error otherwise."""
        arg = f"{split}_path"
        raw = self.paths[split]
        if raw is None:
            raise ValueError(f"task {self.name!r}: no file for split {split!r}; set the {arg} argument")
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(
                f"task {self.name!r}: {split} file not found: {path}; "
                f"pass the path of an existing file as the {arg} argument"
            )
        return path
