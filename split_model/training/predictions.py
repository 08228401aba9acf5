"""What `split-model predict` leaves behind: `predictions.jsonl`, every example once, in dataset order.

`SplitModelModule.predict_step` returns one dict per example (question, prediction, answer,
score). Under DDP each process predicts only its share of the examples, and a sampler may
pad the shares to equal length by repeating examples (Lightning's own predict sampler does
not, a `DistributedSampler` given with `use_distributed_sampler=False` does). The
`PredictionWriter` callback gathers every process's rows with their dataset indices on rank
0, keeps one row per index, orders them by index and writes the file whole under a
temporary name before renaming it, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from split_model import files

FILENAME = "predictions.jsonl"


def indexed_rows(batches: Sequence[Sequence[dict]],
                 batch_indices: Sequence[Sequence[int]] | None) -> list[tuple[int, dict]]:
    """(dataset index, row) for every row of `batches`, in the order predicted.

    `batch_indices[b]` lists the dataset indices of batch b's rows. None or empty (Lightning
    could not tell them) numbers the rows 0, 1, ... in the order predicted, which is dataset
    order only in a single process with an unshuffled loader.
    """
    if not batch_indices:
        return list(enumerate(row for batch in batches for row in batch))
    if len(batch_indices) != len(batches):
        raise ValueError(f"{len(batches)} batches of predictions but indices of {len(batch_indices)} batches")
    pairs = []
    for b, (batch, indices) in enumerate(zip(batches, batch_indices)):
        if len(batch) != len(indices):
            raise ValueError(f"batch {b}: {len(batch)} predictions for {len(indices)} examples; "
                             "predict_step must return one row per example")
        pairs += zip((int(i) for i in indices), batch)
    return pairs


def merge_predictions(parts: Iterable[Iterable[tuple[int, dict]]]) -> list[dict]:
    """One row per dataset index, ordered by index.

    `parts` holds each process's (index, row) pairs. An index seen more than once (a padding
    repeat) keeps its first row, taking the parts in order.
    """
    rows: dict[int, dict] = {}
    for part in parts:
        for index, row in part:
            rows.setdefault(index, row)
    return [rows[i] for i in sorted(rows)]


def save_predictions(rows: Sequence[dict], directory: str | Path, filename: str = FILENAME) -> Path:
    """Write `rows` as JSON lines to `directory/filename` and print how many and their mean score.

    The file is written whole under a temporary name and renamed (`split_model.files`), so the
    target is always either the previous file or the complete new one. Returns the path written.
    """
    out = files.write_text(Path(directory) / filename, "".join(json.dumps(r) + "\n" for r in rows))
    acc = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
    print(f"{len(rows)} predictions written to {out}; accuracy {acc:.4f}", flush=True)
    return out


class PredictionWriter(BasePredictionWriter):
    """At the end of `Trainer.predict`, write every example's row once, in dataset order.

    Add it to the trainer's callbacks (`attach_prediction_writer` adds one if none is there).
    The file goes to `directory` (default: the trainer's `default_root_dir`) on global rank 0,
    which also prints the summary line; nothing is written when there are no rows. Works in one
    process and under any strategy whose processes form the default `torch.distributed` group
    (DDP over gloo or nccl). With several processes, every rank returns from `predict` only after
    rank 0 has written the file, and a failure on any rank (rows that do not match their
    examples, a failed write) raises a RuntimeError on every rank. One predict dataloader only.

    Args:
        directory: where to write `filename`; None: the trainer's `default_root_dir`.
        filename: the file's name.
    """

    def __init__(self, directory: str | Path | None = None, filename: str = FILENAME):
        super().__init__(write_interval="epoch")
        self.directory, self.filename = directory, filename
        self.path: Path | None = None  # the file the last predict wrote (on global rank 0)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        self.path = None
        try:
            local, error = self._local_rows(trainer, predictions, batch_indices), None
        except Exception as e:  # sent to rank 0 rather than raised here, where rank 0 would wait for it
            local, error = [], f"rank {trainer.global_rank}: {type(e).__name__}: {e}"
        parts, errors = self._gather(trainer, local, error)
        if trainer.is_global_zero and not errors:
            try:
                rows = merge_predictions(parts)
                if rows:
                    self.path = save_predictions(rows, self.directory or trainer.default_root_dir, self.filename)
            except Exception as e:
                errors = [f"rank 0: {type(e).__name__}: {e}"]
        if trainer.world_size > 1:
            shared = [errors]
            dist.broadcast_object_list(shared, src=0)
            errors = shared[0]
        if errors:
            raise RuntimeError(f"{self.filename} not written: " + "; ".join(errors))

    @staticmethod
    def _local_rows(trainer: Trainer, predictions: Sequence[Any],
                    batch_indices: Sequence[Any]) -> list[tuple[int, dict]]:
        """This process's (dataset index, row) pairs."""
        if trainer.predict_loop.num_dataloaders != 1:
            raise ValueError(f"one predict dataloader supported, got {trainer.predict_loop.num_dataloaders}")
        indices = batch_indices[0] if batch_indices else []
        if trainer.world_size > 1 and len(indices) != len(predictions):
            raise ValueError("Lightning could not tell which examples this process predicted (the predict "
                             "dataloader is not a torch DataLoader), so the processes' rows cannot be merged")
        return indexed_rows(predictions, indices)

    @staticmethod
    def _gather(trainer: Trainer, local: list[tuple[int, dict]],
                error: str | None) -> tuple[list[list[tuple[int, dict]]], list[str]]:
        """Every rank's (index, row) pairs, in rank order, and every rank's error, on global rank 0
        (other ranks get empty lists)."""
        if trainer.world_size == 1:
            return [local], [error] if error else []
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{trainer.world_size} processes but no torch.distributed process group: "
                               "PredictionWriter cannot gather their predictions")
        gathered: list | None = [None] * dist.get_world_size() if trainer.is_global_zero else None
        dist.gather_object((local, error), gathered, dst=0)
        gathered = gathered or []
        return [part for part, _ in gathered], [e for _, e in gathered if e]


def attach_prediction_writer(trainer: Trainer) -> PredictionWriter:
    """The trainer's `PredictionWriter`, added to its callbacks if it has none."""
    for callback in trainer.callbacks:
        if isinstance(callback, PredictionWriter):
            return callback
    writer = PredictionWriter()
    trainer.callbacks.append(writer)
    return writer
