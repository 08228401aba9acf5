"""Training modes: what Jacobi passes and feedback-off training buy at 16 recurrent steps.

The shell game with 5 cups and 16 swaps, one labelled latent step per swap (so the reasoner
runs 16 latent steps plus the answer), read by the frozen random BERT of the feedback
ablation (with 3 cups no mode learns even the first swap at these budgets: a swap moves the
ball 2 times in 3, so "it stays" is no better than chance and nothing rewards carrying the
state forward; with 5 cups that partial answer is right 3 times in 5 and learning proceeds
swap by swap); a
2-layer d=128 reasoner with `feedback: all`. The same seed, data and number of training
examples for every mode: sequential (the exact recurrence), jacobi with K = 2, 4, 8 parallel
passes, and off (feedback disabled, one parallel pass). Reported per mode: training
throughput (examples/s, Lightning's loop included, steady state after warm-up), exact-match
accuracy of generation on the valid split (always the exact recurrence), teacher-forced
accuracy of each latent step's state (and their mean, which shows partial learning while
the final answer is still at chance), and for jacobi the relative gap between its K-pass
logits and the exact ones on the valid split.

On CPU two modes train at a time, one thread each (as the feedback ablation does), and
throughput comes from those runs. On CUDA, where concurrent runs would share the GPU
unevenly, throughput is measured first with each mode training alone for a short run; then
the five modes train to the end concurrently, one process each, for the accuracies.
"""

from __future__ import annotations

import tempfile

import torch

from split_model.bench import log
from split_model.bench.ablation import in_processes, train_one

MODES = {"sequential": ("sequential", 1), "jacobi_2": ("jacobi", 2), "jacobi_4": ("jacobi", 4),
         "jacobi_8": ("jacobi", 8), "off": ("off", 1)}
LENGTH = 16
CUPS = 5
TIMED_STEPS = 200  # CUDA: the short run of each mode alone that measures its throughput


def _worker(job: tuple) -> tuple[str, dict]:
    name, kwargs = job
    torch.set_num_threads(1)
    mode, passes = MODES[name]
    return name, train_one("all", training_mode=mode, jacobi_passes=passes, **kwargs)


def run(args) -> dict:
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if args.quick:
        steps, batch, n_train, n_valid = 20, 32, 256, 64
    else:
        steps, batch, n_train, n_valid = (6000, 128, 100000, 500) if cuda else (1000, 64, 20000, 500)
    steps = args.steps or steps
    order = ("jacobi_8", "sequential", "jacobi_4", "jacobi_2", "off")  # slowest first
    with tempfile.TemporaryDirectory() as cache:
        common = dict(length=LENGTH, steps=steps, batch_size=batch, n_train=n_train, n_valid=n_valid, cache_dir=cache,
                      n_items=CUPS, accelerator="gpu" if cuda else "cpu")
        log(f"{steps} steps of batch {batch} per mode, shell game of {LENGTH} swaps ({CUPS} cups), on {args.device}")
        train_one("all", **{**common, "steps": 1})  # build the memory cache once, before the workers race for it
        if cuda:
            timed_steps = min(steps, TIMED_STEPS)
            timed = dict(map(_worker, [(name, {**common, "steps": timed_steps, "n_valid": 64}) for name in order]))
            for name in order:
                log(f"{name} alone: {timed[name]['examples_per_s']} examples/s")
            results = in_processes(_worker, [(name, common) for name in order], len(order))
            for name in order:
                results[name]["examples_per_s"] = timed[name]["examples_per_s"]
        else:
            results = in_processes(_worker, [(name, common) for name in order], 2)
    modes = {}
    for name in MODES:
        r = results[name]
        modes[name] = {"examples_per_s": r["examples_per_s"], "accuracy": r["accuracy"],
                       "state_accuracy": round(sum(r["per_step_accuracy"]) / LENGTH, 4),
                       "train_seconds": r["train_seconds"], "per_step_accuracy": r["per_step_accuracy"]}
        if "val/jacobi_gap" in r["metrics"]:
            modes[name]["exact_gap"] = r["metrics"]["val/jacobi_gap"]
        log(f"{name}: {modes[name]}")
    seq = modes["sequential"]["examples_per_s"]
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": LENGTH,
        "modes": modes,
        "speedup_over_sequential": {k: round(v["examples_per_s"] / seq, 2) for k, v in modes.items()},
        "task": f"state_tracking (shell game, {CUPS} cups, {LENGTH} swaps, one labelled latent step per swap)",
        "optimizer_steps": steps,
        "batch_size": batch,
        "examples_per_mode": steps * batch,
        "examples_per_s": (f"each mode alone, {min(steps, TIMED_STEPS)} steps, steady state after warm-up; the "
                           "accuracies come from full runs of the five modes side by side") if cuda else
                          "from the full runs, two modes side by side (one CPU thread each), steady state after warm-up",
        "reasoner": "d_model 128, 2 layers, 4 heads, feedback all, embed_rank 32",
        "exact_gap": "||K-pass logits - exact logits|| / ||exact logits|| over scored valid positions",
        "per_step_accuracy": "teacher-forced accuracy of the ball's position after each swap, on the valid split",
        "state_accuracy": "the mean of per_step_accuracy",
        "chance": round(1 / CUPS, 4),
    }
