"""Feedback ablation: does neuralese feedback buy state tracking?

The shell game at a length where a plain small decoder fails: the ball's position after
each swap is the label of one latent step, and the answer is the final position. The same
frozen random memory reads the swaps; the three reasoners differ only in `feedback`
(none / last / all), with the same width, depth, data, seed and optimiser-step budget.
Accuracy is exact match of the generated answer on the valid split.
"""

from __future__ import annotations

import os
import time

import torch
from lightning.pytorch.callbacks import Callback

from split_model.bench import log

MEMORY = {  # a frozen random BERT: absolute positions, byte tokens, cheap to run
    "model_type": "bert", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
}


class Progress(Callback):
    """A loss line on stderr every `every` steps; stops training if the bench process is gone."""

    def __init__(self, every: int, label: str):
        self.every, self.label, self.parent = every, label, os.getppid()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.getppid() != self.parent:  # the bench was stopped: don't train on as an orphan
            raise SystemExit("feedback-ablation: parent process gone")
        step = trainer.global_step
        if step % self.every == 0:
            m = trainer.callback_metrics
            log(f"{self.label} step {step}: loss {float(m['train/loss']):.3f}, "
                f"teacher-forced answer acc {float(m['train/answer_acc']):.2f}")


class Throughput(Callback):
    """Steady-state training throughput: wall time from the start of step `skip` (after
    warm-up, graph capture and the first data loads) to the end of the last step."""

    def __init__(self, skip: int):
        self.skip, self.start, self.steps, self.seconds = skip, None, 0, None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.start = self._now(pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.start is not None:
            self.steps, self.seconds = trainer.global_step - self.skip, self._now(pl_module) - self.start


def train_one(feedback: str, *, length: int, steps: int, batch_size: int, n_train: int, n_valid: int, cache_dir: str,
              lr: float = 2e-3, n_items: int = 5, training_mode: str = "sequential", jacobi_passes: int = 4,
              data_steps: str = "latent", latent_steps: int = 0, callbacks: tuple = (), accelerator: str = "cpu",
              keep_model: bool = False, halting: bool = False) -> dict:
    """Train one reasoner on the shell game with the frozen random BERT memory; its valid
    accuracy (exact-match generation), wall time and examples/s of training (Lightning's
    loop included; steady state after the first 10% of steps, at most 20), the validation
    metrics, and the model itself with keep_model."""
    from lightning.pytorch import Trainer, seed_everything

    from split_model.memory import HFMemory
    from split_model.reasoner import ReasonerConfig
    from split_model.tasks import StateTracking
    from split_model.training import SplitModelModule, TaskDataModule

    seed_everything(0, verbose=False)
    memory = HFMemory(config=MEMORY, seed=0)
    cfg = ReasonerConfig(d_model=128, n_layers=2, n_heads=4, feedback=feedback, embed_rank=32, halting=halting)
    model = SplitModelModule(memory=memory, reasoner=cfg, lr=lr, warmup_steps=50, training_mode=training_mode,
                             jacobi_passes=jacobi_passes)
    task = StateTracking(n_items=n_items, length=length, n_train=n_train, n_valid=n_valid, n_test=16)
    data = TaskDataModule(task, steps=data_steps, latent_steps=latent_steps, batch_size=batch_size, cache_dir=cache_dir)
    data.connect(model)
    label = f"feedback={feedback}" if training_mode == "sequential" else f"{training_mode}({jacobi_passes})"
    trainer = Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                      limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
                      callbacks=[Progress(max(1, steps // 10), label), throughput := Throughput(min(20, steps // 10)),
                                 *callbacks])
    start = time.time()
    trainer.fit(model, datamodule=data)
    seconds = time.time() - start
    evaluator = Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = evaluator.validate(model, datamodule=data, verbose=False)[0]
    out = {"accuracy": round(float(metrics["val/accuracy"]), 4), "train_seconds": round(seconds, 1),
           "examples_per_s": round(throughput.steps * batch_size / throughput.seconds, 1) if throughput.steps
                             else round(steps * batch_size / seconds, 1),
           "metrics": {k: round(float(v), 5) for k, v in metrics.items()},
           "trainable_params": sum(p.numel() for p in model.reasoner.parameters())}
    if keep_model:
        out["model"], out["data"] = model, data
    else:
        out["per_step_accuracy"] = per_step_accuracy(model, data, length) if data_steps == "latent" else None
    return out


@torch.no_grad()
def per_step_accuracy(model, data, length: int) -> list[float]:
    """Teacher-forced accuracy of each latent step's state on the valid split: how far
    into the game a mode keeps track of the ball."""
    model.eval()
    right, total = torch.zeros(length), 0
    for batch in data.val_dataloader():
        mem = model.reasoner.encode_memory(batch["mem_states"], batch["mem_mask"])
        logits = model.reasoner(batch["tokens"], batch["latent"], mem)
        right += (logits.argmax(-1) == batch["labels"])[:, :length].float().sum(0)
        total += batch["tokens"].shape[0]
    return [round(float(r) / total, 3) for r in right]


def _worker(job: tuple) -> tuple[str, dict]:
    mode, kwargs = job
    torch.set_num_threads(1)
    return mode, train_one(mode, **kwargs)


def processes(at_most: int) -> int:
    """How many training processes to run at once: at most `at_most`, and no more than the cores."""
    return max(1, min(at_most, os.cpu_count() or 1))


def in_processes(worker, jobs: list[tuple], at_most: int) -> dict:
    """{name: result} of `worker(job)` -> (name, result) for every job, in spawned processes,
    `processes(at_most)` at a time (each worker sets its own threads). One process per job
    gives every job the same conditions; list the slowest jobs first."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(processes(at_most)) as pool:
        return dict(pool.map(worker, jobs, chunksize=1))


def run(args) -> dict:
    import tempfile

    torch.set_num_threads(1)  # as in every worker
    length, steps, batch, n_train, n_valid = (4, 30, 32, 256, 64) if args.quick else (6, 2500, 128, 50000, 500)
    workers = processes(3)
    with tempfile.TemporaryDirectory() as cache:
        common = dict(length=length, steps=steps, batch_size=batch, n_train=n_train, n_valid=n_valid, cache_dir=cache)
        log(f"{steps} steps of batch {batch} per mode, shell game of {length} swaps, {workers} processes")
        # Build the memory cache once, before the workers race for it.
        train_one("none", **{**common, "steps": 1})
        results = in_processes(_worker, [(mode, common) for mode in ("all", "last", "none")], 3)
    for mode in ("none", "last", "all"):
        log(f"feedback={mode}: accuracy {results[mode]['accuracy']}")
    return {
        **{m: results[m]["accuracy"] for m in ("none", "last", "all")},
        "task": "state_tracking (shell game, 5 cups, one labelled latent step per swap)",
        "length": length,
        "chance": 0.2,
        "optimizer_steps": steps,
        "bptt_steps": None,
        "gradient_horizon": "the whole sequence in every mode (no truncation): with feedback by backprop through "
                            "every step; with none through self-attention over every step",
        "weight_decay": "projection weights only (not gates, positions, latent input, norms, mix, embedding)",
        "batch_size": batch,
        "memory": MEMORY,
        "trainable_params": {m: results[m]["trainable_params"] for m in ("none", "last", "all")},
        "train_seconds": {m: results[m]["train_seconds"] for m in ("none", "last", "all")},
        "per_step_accuracy": {m: results[m]["per_step_accuracy"] for m in ("none", "last", "all")},
    }
