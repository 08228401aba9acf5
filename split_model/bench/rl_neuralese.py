"""RL of the neuralese: feedback off in supervised training, switched on and shaped by reward.

The shell game at a length where `feedback: none` is far below `all` (results/feedback-ablation.json).
The recipe, end to end, with the frozen random BERT memory of the feedback ablation:
  (a) sft_off: supervised, feedback `all` built but switched off (`training_mode: off`: one
      parallel pass per batch, the gate stays closed);
  (b) the same weights with feedback on: the gate is 0, so the policy starts where (a) ended;
  (c) RL from (b): G answers sampled per question, rewarded by the task's score, group-relative
      policy gradient with a KL penalty to (b). Variants: only the feedback path trainable
      (rl_feedback_only), every reasoner parameter (rl_all_params), and every parameter with
      Gaussian exploration noise on the fed-back vectors (rl_noise).
Reference: sft_all, supervised with feedback `all` from the start, for the same number of
training questions as (a) + (c) together. Control: answer_only_on, (b) trained by supervision
on the answers alone (feedback on, no labels on the latent steps) for RL's questions and steps:
what an outcome-only signal teaches without sampling noise. Accuracy is greedy exact match on
the valid split.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from split_model.bench import log, pyplot, save_figure
from split_model.bench.ablation import MEMORY, Progress, in_processes

LENGTH, N_ITEMS = 6, 5  # the feedback ablation's game: none 0.31, all 1.00 there
RL_VARIANTS = {  # name -> RL settings (learning rate, what is trainable, noise on the fed-back vectors)
    "rl_feedback_only": dict(lr=1e-3, trainable="feedback_only", feedback_noise=0.0),
    "rl_all_params": dict(lr=3e-4, trainable="all", feedback_noise=0.0),
    "rl_noise": dict(lr=3e-4, trainable="all", feedback_noise=0.05),
}


class Rewards(Callback):
    """Every optimizer step's mean sampled reward and KL; a line on stderr every `every` steps."""

    def __init__(self, every: int, label: str):
        self.every, self.label, self.reward, self.kl = every, label, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.reward.append(round(float(m["train/reward"]), 4))
        self.kl.append(round(float(m["train/kl"]), 5))
        if trainer.global_step % self.every == 0:
            recent = self.reward[-self.every:]
            log(f"{self.label} step {trainer.global_step}: reward {sum(recent) / len(recent):.3f} (last {len(recent)} "
                f"steps), kl {self.kl[-1]:.4f}, gate {float(pl_module.reasoner.feedback.openness()):.4f}")


def _train(name: str, settings: dict) -> dict:
    """One model of the recipe; returns its valid accuracy, wall time, examples and curves."""
    from lightning.pytorch import Trainer, seed_everything

    from split_model.memory import HFMemory
    from split_model.reasoner import ReasonerConfig
    from split_model.tasks import StateTracking
    from split_model.training import SplitModelModule, TaskDataModule
    from split_model.training.rl import RLConfig

    s = settings
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    memory = HFMemory(config=MEMORY, seed=0)
    cfg = ReasonerConfig(d_model=128, n_layers=2, n_heads=4, feedback="all", embed_rank=32)
    if name.startswith("rl_"):
        v = RL_VARIANTS[name]
        rl = RLConfig(group_size=s["group_size"], trainable=v["trainable"], feedback_noise=v["feedback_noise"])
        model = SplitModelModule(memory=memory, reasoner=cfg, lr=v["lr"], warmup_steps=20, objective="rl", rl=rl,
                                 init_from=s["init_from"])
        steps, batch = s["rl_steps"], s["rl_batch"]
    elif name == "answer_only_on":
        model = SplitModelModule(memory=memory, reasoner=cfg, lr=RL_VARIANTS["rl_all_params"]["lr"], warmup_steps=20,
                                 init_from=s["init_from"])
        steps, batch = s["rl_steps"], s["rl_batch"]
    else:
        model = SplitModelModule(memory=memory, reasoner=cfg, lr=2e-3, warmup_steps=50,
                                 training_mode="off" if name == "sft_off" else "sequential")
        steps, batch = s["sft_steps"] if name == "sft_off" else s["all_steps"], s["sft_batch"]
    task = StateTracking(n_items=N_ITEMS, length=s["length"], n_train=s["n_train"], n_valid=s["n_valid"], n_test=16)
    labels = dict(steps="none", latent_steps=s["length"]) if name == "answer_only_on" else dict(steps="latent")
    data = TaskDataModule(task, **labels, batch_size=batch, cache_dir=s["cache_dir"])
    data.connect(model)
    every = max(1, steps // 10)
    curves = Rewards(every, name) if name.startswith("rl_") else None
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                      limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
                      callbacks=[curves] if curves else [Progress(every, name)])
    start = time.time()
    trainer.fit(model, datamodule=data)
    seconds = time.time() - start
    if name == "sft_off":
        trainer.save_checkpoint(s["init_from"])
    evaluator = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    accuracy = float(evaluator.validate(model, datamodule=data, verbose=False)[0]["val/accuracy"])
    g = s["group_size"] if name.startswith("rl_") else 1
    out = {"accuracy": round(accuracy, 4), "seconds": round(seconds, 1), "questions": steps * batch,
           "answers_sampled": steps * batch * g if g > 1 else 0, "optimizer_steps": steps,
           "feedback_gate": round(float(model.reasoner.feedback.openness()), 5)}
    if curves is not None:
        out["reward_curve"], out["kl_curve"] = curves.reward, curves.kl
    log(f"{name}: valid accuracy {out['accuracy']} ({out['seconds']} s)")
    return out


