"""Lightning data module: a task's examples, their cached memory states, and batches.

The memory is frozen, so its states for each split are computed once (in `prepare_data`,
on the trainer's device) and read back memory-mapped from disk in every epoch: training
never runs the memory backbone. The module learns which backbone to use through
`connect(model)`, because that is known only once the model exists.

Under DDP, Lightning (2.6) runs `prepare_data` on local rank 0 of each node, inside a
barrier without a timeout, then `setup` on every rank; in `setup` the other ranks never
encode: they wait for rank 0's cache entry to appear on disk.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from split_model.memory import CachedStates, EncodeDtype, HFMemory, MemoryCache, cache_root
from split_model.tasks import Example, Split, Task
from split_model.training.format import IGNORE, Formatter, Sequence, StepsMode, StepToken

_STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "valid"),
    "validate": ("valid",),
    "test": ("test",),
    "predict": ("test",),
}


class Item(NamedTuple):
    """One example as the loader hands it to `collate`."""

    states: torch.Tensor  # (N, S, D) float32 memory states
    steps: torch.Tensor  # (T, 4 + W) int64 per position: token, latent, label, answer, then W set labels
    n_latent: int
    example: Example
    evidence: torch.Tensor | None = None  # (E, 2) int64 (position, memory state) pairs; see evidence_pairs


class TaskDataset(Dataset):
    """One split: examples, their sequences and their cached memory states. `spans`: per
    example, the characters each memory state reads (`HFMemory.state_spans`), where the
    examples name their steps' evidence."""

    def __init__(self, examples: list[Example], states: CachedStates, formatter: Formatter,
                 spans: list[list[tuple[int, int]]] | None = None):
        self.raw = examples
        self.examples = [formatter.canonical(e) for e in examples]
        self.states = states
        self.spans = spans
        self.reformat(formatter)

    def reformat(self, formatter: Formatter) -> None:
        """Encode the examples' step sequences again (after the formatter changed, e.g. a
        curriculum stage). Loader workers already started keep the old copy until the next epoch."""
        self.sequences = [formatter.encode(e) for e in self.raw]
        self._steps = _step_tensors(self.sequences)
        self.evidence = None
        if self.spans is not None:
            self.evidence = [evidence_pairs(q, e.evidence, s)
                             for q, e, s in zip(self.sequences, self.raw, self.spans)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Item:
        evidence = None if self.evidence is None else self.evidence[i]
        return Item(self.states.row(i), self._steps[i], self.sequences[i].n_latent, self.examples[i], evidence)


def evidence_pairs(sequence: Sequence, evidence, spans: list[tuple[int, int]]) -> torch.Tensor | None:
    """(E, 2) int64: each labelled latent step's position in `sequence` with every memory state
    whose characters (`spans`, per state) overlap a span the example names as that step's
    evidence (`Example.evidence`; the k-th labelled latent position is step k, and positions
    past the example's steps, as `fixed_steps` repeats the last, get none). None when the
    example names no evidence."""
    if evidence is None:
        return None
    sets = sequence.label_sets or [()] * len(sequence.tokens)
    labelled = [t for t, (lat, lab, ls) in enumerate(zip(sequence.latent, sequence.labels, sets))
                if lat and (lab != IGNORE or ls)]
    starts = np.array([a for a, _ in spans]), np.array([b for _, b in spans])
    reads = starts[1] > starts[0]  # special tokens read no characters
    pairs = []
    for position, step in zip(labelled, evidence):
        for a, b in step:
            for state in np.flatnonzero(reads & (starts[0] < b) & (starts[1] > a)):
                pairs.append((position, int(state)))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def _step_tensors(sequences: list[Sequence]) -> tuple[torch.Tensor, ...]:
    """A (T_i, 4 + W) int64 tensor per sequence, views of one block: built once, not on every
    batch. W is the largest label set of any position (0 without step_token="set"); a position's
    set fills its first columns, IGNORE the rest."""
    width = max((len(t) for s in sequences if s.label_sets for t in s.label_sets), default=0)
    flat = [[*p, *t, *[IGNORE] * (width - len(t))]
            for s in sequences for p, t in zip(zip(s.tokens, s.latent, s.labels, s.answer),
                                               s.label_sets or [()] * len(s.tokens))]
    block = torch.tensor(flat, dtype=torch.long).reshape(-1, 4 + width)  # (sum T_i, 4 + W)
    return torch.split(block, [len(s.tokens) for s in sequences])


def collate(items: list[Item]) -> dict:
    """Right-pads memory states (B, N, S, D) and step sequences (B, T); with label sets, also
    `label_sets` (B, T, W), IGNORE where a position has fewer or none."""
    mem, mem_mask = _pad([it.states for it in items])  # (B, N, S, D), (B, N)
    width = max(it.steps.shape[1] for it in items)
    steps, real = _pad([_widen(it.steps, width) for it in items])  # (B, T, 4 + W), (B, T)
    tokens, latent, labels, answer = steps[..., :4].permute(2, 0, 1).contiguous()  # 4 x (B, T)
    batch = {
        "mem_states": mem, "mem_mask": mem_mask, "tokens": tokens, "latent": latent.bool(),
        "labels": labels.masked_fill(~real, IGNORE), "answer_mask": answer.bool(),
        "n_latent": torch.tensor([it.n_latent for it in items]), "examples": Examples([it.example for it in items]),
    }
    if width > 4:
        batch["label_sets"] = steps[..., 4:].masked_fill(~real[..., None], IGNORE).contiguous()
    if any(it.evidence is not None for it in items):  # (B, T, N): the memory states each step should read
        evidence = torch.zeros(*tokens.shape, mem_mask.shape[1], dtype=torch.bool)
        for b, it in enumerate(items):
            if it.evidence is not None and len(it.evidence):
                evidence[b, it.evidence[:, 0], it.evidence[:, 1]] = True
        batch["evidence"] = evidence
    return batch


def _widen(steps: torch.Tensor, width: int) -> torch.Tensor:
    """(T, w) step columns -> (T, width), the added set columns IGNORE (splits of different widths)."""
    if steps.shape[1] == width:
        return steps
    return torch.cat([steps, steps.new_full((steps.shape[0], width - steps.shape[1]), IGNORE)], dim=1)


def _pad(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads (L_i, ...) tensors to (B, max L_i, ...); also returns the (B, max L_i) mask of real positions.

    The copies go through numpy: at these sizes a per-row torch copy costs several times more.
    """
    lengths = np.array([len(p) for p in parts])
    width = int(lengths.max())
    out = np.zeros((len(parts), width, *parts[0].shape[1:]), dtype=parts[0].numpy().dtype)
    for i, p in enumerate(parts):
        out[i, : len(p)] = p.numpy()
    return torch.from_numpy(out), torch.from_numpy(np.arange(width) < lengths[:, None])


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


class EpochSampler(Sampler[int]):
    """Indices of a data set in an order fixed by (seed, epoch): epoch e is shuffled the same
    way in every run, and a resumed run can start part-way into an epoch (`resume_at`).
    Lightning calls `set_epoch` at the start of every training epoch."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, first position) for the next pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """The next pass over `epoch` starts at `position` of its order (one pass only)."""
        self._resume = (epoch, position)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose place in the epoch Lightning saves in every
    checkpoint (`state_dict`: the epoch and how many batches it has handed out): a run
    resumed from a checkpoint written part-way through an epoch continues with the next
    batch of the same order, so it trains on exactly what an uninterrupted run would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delivered = 0  # batches handed out in the current epoch (counting any skipped on resume)
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint, for the next pass

    def __iter__(self):
        # Runs at the first batch, after Lightning has set the sampler's epoch.
        start = 0
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            start = self._resume[1]
            self.sampler.resume_at(self.sampler.epoch, start * self.batch_size)
        self._resume, self.delivered = None, start
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.delivered, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise ValueError(f"the checkpoint's data order was shuffled with seed {state['seed']}, this run's with "
                             f"{self.sampler.seed}: resume with the same data.shuffle_seed (or seed_everything)")
        # Written part-way through an epoch: that epoch, when it is run, starts after those batches.
        self._resume = (epoch, batches) if 0 < batches < len(self) else None


class TaskDataModule(LightningDataModule):
    """Batches of a task for the split model.

    Args:
        task: the task (class_path/init_args), e.g. split_model.tasks.StateTracking.
        steps: how reasoning steps are trained: text (written out before the answer),
            latent (one labelled latent step each), none (answer only).
        latent_steps: extra unlabelled latent steps ("continuous thoughts") before the answer.
        step_token: with steps=latent, "whole" (each step must be one token: its label),
            "first" (a step's first token labels its latent step, e.g. the node a hop reaches
            with a Coconut JSON task's steps_as=nodes) or "set" (the first token of each word of
            a step, a set, labels its latent step, e.g. every node reached so far with ProsQA's
            steps_as=reached).
        fixed_steps: with steps=latent, give every example this many labelled latent steps (a
            shorter chain repeats its last step), so evaluation runs the same count on every
            question; None: one per reasoning step, and evaluation runs the most common count.
        batch_size: examples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        cache_dir: where memory states are cached; default $SPLIT_MODEL_CACHE/memory or
            ~/.cache/split_model/memory.
        memory_dtype: precision the memory encodes in: auto (bf16 on a GPU that has it, else
            fp16 on a GPU, fp32 on CPU), float32, bfloat16 or float16. States are stored as fp16.
        tokens_per_batch: padded tokens per batch while the memory encodes a split.
        cache_wait_s: under DDP, how long the ranks that do not encode wait in `setup` for the
            states that rank 0 writes (keep it under the 30-minute collective timeout).
        shuffle_seed: seed of the training order (epoch e is shuffled by (seed, e), so a run
            resumed mid-epoch continues the same order); None: the run's seed_everything value.
    """

    def __init__(
        self,
        task: Task,
        steps: StepsMode = "text",
        latent_steps: int = 0,
        step_token: StepToken = "whole",
        fixed_steps: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        memory_dtype: EncodeDtype = "auto",
        tokens_per_batch: int = 16384,
        cache_wait_s: float = 600.0,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if tokens_per_batch <= 0:
            raise ValueError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
        self.task, self.steps, self.latent_steps = task, steps, latent_steps
        self.step_token, self.fixed_steps = step_token, fixed_steps
        self.batch_size, self.num_workers = batch_size, num_workers
        self.memory_dtype, self.tokens_per_batch, self.cache_wait_s = memory_dtype, tokens_per_batch, cache_wait_s
        self.shuffle_seed = shuffle_seed
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "memory"
        self.memory: HFMemory | None = None
        self.wants_evidence = False  # the connected model has an evidence_loss: batches carry `evidence`
        self.formatter: Formatter | None = None
        self.datasets: dict[str, TaskDataset] = {}

    def connect(self, model) -> None:
        """Bind to the model's memory backbone; hand the model this data's formatter."""
        self.memory = model.memory
        self.wants_evidence = float(getattr(model, "hparams", {}).get("evidence_loss", 0.0)) > 0
        self.formatter = Formatter(model.memory.tokenizer, self.steps, self.latent_steps,
                                   step_token=self.step_token, fixed_steps=self.fixed_steps)
        model.connect_data(self.formatter, self.task)

    def _connected(self) -> None:
        """Connect to the trainer's model if nobody did (a plain `Trainer.fit(model, datamodule=...)`)."""
        if self.memory is None:
            model = getattr(getattr(self, "trainer", None), "lightning_module", None)
            if model is None or not hasattr(model, "connect_data"):
                raise RuntimeError("TaskDataModule.connect(model) must be called before the data is prepared")
            self.connect(model)

    def _cache(self) -> MemoryCache:
        self._connected()
        return MemoryCache(self.cache_dir, self.memory, device=self._device(), dtype=self.memory_dtype,
                           tokens_per_batch=self.tokens_per_batch)

    def _device(self) -> torch.device:
        """Where the memory encodes: the trainer's device, else wherever the backbone is."""
        # Lightning calls prepare_data before it moves the model to its device, so the
        # model's own device would make a GPU run encode on the CPU.
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return self.memory.device

    def _split_states(self, split: Split, build: bool = True) -> CachedStates:
        texts, desc = [e.question for e in self.task.examples(split)], f"{self.task.name}/{split}"
        if build:
            return self._cache().get(texts, desc=desc)
        return self._cache().wait(texts, desc=desc, timeout_s=self.cache_wait_s)

    def prepare_data(self) -> None:
        for split in _STAGE_SPLITS[self._stage()]:
            self._split_states(split)

    def _stage(self) -> str:
        fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        return str(getattr(fn, "value", fn) or "fit")

    def setup(self, stage: str) -> None:
        # Under DDP only the rank that ran prepare_data encodes; the others poll for its
        # entry, because another node may see the rename late (shared file systems), and
        # encoding here, between Lightning's setup barriers, would race their 30-minute timeout.
        build = getattr(self.trainer, "world_size", 1) == 1
        for split in _STAGE_SPLITS[stage]:
            if split not in self.datasets:
                states = self._split_states(split, build)
                examples = self.task.examples(split)
                self.datasets[split] = TaskDataset(examples, states, self.formatter, self._spans(examples, split))
        self._set_default_latent()

    def _spans(self, examples: list[Example], split: Split) -> list[list[tuple[int, int]]] | None:
        """The characters each memory state reads, where the model learns from the steps' evidence
        and the examples name it (None otherwise, or when the memory's tokenizer gives no offsets:
        then no batch carries `evidence`, and a model with `evidence_loss` says so)."""
        if not self.wants_evidence or not any(e.evidence for e in examples):
            return None
        try:
            return self.memory.state_spans([e.question for e in examples], f"{self.task.name}/{split}")
        except ValueError as e:
            warnings.warn(f"the evidence of {self.task.name}/{split} cannot be located in the memory's states "
                          f"({e}); its batches carry none", stacklevel=2)
            return None

    def _set_default_latent(self) -> None:
        """What evaluation may know about an unseen question, from the train split alone: the
        most common latent count and the longest target. Without a loaded train split (validate
        or test from a checkpoint) the model brings them from its checkpoint."""
        if "train" in self.datasets:
            sequences = self.datasets["train"].sequences
            self.formatter.default_latent = Counter(s.n_latent for s in sequences).most_common(1)[0][0]
            self.formatter.max_target = max(len(s.labels) - s.n_latent for s in sequences)
            self.formatter.from_train = True

    def reformat(self) -> None:
        """Re-encode every loaded split with the formatter as it is now (a curriculum changed it)."""
        for data in self.datasets.values():
            data.reformat(self.formatter)
        self._set_default_latent()

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train split, resumable mid-epoch in one process. Under
        several processes Lightning shards them with its DistributedSampler (shuffled by
        epoch); a run resumed there restarts the interrupted epoch."""
        if getattr(self.trainer, "world_size", 1) > 1:
            return self._loader("train", shuffle=True)
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        data = self.datasets["train"]
        return ResumableLoader(data, batch_size=self.batch_size, sampler=EpochSampler(len(data), seed),
                               num_workers=self.num_workers, collate_fn=collate)

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
        return output_token_ids(self.datasets["train"].sequences, self.formatter.tok.eos_id)


def output_token_ids(sequences, eos_id: int) -> list[int]:
    """Every token id that encoded sequences' labels and label sets use, and eos, sorted:
    the output vocabulary of `output_vocab: task`."""
    ids = {t for s in sequences for t in s.labels if t >= 0}
    ids |= {t for s in sequences for ts in s.label_sets or () for t in ts}
    return sorted(ids | {eos_id})

