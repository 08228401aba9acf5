"""Training speed: the reference (dynamic) recurrence vs the fast path, in one run.

For the reasoners of configs/quickstart.yaml and configs/prosqa.yaml, at their batch sizes
and step counts, with memory states read by the configured backbone into a fresh cache
(the memory's encoding throughput is measured on the way): optimizer steps/s and examples/s
of a full training step (forward, backward, gradient clipping, optimizer step) for
`execution: dynamic` (caches grown by concatenation, unfused AdamW) and `execution: auto`
(fixed-shape steps, fused AdamW, CUDA graphs on a GPU). On CUDA a third path,
`fast_bf16_mixed`, is the fast path under bf16 autocast (what `precision: bf16-mixed` does;
graphs are not captured under autocast), so the configs' precision is a measured choice.
Lightning's loop adds the same constant to all paths and is left out. Timings alternate
between the paths.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from split_model.bench import log
from split_model.bench.decode import sync

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("quickstart", "prosqa")
PATHS = {"eager": "dynamic", "fast": "auto"}  # timed path -> execution
BF16 = "fast_bf16_mixed"  # CUDA only: execution auto under bf16 autocast
TF32 = "fast_tf32"  # CUDA only: execution auto with fp32 matmuls on tensor cores (TF32)


def tf32(step):
    """`step` with float32 matmuls in TF32 (torch.set_float32_matmul_precision("high")),
    the setting restored after each call."""

    def run():
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            step()
        finally:
            torch.set_float32_matmul_precision(before)

    return run


def load_config(name: str, batches: int):
    """The config's model and data sections, and its task's class path and arguments, with
    a generated train split cut to `batches` batches and no valid or test files."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / f"{name}.yaml"))
    model, data = cfg["model"], cfg["data"]
    task_args = dict(data["task"].get("init_args", {}))
    for key in ("n_train", "n_generated"):  # generated train splits: only as many as the bench uses
        if key in task_args:
            task_args[key] = batches * data["batch_size"]
    for key in ("valid_path", "test_path", "vocabulary_path"):  # no benchmark files needed (names do not change speed)
        task_args.pop(key, None)
    return model, data, data["task"]["class_path"], task_args


def build(name: str, memory, device: torch.device, batches: int):
    """(module, list of batches on `device`, tokens encoded, encode seconds) for one config."""
    import importlib

    from split_model.memory import MemoryCache
    from split_model.reasoner import ReasonerConfig
    from split_model.training import Formatter, SplitModelModule, TaskDataset, collate
    from split_model.training.data import output_token_ids

    model_cfg, data_cfg, task_path, task_args = load_config(name, batches)
    bs = data_cfg["batch_size"]
    module_path, cls = task_path.rsplit(".", 1)
    task = getattr(importlib.import_module(module_path), cls)(**task_args)
    torch.manual_seed(0)
    module = SplitModelModule(memory=memory, reasoner=ReasonerConfig(**model_cfg["reasoner"]),
                              bptt_steps=model_cfg.get("bptt_steps"), output_vocab=model_cfg.get("output_vocab", "full"))
    formatter = Formatter(memory.tokenizer, data_cfg.get("steps", "text"), data_cfg.get("latent_steps", 0),
                          step_token=data_cfg.get("step_token", "whole"), fixed_steps=data_cfg.get("fixed_steps"))
    module.connect_data(formatter, task)
    examples = task.examples("train")[: batches * bs]
    with tempfile.TemporaryDirectory() as tmp:
        cache = MemoryCache(tmp, memory, device=device)
        start = time.perf_counter()
        states = cache.get([e.question for e in examples], desc=f"{name} (bench)")
        seconds = time.perf_counter() - start
        data = TaskDataset(examples, states, formatter)
        loaded = [collate([data[i] for i in range(k * bs, (k + 1) * bs)]) for k in range(batches)]
        tokens = int(states.offsets[-1])
    if module.hparams.output_vocab == "task":
        module.reasoner.set_output_vocab(output_token_ids(data.sequences, memory.tokenizer.eos_id))
        module.reasoner.keep_rows(module.special_ids())  # as fit does: the embedding keeps only these rows
    on_device = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loaded]
    return module.to(device), on_device, tokens, seconds, data_cfg, model_cfg


def train_step(module, execution: str, batches: list[dict], clip: float | None, autocast: torch.dtype | None = None):
    """A function running one optimizer step on the next batch, as Lightning's loop does
    (the forward under `autocast` when given, as with Lightning's mixed precision)."""
    module = copy.deepcopy(module)
    module.hparams.execution = execution
    opt = module.build_optimizer()
    params = list(module.reasoner.parameters())
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        device = batch["tokens"].device
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = module._forward(batch)[0]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_ms(steps: dict, device: torch.device, rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per call of each function, alternating between them round by round."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3 / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args) -> dict:
    from split_model.memory import HFMemory

    device = torch.device(args.device)
    torch.set_num_threads(1)
    rounds, per_round, batches = (2, 2, 2) if args.quick else (7, 5, 4)
    memory = HFMemory(name=args.memory)  # both configs read MiniLM (minilm-l6, or a local copy of it)
    configs, tokens, seconds = {}, 0, 0.0
    for name in CONFIGS:
        log(f"{name}: encoding {batches} batches with the memory, then timing eager and fast training steps")
        module, loaded, n_tok, n_s, data_cfg, model_cfg = build(name, memory, device, batches)
        tokens, seconds = tokens + n_tok, seconds + n_s
        clip = 1.0  # both configs clip the global gradient norm at 1.0
        steps = {path: train_step(module, execution, loaded, clip) for path, execution in PATHS.items()}
        if device.type == "cuda":
            steps[BF16] = train_step(module, "auto", loaded, clip, autocast=torch.bfloat16)
            steps[TF32] = tf32(train_step(module, "auto", loaded, clip))
        for fn in steps.values():  # warm-up: first calls allocate, and on CUDA capture graphs
            for _ in range(3):
                fn()
        ms = interleaved_ms(steps, device, rounds, per_round)
        bs = data_cfg["batch_size"]
        configs[name] = {
            **{path: {"steps_per_s": round(1e3 / ms[path], 2), "examples_per_s": round(bs * 1e3 / ms[path], 1),
                      "step_ms": round(ms[path], 2)} for path in steps},
            "fast_over_eager": round(ms["eager"] / ms["fast"], 2),
            "batch_size": bs, "sequence_steps": int(loaded[0]["tokens"].shape[1]),
            "memory_tokens_per_example": round(sum(int(b["mem_mask"].sum()) for b in loaded) / (bs * len(loaded)), 1),
            "reasoner": model_cfg["reasoner"],
        }
        log(f"{name}: " + ", ".join(f"{path} {v:.1f} ms" for path, v in ms.items()) + " per step")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "configs": configs,
        "encode_tokens_per_s": round(tokens / seconds, 1),
        "paths": {"eager": "execution: dynamic (caches grown by concatenation, unfused AdamW)",
                  "fast": "execution: auto (fixed-shape steps, fused AdamW, CUDA graphs on a GPU)",
                  **({BF16: "execution: auto under bf16 autocast (precision: bf16-mixed; no graphs)",
                      TF32: "execution: auto, float32 matmuls as TF32 (set_float32_matmul_precision('high'))"}
                     if device.type == "cuda" else {})},
        "memory": args.memory,
        "threads": torch.get_num_threads(),
    }