def build_cache(settings: dict) -> None:
    """Encode the game's questions with the memory once, before the workers race for the cache."""
    from split_model.memory import HFMemory, MemoryCache
    from split_model.tasks import StateTracking

    task = StateTracking(n_items=N_ITEMS, length=settings["length"], n_train=settings["n_train"],
                         n_valid=settings["n_valid"], n_test=16)
    cache = MemoryCache(settings["cache_dir"], HFMemory(config=MEMORY, seed=0), device="cpu")
    for split in ("train", "valid"):
        cache.get([e.question for e in task.examples(split)], desc=f"state_tracking/{split}")


def _worker(job: tuple) -> tuple[str, dict]:
    name, settings = job
    return name, _train(name, settings)


def plot(curves: dict[str, list[float]], references: dict[str, float], path: Path, window: int) -> None:
    plt = pyplot("rl-neuralese")
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for name, curve in curves.items():
        smooth = [sum(curve[max(0, i - window + 1): i + 1]) / len(curve[max(0, i - window + 1): i + 1])
                  for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), smooth, label=f"{name} (sampled reward, mean of {window} steps)")
    styles = {"sft_off": ("grey", "--"), "sft_all": ("black", ":")}
    for name, acc in references.items():
        color, ls = styles[name]
        ax.axhline(acc, color=color, ls=ls, lw=1, label=f"{name}: valid accuracy {acc:.2f}")
    ax.set(xlabel="RL optimizer step", ylabel="reward / accuracy", ylim=(0, 1.02),
           title=f"Shell game, {N_ITEMS} cups, {LENGTH} swaps: RL with feedback switched on")
    ax.legend(fontsize=7, loc="center right")
    save_figure(fig, path)


def run(args) -> dict:
    torch.set_num_threads(1)
    quick = args.quick
    settings = dict(length=3 if quick else LENGTH, n_train=512 if quick else 50000, n_valid=64 if quick else 500,
                    sft_steps=20 if quick else 2500, sft_batch=32 if quick else 128, group_size=4 if quick else 8,
                    rl_steps=args.steps or (6 if quick else 300), rl_batch=8 if quick else 32)
    rl_questions = settings["rl_steps"] * settings["rl_batch"]
    # sft_all sees as many training questions as sft_off and RL together
    settings["all_steps"] = settings["sft_steps"] + -(-rl_questions // settings["sft_batch"])
    with tempfile.TemporaryDirectory() as tmp:
        settings.update(cache_dir=tmp, init_from=str(Path(tmp) / "sft_off.ckpt"))
        log(f"shell game of {settings['length']} swaps: sft_off {settings['sft_steps']} steps of {settings['sft_batch']}, "
            f"RL {settings['rl_steps']} steps of {settings['rl_batch']} questions x {settings['group_size']} answers, "
            f"sft_all {settings['all_steps']} steps of {settings['sft_batch']}; 2 processes")
        build_cache(settings)
        results = in_processes(_worker, [("sft_all", settings), ("sft_off", settings)], 2)
        results.update(in_processes(_worker, [(name, settings) for name in (*RL_VARIANTS, "answer_only_on")], 2))
    png = Path(args.out_dir) / ("rl-neuralese-quick.png" if quick else "rl-neuralese.png")
    plot({n: results[n]["reward_curve"] for n in RL_VARIANTS},
         {n: results[n]["accuracy"] for n in ("sft_off", "sft_all")}, png, window=max(1, settings["rl_steps"] // 15))
    log(f"wrote {png}")
    names = ("sft_off", *RL_VARIANTS, "answer_only_on", "sft_all")
    best_rl = max(results[n]["accuracy"] for n in RL_VARIANTS)
    return {
        "task": f"state_tracking (shell game, {N_ITEMS} cups, one labelled latent step per swap in supervised training)",
        "length": settings["length"],
        **{n: results[n]["accuracy"] for n in names},
        "gain_over_sft_off": round(best_rl - results["sft_off"]["accuracy"], 4),
        "goal": "RL with feedback switched on gains >= 0.2 accuracy over sft_off",
        "examples": {n: {"questions": results[n]["questions"], "answers_sampled": results[n]["answers_sampled"],
                         "optimizer_steps": results[n]["optimizer_steps"]} for n in names},
        "seconds": {n: results[n]["seconds"] for n in names},
        "feedback_gate": {n: results[n]["feedback_gate"] for n in names},
        "rl_settings": {n: {**RL_VARIANTS[n], "group_size": settings["group_size"], "kl_weight": 0.02,
                            "temperature": 1.0} for n in RL_VARIANTS},
        "reward_first_last_50": {n: [round(sum(c[:50]) / len(c[:50]), 4), round(sum(c[-50:]) / len(c[-50:]), 4)]
                                 for n in RL_VARIANTS for c in [results[n]["reward_curve"]]},
        "reward_curves": {n: results[n]["reward_curve"] for n in RL_VARIANTS},
        "plot": str(png),
        "memory": MEMORY,
        "chance": round(1 / N_ITEMS, 4),
    }
