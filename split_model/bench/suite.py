"""The benchmark suite: train each committed benchmark config, and its baselines, then score it.

Each (task, variant) pair is one `split-model fit` of the task's config with the variant's
overrides (no code edits: the same commands a user would type), followed by a validation of
the final model on the valid split (honest scoring: the train split's latent count, never the
gold chain). Variants:
- all:  the config as committed (feedback all);
- none, last: the same with `model.reasoner.feedback` none / last (equal size and budget);
- cot:  written chain of thought (`data.steps: text`, no latent steps), for tasks with steps;
- latent0: no latent steps (the answer is written right after the question);
- smollm2: SmolLM2-135M as the frozen memory in place of the config's (what the memory contributes).

Runs go to runs/suite/TASK-VARIANT/ in the repository; a run that finds its folder from an earlier
suite moves it to TASK-VARIANT.previous first (replacing an older one), so the folder's
checkpoints/last.ckpt is always the model its suite.json entry scored. After every run the results so far are written to
suite.partial.json next to the final suite.json, so a long suite that stops keeps its numbers.
A run of some tasks updates their entries in an existing suite.json (suite-cuda.json) and
keeps the others (each entry's command says how it was made).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from split_model import files
from split_model.bench import log

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ and runs/ live there
RUNS = ROOT / "runs" / "suite"

# The reasoning-gym generators of the suite and their sizes (see configs/reasoning_gym.yaml).
GYM = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "count_bits": {"min_n": 1, "max_n": 65535},  # enough distinct numbers for held-out splits
    "letter_counting": {"min_words": 3, "max_words": 6},
    "leg_counting": {"min_animals": 1, "max_animals": 3, "max_instances": 3},
    "gcd": {"min_value": 1, "max_value": 100},
    "family_relationships": {},
    "aiw": {},  # "Alice in Wonderland": how many sisters does X's brother have (answers 2..7)
    "needle_haystack": {"min_num_statements": 10, "max_num_statements": 20},  # who does what, among 10-20 facts
    "knights_knaves": {"n_people": 2, "depth_constraint": 2, "width_constraint": 2},  # who lies, from 2 statements
    # (a+bi) +/- (c+di) with integer parts in -10..10: two signed additions, answers like "-15.0 + 3.0i"
    "complex_arithmetic": {"operations": ["+", "-"], "operations_weights": [0.5, 0.5]},
}
COT = ["--data.steps=text", "--data.latent_steps=0", "--data.fixed_steps=null"]  # written steps, no latent ones
COT_TEXT = [*COT, "--data.task.init_args.steps_as=text"]  # for configs whose latent steps use another view of the chain

# task -> (config, overrides that select it, overrides of the cot variant or None: no written steps)
TASKS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "prosqa": ("prosqa.yaml", [], COT_TEXT),  # the config labels reached sets
    "prontoqa": ("prontoqa.yaml", [], COT_TEXT),  # the config labels a backward chaining
    "icot_4x4": ("icot_mult_4x4.yaml", [], COT_TEXT),  # the file's partial products
    "icot_5x5": ("icot_mult_5x5.yaml", [], COT_TEXT),
    "gsm8k": ("gsm8k.yaml", [], COT),
    **{f"gym_{name}": ("reasoning_gym.yaml",
                       [f"--data.task.init_args.dataset={name}", f"--data.task.init_args.config={json.dumps(cfg)}"], None)
       for name, cfg in GYM.items()},
}
VARIANTS = {"all": [], "none": ["--model.reasoner.feedback=none"], "last": ["--model.reasoner.feedback=last"], "cot": None,
            # no thinking steps at all, labelled or not: the answer right after the question
            "latent0": ["--data.steps=none", "--data.latent_steps=0", "--data.fixed_steps=null"],
            "smollm2": ["--model.memory.init_args.name=smollm2-135m"]}  # a 6x larger frozen memory
DEFAULT_VARIANTS = ["all", "none", "last", "cot"]  # the baselines at equal size; latent0 and smollm2 when named
QUICK = ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2"]


def plan(tasks: list[str], variants: list[str]) -> list[tuple[str, str, list[str]]]:
    """(task, variant, fit arguments) for every pair that exists (cot only where a task has written steps)."""
    unknown = [t for t in tasks if t not in TASKS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"suite: unknown task or variant {', '.join(unknown)}; tasks: {', '.join(TASKS)}; "
                         f"variants: {', '.join(VARIANTS)}")
    runs = []
    for task in tasks:
        cot = TASKS[task][2]
        for variant in variants:
            extra = cot if variant == "cot" else VARIANTS[variant]
            if extra is None:
                continue
            runs.append((task, variant, fit_argv(task, extra, RUNS / f"{task}-{variant}")))
    return runs


def fit_argv(task: str, extra: list[str], root: Path) -> list[str]:
    """`split-model fit` arguments for `task`'s config with `extra` overrides, its runs under `root`."""
    config, select, _ = TASKS[task]
    return ["fit", "--config", str(ROOT / "configs" / config), *select, *extra,
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]


def run_overrides(args) -> list[str]:
    """The bench's --device and --quick as `split-model fit` overrides."""
    return ["--trainer.accelerator=gpu" if args.device == "cuda" else "--trainer.accelerator=cpu",
            *(QUICK if args.quick else [])]


def device_name(args) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu"


