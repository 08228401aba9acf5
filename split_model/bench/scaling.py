"""Accuracy against reasoner size at a fixed frozen memory.

One suite task's committed config (default `gym_gcd`) is trained at several reasoner widths
(`model.reasoner.d_model`; layers, heads, data, budget and memory unchanged) with the same
`split-model fit` a user would type, and each final model is scored on the valid split as
the suite scores it. Writes results/scaling.json (accuracy, trainable and frozen parameters,
fit seconds and the command per width) and the plot results/scaling.png.
Runs go to runs/scaling/TASK-dWIDTH/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from split_model.bench import log, pyplot, save_figure, suite

DEFAULT_TASK = "gym_gcd"  # learned at d=128 (0.989); cheap enough to train three times on 2 cores
WIDTHS = (64, 128, 256)
RUNS = suite.ROOT / "runs" / "scaling"


def widths(text: str | None) -> list[int]:
    if text is None:
        return list(WIDTHS)
    try:
        out = [int(w) for w in text.split(",")]
    except ValueError:
        raise SystemExit(f"--widths takes comma-separated integers such as 64,128,256, got {text!r}") from None
    if not out or min(out) < 8 or any(w % 4 for w in out):
        raise SystemExit(f"--widths: each width must be a multiple of 4 (the configs' 4 heads) and at least 8, got {text!r}")
    return sorted(set(out))


def plot(task: str, rows: dict[int, dict], path: Path) -> None:
    plt = pyplot("scaling")
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    params = [rows[w]["trainable_params"] for w in rows]
    ax.plot(params, [rows[w]["accuracy"] for w in rows], marker="o")
    for w in rows:
        ax.annotate(f"d={w}", (rows[w]["trainable_params"], rows[w]["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    memory = next(iter(rows.values()))["memory_params"]
    ax.set(xscale="log", xlabel="trainable reasoner parameters", ylabel="valid accuracy", ylim=(0, 1.02),
           title=f"{task}: a frozen memory of {memory / 1e6:.1f}M parameters")
    save_figure(fig, path)


def run(args) -> dict:
    torch.set_num_threads(1)
    task = args.tasks or DEFAULT_TASK
    if task not in suite.TASKS:
        raise SystemExit(f"scaling: one task of {', '.join(suite.TASKS)}; got {task!r}")
    sizes = widths(args.widths)
    rows: dict[int, dict] = {}
    for w in sizes:
        argv = [*suite.fit_argv(task, [f"--model.reasoner.d_model={w}"], RUNS / f"{task}-d{w}"), *suite.run_overrides(args)]
        log(f"d_model={w}: split-model {' '.join(argv)}")
        r = suite.fit_and_score(argv)
        log(f"d_model={w}: valid accuracy {r['accuracy']}, {r['trainable_params']:,} trainable, {r['fit_seconds']} s")
        rows[w] = {**r, "command": "split-model " + " ".join(argv)}
    png = Path(args.out_dir) / ("scaling-quick.png" if args.quick else "scaling.png")
    plot(task, rows, png)
    log(f"wrote {png}")
    return {"task": task, "device": suite.device_name(args),
            "by_width": {str(w): r for w, r in rows.items()},
            "scoring": "valid split, as in the suite (the train split's latent count and token budget)",
            "plot": str(png)}
