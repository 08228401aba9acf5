"""Quickstart: wall time and validation accuracy of `split-model fit --config configs/quickstart.yaml`.

Runs the README's main job in a subprocess exactly as a user would (first run included:
the memory cache is placed in a fresh directory so the backbone really reads the data),
and reports the reasoner's trainable and the memory's frozen parameter counts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from split_model.bench import log

ROOT = Path(__file__).resolve().parents[2]


def run(args) -> dict:
    cmd = [sys.executable, "-m", "split_model.cli", "fit", "--config", "configs/quickstart.yaml"]
    if args.quick:
        cmd += ["--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
                "--data.task.init_args.n_train", "256", "--data.task.init_args.n_valid", "64"]
    with tempfile.TemporaryDirectory() as cache:
        cmd += ["--data.cache_dir", cache]
        log("running " + " ".join(cmd[1:]))
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.time() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"quickstart failed (exit {proc.returncode}):\n{out[-3000:]}")
    acc = re.search(r"validation accuracy: ([0-9.]+) \((\d+) examples\)", out)
    # The last count: fit prints one when the model is built and, with output_vocab: task,
    # another once the embedding keeps only the task's rows (the model that trains).
    counts = re.findall(r"reasoner ([0-9,]+) trainable parameters.*memory ([0-9,]+) frozen parameters", out)
    params = counts[-1] if counts else None
    if not acc or not params:
        raise RuntimeError(f"quickstart output lacks the accuracy or parameter lines:\n{out[-3000:]}")
    return {
        "val_accuracy": float(acc.group(1)),
        "val_examples": int(acc.group(2)),
        "fit_seconds": round(seconds, 1),
        "trainable_params": int(params[0].replace(",", "")),
        "frozen_params": int(params[1].replace(",", "")),
        "config": "configs/quickstart.yaml",
    }
