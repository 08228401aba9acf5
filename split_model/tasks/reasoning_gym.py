"""Tasks from the `reasoning-gym` package: procedurally generated puzzles, scored by their own code.

    ReasoningGym("chain_sum", config={"min_terms": 2, "max_terms": 3, "max_digits": 2})

Each split is drawn from the named generator with its own seed; valid and test never repeat a
train question (nor test a valid one). A prediction is scored by the generator's
`score_answer` (1.0 for a right answer; some generators give partial credit, e.g. for a
right answer in another format), so `task_score` can exceed exact match. The package is an
optional extra: `pip install 'split-model[gym]'`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from split_model.tasks.base import Example, Split, Task, check_split, require_examples


def _gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("reasoning-gym tasks need the reasoning-gym package: pip install 'split-model[gym]'") from e
    return reasoning_gym


class ReasoningGym(Task):
    name = "reasoning_gym"

    def __init__(self, dataset: str, config: dict[str, Any] | None = None, n_train: int = 20000, n_valid: int = 500,
                 n_test: int = 500, seed: int = 0, max_tries: int = 20) -> None:
        """Configure the generator.

        Args:
            dataset: the generator's name in reasoning-gym (e.g. chain_sum, count_bits,
                family_relationships); unknown names are refused with the list of known ones.
            config: the generator's own options (its config dataclass fields), e.g. sizes.
            n_train, n_valid, n_test: examples per split (train may repeat questions).
            seed: base seed; each split derives its own.
            max_tries: held-out splits draw up to max_tries * n questions to find n unseen
                ones; a generator with too few distinct questions is an error, not a leak.
        """
        _gym()
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
        for arg, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        self.dataset, self.config, self.seed, self.max_tries = dataset, dict(config or {}), seed, max_tries
        self.counts: dict[Split, int] = {"train": n_train, "valid": n_valid, "test": n_test}
        self._cache: dict[Split, list[Example]] = {}
        self._entries: dict[str, tuple[Any, dict]] = {}  # question -> (its dataset, its entry), for scoring

    @property
    def label(self) -> str:
        return f"{self.name}/{self.dataset}"

    def _draw(self, split: Split, size: int):
        digest = hashlib.sha256(f"reasoning_gym/{self.dataset}/{self.seed}/{split}".encode()).digest()
        try:
            return _gym().create_dataset(self.dataset, seed=int.from_bytes(digest[:4], "big"), size=size, **self.config)
        except TypeError as e:  # an option the generator's config does not have
            raise ValueError(f"reasoning-gym {self.dataset!r}: bad config {self.config}: {e}") from e

    def examples(self, split: Split) -> list[Example]:
        split = check_split(split)
        source = f"reasoning-gym {self.dataset} with n_{split}={self.counts[split]}"
        return require_examples(self._generated(split), self.name, split, source)

    def _generated(self, split: Split) -> list[Example]:
        """The split's examples, possibly empty (emptiness is checked by `examples`)."""
        if split not in self._cache:
            self._cache[split] = self._generate(split)
        return self._cache[split]

    def _generate(self, split: Split) -> list[Example]:
        n = self.counts[split]
        if n == 0:
            return []
        earlier: tuple[Split, ...] = {"train": (), "valid": ("train",), "test": ("train", "valid")}[split]
        seen = {ex.question for s in earlier for ex in self._generated(s)}
        size = n if split == "train" else n * self.max_tries
        data, out = self._draw(split, size), []
        for entry in data:  # generated lazily, one entry per index
            question = entry["question"]
            if question in seen:
                continue
            if split != "train":
                seen.add(question)
            self._entries[question] = (data, entry)
            out.append(Example(question=question, steps=(), answer=str(entry["answer"])))
            if len(out) == n:
                return out
        raise ValueError(f"reasoning-gym {self.dataset!r}: found only {len(out)} {split} questions not in earlier "
                         f"splits among {size} draws; widen the generator's config or ask for fewer")

    def score(self, prediction: str, example: Example) -> float:
        """The generator's own score_answer for the example's entry (exact match for an example
        this task did not generate)."""
        found = self._entries.get(example.question)
        if found is None:
            return super().score(prediction, example)
        data, entry = found
        return float(data.score_answer(prediction, entry))