def fit_and_score(argv: list[str]) -> dict:
    """One `split-model fit` in this process, then the final model's validation metrics."""
    from split_model.cli import dispatch

    start = time.time()
    cli = dispatch(argv)
    seconds = time.time() - start
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    model = cli.model
    return {"accuracy": round(float(metrics["val/accuracy"]), 4),
            "accuracy_oracle": round(float(metrics.get("val/accuracy_oracle", metrics["val/accuracy"])), 4),
            "fit_seconds": round(seconds, 1),
            "trainable_params": sum(p.numel() for p in model.reasoner.parameters()),
            "memory_params": sum(p.numel() for p in model.memory.parameters())}


RESULT_KEYS = ("tasks", "accuracy_oracle", "trainable_params", "memory_params", "train_seconds", "commands", "failed")


def merged(earlier: dict, new: dict) -> dict:
    """`earlier` suite results updated with `new` ones, run by run: a suite run for some tasks and
    variants replaces theirs and keeps every other result (and drops a failure it has now run)."""
    keys = [k for k in RESULT_KEYS if k in earlier or k in new]
    out = {key: {task: dict(v) if isinstance(v, dict) else v for task, v in earlier.get(key, {}).items()}
           for key in keys}
    for key, tasks in new.items():
        for task, value in tasks.items():
            if isinstance(value, dict):
                have = out[key].get(task)
                if not isinstance(have, dict):  # an older record's one number for the whole task
                    have = {} if have is None else {v: have for v in earlier.get("tasks", {}).get(task, {})}
                    out[key][task] = have
                have.update(value)
            else:
                out[key][task] = value
    for task, variants in new["tasks"].items():
        for variant in variants:
            out.get("failed", {}).get(task, {}).pop(variant, None)
    if "failed" in out:
        out["failed"] = {task: v for task, v in out["failed"].items() if v}
    return out


def table(tasks: dict[str, dict[str, float]]) -> str:
    """Markdown table of valid accuracies: a row per task (in TASKS' order), a column per variant
    that any task has (in VARIANTS' order), "-" where a task's variant has not been run."""
    variants = [v for v in VARIANTS if any(v in scores for scores in tasks.values())]
    lines = ["| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    order = [t for t in TASKS if t in tasks] + [t for t in tasks if t not in TASKS]
    for task, scores in ((t, tasks[t]) for t in order):
        lines.append(f"| {task} | " + " | ".join(f"{scores[v]:.3f}" if v in scores else "-" for v in variants) + " |")
    return "\n".join(lines)


def set_aside(root: Path) -> None:
    """Move an earlier run's folder to ROOT.previous (replacing an older one): Lightning would
    otherwise write this run's checkpoint beside the old last.ckpt as last-v1.ckpt, and the
    folder's last.ckpt would be a model the new results do not describe."""
    if root.exists():
        previous = root.with_name(root.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        root.rename(previous)
        log(f"moved the earlier run's folder to {previous}")


def run(args) -> dict:
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS
    runs = plan(tasks, variants)
    out: dict = {"tasks": {}, "accuracy_oracle": {}, "trainable_params": {}, "memory_params": {}, "train_seconds": {},
                 "commands": {}}
    partial = Path(args.out_dir) / f"suite.partial-{os.getpid()}.json"  # suites may run side by side
    earlier = Path(args.out_dir) / ("suite.json" if args.device == "cpu" else f"suite-{args.device}.json")
    for i, (task, variant, argv) in enumerate(runs):
        argv = [*argv, *run_overrides(args)]
        set_aside(RUNS / f"{task}-{variant}")
        log(f"[{i + 1}/{len(runs)}] {task} {variant}: split-model {' '.join(argv)}")
        try:
            r = fit_and_score(argv)
        except (Exception, SystemExit) as e:  # one broken config must not cost the other runs
            log(f"{task} {variant}: FAILED: {type(e).__name__}: {e}")
            out.setdefault("failed", {}).setdefault(task, {})[variant] = f"{type(e).__name__}: {e}"
            continue
        log(f"{task} {variant}: valid accuracy {r['accuracy']} (oracle {r['accuracy_oracle']}) in {r['fit_seconds']} s")
        out["tasks"].setdefault(task, {})[variant] = r["accuracy"]
        out["accuracy_oracle"].setdefault(task, {})[variant] = r["accuracy_oracle"]
        out["trainable_params"].setdefault(task, {})[variant] = r["trainable_params"]
        out["memory_params"].setdefault(task, {})[variant] = r["memory_params"]  # smollm2 and others differ
        out["train_seconds"].setdefault(task, {})[variant] = r["fit_seconds"]
        out["commands"].setdefault(task, {})[variant] = "split-model " + " ".join(argv)
        if not args.quick:
            partial.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(partial, json.dumps(out, indent=1) + "\n")
    partial.unlink(missing_ok=True)  # the final suite.json follows
    if not args.quick and earlier.is_file():  # read at the end: another suite may have finished meanwhile
        out = merged(json.loads(earlier.read_text()), out)
    log("valid accuracy by task and variant (every run of this suite.json so far):\n" + table(out["tasks"]))
    return {"device": device_name(args), **out,
            "scoring": "valid split, exact match of the generated answer (the task's own scorer), with the train "
                       "split's latent count and token budget; accuracy_oracle uses each row's gold latent count",
            "train_seconds_note": "split-model fit wall time, reading the data with the memory included"}
