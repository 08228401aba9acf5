"""Lightning data module: a task's examples, their cached memory states, and batches.

The memory is frozen, so its states for each split are computed once (in `prepare_data`,
on one process) and read back memory-mapped from disk in every epoch: training never runs
the memory backbone. The module learns which backbone to use through `connect(model)`,
because that is known only once the model exists.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from split_model.memory import CachedStates, HFMemory, MemoryCache, cache_root
from split_model.tasks import Example, Split, Task
from split_model.training.format import Formatter, Sequence, StepsMode

_STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "valid"),
    "validate": ("valid",),
    "test": ("test",),
    "predict": ("test",),
}


class TaskDataset(Dataset):
    """One split: examples, their sequences and their cached memory states."""

    def __init__(self, examples: list[Example], states: CachedStates, formatter: Formatter):
        self.examples = [formatter.canonical(e) for e in examples]
        self.sequences = [formatter.encode(e) for e in examples]
        self.states = states

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Sequence, Example]:
        return self.states.row(i), self.sequences[i], self.examples[i]


def collate(items: list[tuple[torch.Tensor, Sequence, Example]]) -> dict:
    """Right-pads memory states (B, N, S, D) and step sequences (B, T)."""
    b = len(items)
    n = max(s.shape[0] for s, _, _ in items)
    t = max(len(q.tokens) for _, q, _ in items)
    first = items[0][0]
    mem = torch.zeros(b, n, *first.shape[1:], dtype=first.dtype)
    mem_mask = torch.zeros(b, n, dtype=torch.bool)
    tokens = torch.zeros(b, t, dtype=torch.long)
    latent = torch.zeros(b, t, dtype=torch.bool)
    labels = torch.full((b, t), -100, dtype=torch.long)
    answer = torch.zeros(b, t, dtype=torch.bool)
    for i, (states, seq, _) in enumerate(items):
        mem[i, : states.shape[0]] = states
        mem_mask[i, : states.shape[0]] = True
        k = len(seq.tokens)
        tokens[i, :k] = torch.tensor(seq.tokens)
        latent[i, :k] = torch.tensor(seq.latent)
        labels[i, :k] = torch.tensor(seq.labels)
        answer[i, :k] = torch.tensor(seq.answer)
    return {
        "mem_states": mem, "mem_mask": mem_mask, "tokens": tokens, "latent": latent, "labels": labels,
        "answer_mask": answer, "n_latent": torch.tensor([q.n_latent for _, q, _ in items]),
        "examples": Examples([e for _, _, e in items]),
    }


class Examples:
    """The batch's examples, opaque to Lightning's device transfer (which rejects frozen dataclasses)."""

    def __init__(self, items: list[Example]):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.items[i]


class TaskDataModule(LightningDataModule):
    """Batches of a task for the split model.

    Args:
        task: the task (class_path/init_args), e.g. split_model.tasks.StateTracking.
        steps: how reasoning steps are trained: text (written out before the answer),
            latent (one labelled latent step each), none (answer only).
        latent_steps: extra unlabelled latent steps ("continuous thoughts") before the answer.
        batch_size: examples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        cache_dir: where memory states are cached; default $SPLIT_MODEL_CACHE/memory or
            ~/.cache/split_model/memory.
    """

    def __init__(
        self,
        task: Task,
        steps: StepsMode = "text",
        latent_steps: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.task, self.steps, self.latent_steps = task, steps, latent_steps
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "memory"
        self.memory: HFMemory | None = None
        self.formatter: Formatter | None = None
        self.datasets: dict[str, TaskDataset] = {}

    def connect(self, model) -> None:
        """Bind to the model's memory backbone; hand the model this data's formatter."""
        self.memory = model.memory
        self.formatter = Formatter(model.memory.tokenizer, self.steps, self.latent_steps)
        model.connect_data(self.formatter, self.task)

    def _cache(self) -> MemoryCache:
        if self.memory is None:
            raise RuntimeError("TaskDataModule.connect(model) must be called before the data is prepared")
        return MemoryCache(self.cache_dir, self.memory)

    def _split_states(self, split: Split) -> CachedStates:
        examples = self.task.examples(split)
        return self._cache().get([e.question for e in examples], desc=f"{self.task.name}/{split}")

    def prepare_data(self) -> None:
        for split in _STAGE_SPLITS[self._stage()]:
            self._split_states(split)

    def _stage(self) -> str:
        fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        return str(getattr(fn, "value", fn) or "fit")

    def setup(self, stage: str) -> None:
        for split in _STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = TaskDataset(self.task.examples(split), self._split_states(split), self.formatter)
        if "train" in self.datasets:
            counts = Counter(s.n_latent for s in self.datasets["train"].sequences)
            self.formatter.default_latent = counts.most_common(1)[0][0]

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def target_token_ids(self) -> list[int]:
        """Every token id the train split's labels use (the task's output vocabulary)."""
        if "train" not in self.datasets:
            raise RuntimeError("target_token_ids() needs the train split: call setup('fit') first")
        ids = {t for s in self.datasets["train"].sequences for t in s.labels if t >= 0}
        return sorted(ids | {self.formatter.tok.eos_id})

    def max_target_tokens(self) -> int:
        """Longest answer-side sequence in the loaded splits: the generation budget."""
        return max(len(s.labels) - s.n_latent for d in self.datasets.values() for s in d.sequences)
