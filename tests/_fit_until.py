"""`split-model fit` of configs/debug.yaml, shortened, in a process of its own for
tests/test_reliability.py: with KILL_AT > 0 the process kills itself with SIGKILL after that
optimizer step (no cleanup, no final checkpoint, like a crash or an out-of-memory kill).
At the end of a run it writes ROOT/final.json: the validation metrics and a hash of the
trained weights.

Usage: python tests/_fit_until.py ROOT KILL_AT [extra fit arguments...]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/debug.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.max_steps", "20",
            "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1",
            "--data.cache_dir", str(root.parent / "cache"), "--data.task.init_args.n_train", "48",
            "--data.task.init_args.n_valid", "16", "--data.task.init_args.n_test", "16", "--data.batch_size", "8",
            "--checkpoint.every_n_train_steps", "5", *extra]


def main(root: Path, kill_at: int, extra: list[str]) -> None:
    torch.set_num_threads(1)
    from split_model.cli import dispatch
    from split_model.training import SplitModelModule

    if kill_at > 0:
        def die(self, outputs, batch, batch_idx):
            if self.trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        SplitModelModule.on_train_batch_end = die
    cli = dispatch(fit_args(root, *extra))
    weights = b"".join(t.detach().numpy().tobytes() for t in cli.model.reasoner.state_dict().values())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    (root / "final.json").write_text(json.dumps({
        "metrics": metrics, "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "global_step": cli.trainer.global_step}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
