"""The shell game: track a ball under cups through a sequence of swaps.

A synthetic state-tracking task generated in-process, useful because its
difficulty is set exactly by `length` and every intermediate state is known:

    question: "ball at 2. swap 0 3. swap 1 2. where is the ball?"
    steps:    ("2", "1")      # position after each swap
    answer:   "1"

Cups are single digits separated by spaces, so any tokenizer gives each cup its
own token. Each split has its own seeded generator; valid and test never repeat
a train question (and test never repeats a valid one), which matters when the
space of questions is small.
"""

from __future__ import annotations

import hashlib
import random

from split_model.tasks.base import Example, Split, Task, check_split, require_examples


def split_rng(seed: int, split: str) -> random.Random:
    """A generator seeded from (seed, split), identical in every process.

    Built from sha256 rather than hash(), whose value for strings changes
    between Python processes.
    """
    digest = hashlib.sha256(f"state_tracking/{seed}/{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def swap(position: int, a: int, b: int) -> int:
    """Where the ball is after swapping cups `a` and `b`."""
    if position == a:
        return b
    if position == b:
        return a
    return position


class StateTracking(Task):
    """Shell game: a ball under one of `n_items` cups, then `length` swaps."""

    name = "state_tracking"

    def __init__(
        self,
        n_items: int = 5,
        length: int = 8,
        n_train: int = 20000,
        n_valid: int = 500,
        n_test: int = 500,
        seed: int = 0,
    ) -> None:
        """Configure the generator.

        Args:
            n_items: number of cups, 2 to 10 (cups are written as single digits).
            length: number of swaps per question, and so of reasoning steps (>= 1).
            n_train: number of train examples (duplicates allowed).
            n_valid: number of valid examples (distinct, none seen in train).
            n_test: number of test examples (distinct, none seen in train or valid).
            seed: base seed; each split derives its own generator from it.
        """
        if not 2 <= n_items <= 10:
            raise ValueError(f"n_items must be between 2 and 10 (single-digit cups), got {n_items}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        for arg, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        self.n_items = n_items
        self.length = length
        self.counts: dict[Split, int] = {"train": n_train, "valid": n_valid, "test": n_test}
        self.seed = seed
        self._cache: dict[Split, list[Example]] = {}

    @property
    def n_questions(self) -> int:
        """How many distinct questions exist (start cup times ordered swap pairs)."""
        return self.n_items * (self.n_items * (self.n_items - 1)) ** self.length

    def examples(self, split: Split) -> list[Example]:
        split = check_split(split)
        source = f"generated with n_{split}={self.counts[split]}"
        return require_examples(self._generated(split), self.name, split, source)

    def sample(self, rng: random.Random) -> Example:
        """Draw one random game."""
        position = rng.randrange(self.n_items)
        parts = [f"ball at {position}."]
        steps = []
        for _ in range(self.length):
            a, b = rng.sample(range(self.n_items), 2)
            position = swap(position, a, b)
            parts.append(f"swap {a} {b}.")
            steps.append(str(position))
        parts.append("where is the ball?")
        return Example(question=" ".join(parts), steps=tuple(steps), answer=steps[-1])

    def _generated(self, split: Split) -> list[Example]:
        """The split's examples, possibly empty (emptiness is checked by `examples`)."""
        if split not in self._cache:
            self._cache[split] = self._generate(split)
        return self._cache[split]

    def _generate(self, split: Split) -> list[Example]:
        rng = split_rng(self.seed, split)
        n = self.counts[split]
        if split == "train":
            return [self.sample(rng) for _ in range(n)]
        # Train is built first so held-out splits can exclude its questions.
        earlier: tuple[Split, ...] = ("train",) if split == "valid" else ("train", "valid")
        seen = {ex.question for s in earlier for ex in self._generated(s)}
        return self._sample_unseen(rng, n, seen, split)

    def _sample_unseen(self, rng: random.Random, n: int, seen: set[str], split: Split) -> list[Example]:
        """Draw `n` distinct examples whose questions are not in `seen`."""
        seen = set(seen)
        out: list[Example] = []
        max_draws = 100 * n + 1000
        for _ in range(max_draws):
            if len(out) == n:
                break
            example = self.sample(rng)
            if example.question not in seen:
                seen.add(example.question)
                out.append(example)
        if len(out) < n:
            raise ValueError(
                f"task {self.name!r}: found only {len(out)} of n_{split}={n} new {split} questions "
                f"in {max_draws} draws; n_items={self.n_items}, length={self.length} allow at most "
                f"{self.n_questions} distinct questions; lower n_train or n_{split}, or raise length"
            )
        return out
