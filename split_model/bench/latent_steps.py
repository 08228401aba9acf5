"""Latent steps at test time: does thinking longer than in training help or hurt?

Three reasoners (`feedback: all`, 2 layers, d=128) learn the shell game answer-only (8 cups,
2 swaps, no labelled steps: everything happens in unlabelled latent steps before the
answer), read by the frozen random BERT of the feedback ablation, with the same seed, data
and budget:
- fixed: always TRAIN_LATENT latent steps;
- sampled: a `Curriculum` draws the count per batch from SAMPLED (inclusive);
- halting: as sampled, with a learned halting head (`reasoner.halting: true`).
Each is then evaluated (exact-match generation on the valid split) with 0..16 latent steps
(for halting: at most that many; the mean number it used is reported too).
Writes results/latent-steps.json and the plot results/latent-steps.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from split_model.bench import log, pyplot, save_figure
from split_model.bench.ablation import in_processes, train_one

TRAIN_LATENT = 4
SAMPLED = (1, 8)
TEST_LATENT = range(0, 17)
# 25,088 distinct games: valid stays unseen. Answer-only, 4 cups and 3 swaps stayed near chance
# (0.31, chance 0.25) in this budget; 8 cups and 2 swaps is learned (0.70, chance 0.125).
TASK = dict(n_items=8, length=2)


def accuracy_by_latent(model, data, counts) -> tuple[dict[int, float], dict[int, float]]:
    """Valid accuracy of `model` with each latent count (the valid split re-encoded each time),
    and with a halting head the mean latent steps it used at each maximum."""
    from lightning.pytorch import Trainer

    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    accuracy, used = {}, {}
    for k in counts:
        model.formatter.latent_steps = k
        data.reformat()
        metrics = evaluator.validate(model, datamodule=data, verbose=False)[0]
        accuracy[k] = round(float(metrics["val/accuracy"]), 4)
        if "val/latent_steps_used" in metrics:
            used[k] = round(float(metrics["val/latent_steps_used"]), 3)
    return accuracy, used


def _worker(job: tuple) -> tuple[str, dict]:
    from split_model.training import Curriculum

    name, kwargs = job
    torch.set_num_threads(1)
    callbacks = (Curriculum([{"start_step": 0, "latent_steps": list(SAMPLED)}], seed=0),) if name != "fixed" else ()
    r = train_one("all", data_steps="none", latent_steps=TRAIN_LATENT, callbacks=callbacks, keep_model=True,
                  halting=name == "halting", **kwargs)
    r["by_latent"], r["steps_used"] = accuracy_by_latent(r.pop("model"), r.pop("data"), TEST_LATENT)
    log(f"{name}: " + " ".join(f"{k}:{v:.2f}" for k, v in r["by_latent"].items()))
    return name, r


def plot(curves: dict[str, dict[int, float]], path: Path, chance: float) -> None:
    plt = pyplot("latent-steps")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    labels = {"fixed": f"trained with {TRAIN_LATENT} latent steps",
              "sampled": f"trained with {SAMPLED[0]}..{SAMPLED[1]} latent steps (sampled per batch)",
              "halting": "sampled, with a halting head (x: the maximum)"}
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=labels[name])
    ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.axvline(TRAIN_LATENT, color="C0", lw=0.6, ls="--")
    ax.axvspan(*SAMPLED, color="C1", alpha=0.08)
    ax.set(xlabel="latent steps at test time", ylabel="valid accuracy (exact match)", ylim=(0, 1.02),
           title=f"Shell game, {TASK['n_items']} cups, {TASK['length']} swaps, answer only")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def run(args) -> dict:
    torch.set_num_threads(1)
    steps, batch, n_train, n_valid = (20, 32, 256, 64) if args.quick else (2000, 64, 5000, 500)
    with tempfile.TemporaryDirectory() as cache:
        common = dict(steps=steps, batch_size=batch, n_train=n_train, n_valid=n_valid, cache_dir=cache, **TASK)
        log(f"{steps} steps of batch {batch} per model; evaluating with {TEST_LATENT.start}..{TEST_LATENT.stop - 1} latent steps")
        train_one("all", data_steps="none", latent_steps=TRAIN_LATENT, **{**common, "steps": 1})  # build the cache once
        results = in_processes(_worker, [("halting", common), ("sampled", common), ("fixed", common)], 2)
    curves = {name: results[name]["by_latent"] for name in ("fixed", "sampled", "halting")}
    chance = round(1 / TASK["n_items"], 4)
    png = Path(args.out_dir) / ("latent-steps-quick.png" if args.quick else "latent-steps.png")
    plot(curves, png, chance)
    log(f"wrote {png}")

    def beyond(name: str, trained_max: int) -> dict:
        curve = curves[name]
        at_max = curve[trained_max]
        after = [curve[k] for k in TEST_LATENT if k > trained_max]
        return {"at_training_max": at_max, "min_beyond": min(after), "mean_beyond": round(sum(after) / len(after), 4)}

    return {
        "accuracy_by_latent_steps": {name: {str(k): v for k, v in c.items()} for name, c in curves.items()},
        "beyond_training": {"fixed": beyond("fixed", TRAIN_LATENT), "sampled": beyond("sampled", SAMPLED[1]),
                            "halting": beyond("halting", SAMPLED[1])},
        "halting_mean_latent_steps_used": {str(k): v for k, v in results["halting"]["steps_used"].items()},
        "train_latent_steps": {"fixed": TRAIN_LATENT, "sampled": list(SAMPLED), "halting": list(SAMPLED)},
        "task": f"state_tracking answer-only ({TASK['n_items']} cups, {TASK['length']} swaps, unlabelled latent steps "
                "before the answer)",
        "n_train": n_train,
        "chance": chance,
        "optimizer_steps": steps,
        "batch_size": batch,
        "train_seconds": {name: results[name]["train_seconds"] for name in curves},
        "plot": str(png),
    }
