"""Named experiments: `split-model bench NAME`.

Each prints progress on stderr and one JSON object as the last line of stdout, and writes
the same JSON, with the command and the machine, to results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from split_model import files

BENCHES: dict[str, str] = {
    # name -> module:function, imported only when run
    "speed": "split_model.bench.speed:run",
    "feedback-ablation": "split_model.bench.ablation:run",
    "quickstart": "split_model.bench.quickstart:run",
    "train-speed": "split_model.bench.train_speed:run",
    "train-modes": "split_model.bench.train_modes:run",
    "latent-steps": "split_model.bench.latent_steps:run",
    "suite": "split_model.bench.suite:run",
    "faults": "split_model.bench.faults:run",
    "retrieval-hops": "split_model.bench.retrieval_hops:run",
    "retrieval-speed": "split_model.bench.retrieval_speed:run",
    "retrieval-keys": "split_model.bench.retrieval_keys:run",
    "rl-neuralese": "split_model.bench.rl_neuralese:run",
    "scaling": "split_model.bench.scaling:run",
    "memory-probe": "split_model.bench.memory_probe:run",
}


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pyplot(bench: str):
    """matplotlib.pyplot on the file-only Agg backend, or a clear exit naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"the {bench} plot needs matplotlib: pip install 'split-model[bench]'") from e
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _load(name: str) -> Callable[[argparse.Namespace], dict]:
    import importlib

    module, fn = BENCHES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def bench_main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="split-model bench", description="Run a named experiment; JSON on the last line.")
    p.add_argument("name", choices=sorted(BENCHES), help="; ".join(
        ["speed: reasoner step vs SmolLM2 decode step, wrapper vs bare prefill",
         "feedback-ablation: none/last/all on the shell game at equal size and budget",
         "quickstart: time and accuracy of configs/quickstart.yaml",
         "train-speed: training steps/s of the reference and the fast path, memory encoding tokens/s",
         "train-modes: sequential vs jacobi (K=2,4,8) vs off at 16 steps: examples/s, accuracy, jacobi gap",
         "latent-steps: accuracy as test-time latent steps go 0..16, with and without sampled latent counts (PNG)",
         "suite: train and score the benchmark configs and their baselines (feedback none/last, written CoT)",
         "faults: every failure scenario (crash and resume, damaged files, NaN, bad config values) against the "
         "real code: how many behaved as promised",
         "retrieval-hops: accuracy by hop count on an unseen world (new names, swapped store) for retrieval with "
         "feedback all, with none, and no retrieval",
         "retrieval-keys: recall of a query that states its fact's person and relation, by how the store keys "
         "chunks (last layer, embeddings, both): the ceiling a learned query meets on the unseen world",
         "retrieval-speed: build time, query latency (batch 1, 64), recall@8 and share of a reasoner step of flat, "
         "hnsw and ivfpq stores of 200k chunks",
         "rl-neuralese: shell game; supervised with feedback off, then RL with feedback on (feedback path only, all "
         "parameters, with noise on the fed-back vectors) vs supervised with feedback all (PNG of the rewards)",
         "scaling: one suite task (--tasks, default gym_gcd) trained at several reasoner widths (--widths): "
         "accuracy vs trainable parameters at a fixed memory (PNG)",
         "memory-probe: per layer of the memory (--memory), how linearly readable each end of a ProsQA fact is at its "
         "tokens: which layer a reasoner should read"]))
    p.add_argument("--out-dir", default="results", help="where NAME.json is written")
    p.add_argument("--quick", action="store_true", help="a much smaller run, to check the bench itself works "
                                                        "(faults: only the scenarios that start no process)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where speed, train-speed and train-modes run; a CUDA run writes NAME-cuda.json")
    p.add_argument("--memory", default="minilm-l6",
                   help="train-speed's and memory-probe's memory backbone: a packaged short name or a local Hugging "
                        "Face directory")
    p.add_argument("--steps", type=int, default=None,
                   help="train-modes, retrieval-hops: optimizer steps per trained model; rl-neuralese: RL steps per "
                        "variant (instead of the bench's default)")
    p.add_argument("--tasks", default=None,
                   help="suite: comma-separated tasks (default all: prosqa, prontoqa, icot_4x4, gym_chain_sum, ...); "
                        "scaling: the one task to scale (default gym_gcd)")
    p.add_argument("--variants", default=None, help="suite: comma-separated variants of all, none, last, cot, latent0 (no latent steps), "
                        "smollm2 (SmolLM2-135M as the memory); default all, none, last, cot")
    p.add_argument("--resume", action="store_true",
                   help="retrieval-hops: keep the variants' run folders and continue each training from its "
                        "last.ckpt, so a bench that was stopped goes on where it stopped (train_seconds then "
                        "count this run's part only)")
    p.add_argument("--widths", default=None, help="scaling: comma-separated reasoner widths d_model (default 64,128,256)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here")
    start = time.time()
    result = _load(args.name)(args)
    record = {"bench": args.name, **result, "wall_seconds": round(time.time() - start, 1),
              "command": "split-model bench " + " ".join(argv), "machine": machine()}
    if not args.quick:
        suffix = "" if args.device == "cpu" else f"-{args.device}"
        out = Path(args.out_dir) / f"{args.name}{suffix}.json"
        files.write_text(out, json.dumps(record, indent=1) + "\n")
        log(f"wrote {out}")
    print(json.dumps(record))
    return record
