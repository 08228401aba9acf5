"""A two-process CPU DDP predict for tests/test_distributed.py (run as a script: Lightning's DDP
launcher starts the second process by running this file again).

A tiny untrained module predicts the 15 test examples in batches of 4, with a PredictionWriter,
twice: with Lightning's own predict sampler (shares of 8 and 7 examples, interleaved), into
WORK_DIR/lightning, then with a torch DistributedSampler given as is (use_distributed_sampler
False), which pads rank 1's share with a repeat of example 0, into WORK_DIR/padded. For each
run every rank writes report_RANK.json in that run's directory: the dataset indices it
predicted (files, not stdout, where the two processes' lines could interleave); rank 0 also
writes questions.json, the test split's questions in dataset order.
Usage: python tests/_ddp_predict.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_data, tiny_memory, tiny_module, tiny_trainer  # noqa: E402

from split_model.training import PredictionWriter, collate  # noqa: E402

N_TEST, BATCH_SIZE = 15, 4


class Recorder(PredictionWriter):
    """A PredictionWriter that also reports which dataset indices this rank predicted."""

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        indices = [int(i) for batch in batch_indices[0] for i in batch]
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "indices": indices,
                  "rows": sum(len(batch) for batch in predictions)}
        (Path(self.directory) / f"report_{trainer.global_rank}.json").write_text(json.dumps(report))
        super().write_on_epoch_end(trainer, pl_module, predictions, batch_indices)


def padded_loader(dm) -> DataLoader:
    """The test split under torch's DistributedSampler, which repeats examples to even the shares."""
    data = dm.datasets["test"]
    return DataLoader(data, batch_size=BATCH_SIZE, sampler=DistributedSampler(data, shuffle=False), collate_fn=collate)


def main(work: Path) -> None:
    torch.set_num_threads(1)
    module = tiny_module(tiny_memory("llama"))
    dm = tiny_data(module, work / "cache", batch_size=BATCH_SIZE, n_test=N_TEST)
    for run in ("lightning", "padded"):
        out = work / run
        out.mkdir(parents=True, exist_ok=True)
        if run == "padded":
            dm.predict_dataloader = lambda: padded_loader(dm)
        trainer = tiny_trainer(work / "root", strategy="ddp", devices=2, callbacks=[Recorder(out)],
                               use_distributed_sampler=run == "lightning")
        trainer.predict(module, datamodule=dm, return_predictions=False)
        if trainer.is_global_zero:
            (out / "questions.json").write_text(json.dumps([e.question for e in dm.datasets["test"].examples]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
