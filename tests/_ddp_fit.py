"""A two-process CPU DDP fit for tests/test_distributed.py (run as a script: Lightning's DDP
launcher starts the second process by running this file again).

Each rank writes WORK_DIR/report_RANK.json: how often its memory ran, and what DDP holds
(files, not stdout, where the two processes' lines could interleave).
Usage: python tests/_ddp_fit.py WORK_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_data, tiny_memory, tiny_reasoner_config, tiny_trainer  # noqa: E402

from split_model.training import SplitModelModule  # noqa: E402
from split_model.training.distributed import ignore_frozen_memory  # noqa: E402


class Module(SplitModelModule):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        ignore_frozen_memory(self)

    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model
        held = {id(p) for p in ddp._module_parameters}
        self.report = {"rank": self.global_rank, "world_size": self.trainer.world_size,
                       "ddp_holds_memory_params": any(id(p) in held for p in self.memory.parameters()),
                       "ddp_memory_buffers": sum(n.startswith("memory.") for n in ddp.named_module_buffers)}


def main(work: Path) -> None:
    torch.set_num_threads(1)
    memory = tiny_memory("bert")
    module = Module(memory=memory, reasoner=tiny_reasoner_config(), lr=3e-3, warmup_steps=2)
    calls: list = []
    forward = memory.model.forward
    memory.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    dm = tiny_data(module, work / "cache")
    trainer = tiny_trainer(work / "root", strategy="ddp", devices=2, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    report = {**module.report, "memory_calls": len(calls)}
    (work / f"report_{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
