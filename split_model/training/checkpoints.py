"""Checkpoints written atomically, and the callback that writes them for resuming.

Lightning's default writer streams the file into place (through a temporary file in the
system's temp directory, moved across file systems by copying), so a process killed while
saving can leave a truncated `last.ckpt` that `--ckpt_path last` then picks. Here the file
is written next to its destination under a unique hidden name, synced, and renamed.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from split_model import files


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are all-or-nothing (local and shared file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with files.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def use_atomic_checkpoints(strategy) -> None:
    """Make `strategy` write checkpoints atomically, unless it was given a writer of its own
    (a plugin in the Trainer's config is left alone)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# What `split-model fit` checkpoints by default (the CLI's `checkpoint` section).
CHECKPOINT_DEFAULTS = {
    "save_last": True,  # last.ckpt: what `--ckpt_path last` resumes from
    "every_n_train_steps": 200,  # a killed run loses at most this many steps
    "save_top_k": 0,  # no extra copies; set monitor/mode/save_top_k to keep the best as well
}


def default_checkpoint_dir(root: str) -> str:
    """Where `split-model fit` keeps checkpoints: one folder per run root, so that
    `--ckpt_path last` finds the previous attempt's last.ckpt (a logger's version folders
    change at every start)."""
    return f"{root.rstrip('/')}/checkpoints"

