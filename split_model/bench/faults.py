"""Faults: every failure the project promises to survive or refuse, tried against the real code.

Each scenario does the bad thing (kills a training run with SIGKILL, truncates a checkpoint,
hands over a pickle that runs code, damages a cache entry, feeds a NaN, passes an absurd
config value, ...) and checks the promised outcome: the same result after a resume, a clear
one-line error, a file that is rebuilt or refused and never read as valid. Tiny random
backbones (inline configs) throughout, so nothing is downloaded; the scenarios that start
processes (resume after SIGKILL, two-process predict) take most of the time.

`python -m split_model.bench.faults fit-until ROOT KILL_AT [fit args]` is the child process
of the resume scenarios (and of tests/test_reliability.py): `split-model fit` of
configs/debug.yaml, shortened, that kills itself with SIGKILL after optimizer step KILL_AT
(0: never) and writes ROOT/final.json (validation metrics and a hash of the weights) at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from split_model.bench import log

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
TEXTS = ["ball at 1. swap 0 1. where is the ball?", "ball at 2. swap 1 2. swap 0 2. where is the ball?"]


class Broken(Exception):
    """A scenario's outcome was not the promised one."""


# -- the child process of the resume scenarios --------------------------------------------------------
def fit_args(root: Path, *extra: str) -> list[str]:
    """`split-model fit` of configs/debug.yaml: 20 steps of 6 batches per epoch, checkpoints every 5."""
    return ["fit", "--config", str(DEBUG_CONFIG), "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.max_steps", "20",
            "--trainer.val_check_interval", "10", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1", "--data.cache_dir", str(root.parent / "cache"),
            "--data.task.init_args.n_train", "48", "--data.task.init_args.n_valid", "16",
            "--data.task.init_args.n_test", "15", "--data.batch_size", "8",
            "--checkpoint.every_n_train_steps", "5", *extra]


def fit_until(root: Path, kill_at: int, extra: list[str]) -> None:
    torch.set_num_threads(1)
    from split_model.cli import dispatch
    from split_model.training import SplitModelModule

    if kill_at > 0:
        def die(self, outputs, batch, batch_idx):
            if self.trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        SplitModelModule.on_train_batch_end = die
    cli = dispatch(fit_args(root, *extra))
    weights = b"".join(t.detach().numpy().tobytes() for t in cli.model.reasoner.state_dict().values())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    (root / "final.json").write_text(json.dumps({"metrics": metrics, "global_step": cli.trainer.global_step,
                                                 "weights_sha256": hashlib.sha256(weights).hexdigest()}))


def run_fit(root: Path, kill_at: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "SPLIT_MODEL_CACHE": str(root.parent / "split_model")}
    return subprocess.run([sys.executable, "-m", "split_model.bench.faults", "fit-until", str(root), str(kill_at),
                           *extra], capture_output=True, text=True, env=env, timeout=600)


# -- helpers ---------------------------------------------------------------------------------------------
def expect(condition: bool, observed: str) -> str:
    if not condition:
        raise Broken(observed)
    return observed


def raises(fn: Callable, kind: type[BaseException], *needles: str) -> str:
    """Runs fn; returns the message of the `kind` it must raise, which must contain every needle."""
    try:
        fn()
    except kind as e:
        message = " ".join(str(e).split())
        missing = [n for n in needles if n not in message]
        return expect(not missing, f"{type(e).__name__}: {message[:300]}" + (f" (missing {missing})" if missing else ""))
    raise Broken(f"no {kind.__name__} raised")


def cli_error(argv: list[str], code: int, *needles: str) -> str:
    """Runs the `split-model` entry point in-process; it must exit with `code` and print the
    error on one line of stderr that contains every needle (and no traceback)."""
    from split_model.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(argv)
            status = 0
        except SystemExit as e:
            status = e.code
    lines = [line for line in err.getvalue().splitlines() if "error" in line.lower()]
    line = lines[-1] if lines else ""
    ok = status == code and all(n in line for n in needles) and "Traceback" not in err.getvalue()
    return expect(ok, f"exit {status}: {line[:300]}")


def memory(**kwargs):
    from split_model.memory import HFMemory

    return HFMemory(config=TINY, **{"max_length": 128, **kwargs})


def module(mem=None, **kwargs):
    from split_model.reasoner import ReasonerConfig
    from split_model.training import SplitModelModule

    cfg = ReasonerConfig(d_model=32, n_layers=2, n_heads=4, embed_rank=8)
    return SplitModelModule(memory=mem or memory(), reasoner=cfg, lr=3e-3, warmup_steps=2, **kwargs)


def data(mod, work: Path, **task):
    from split_model.tasks import StateTracking
    from split_model.training import TaskDataModule

    task = StateTracking(**{"n_items": 3, "length": 3, "n_train": 64, "n_valid": 16, "n_test": 16, **task})
    return TaskDataModule(task, steps="latent", batch_size=16, cache_dir=str(work / "cache"))


def trainer(work: Path, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(**{"accelerator": "cpu", "devices": 1, "max_steps": 4, "logger": False,
                      "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                      "default_root_dir": str(work), "num_sanity_val_steps": 0, "limit_val_batches": 0, **kwargs})


def trained_checkpoint(work: Path) -> Path:
    """A checkpoint of a tiny model trained 4 steps by a plain Trainer.fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    mod = module()
    ckpt = ModelCheckpoint(dirpath=work / "ckpt", save_last=True, save_top_k=0)
    trainer(work, enable_checkpointing=True, callbacks=[ckpt]).fit(mod, datamodule=data(mod, work))
    return Path(ckpt.last_model_path)


def poison(mod, step: int) -> None:
    """The module's training loss becomes NaN at optimizer step `step`."""
    forward = mod._forward

    def poisoned(batch):
        loss, acc, mem = forward(batch)
        if mod.training and mod.trainer.global_step == step:
            loss = loss * float("nan")
        return loss, acc, mem
    mod._forward = poisoned


def finite(mod) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in mod.reasoner.parameters())


# -- scenarios: each returns what it observed, or raises Broken ---------------------------------------------
def resume_after_sigkill(work: Path) -> str:
    whole, killed = work / "whole", work / "killed"
    done = run_fit(whole, 0)
    expect(done.returncode == 0, f"uninterrupted run failed: {done.stderr[-500:]}")
    crash = run_fit(killed, 13)
    expect(crash.returncode == -signal.SIGKILL, f"the killed run exited with {crash.returncode}")
    resumed = run_fit(killed, 0, "--ckpt_path", "last")
    expect(resumed.returncode == 0, f"resume failed: {resumed.stderr[-500:]}")
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, killed))
    same = a["weights_sha256"] == b["weights_sha256"] and a["metrics"] == b["metrics"]
    return expect(same, f"killed after step 13, resumed from step 10: weights {'equal' if same else 'differ'}; "
                        f"val/accuracy {b['metrics'].get('val/accuracy')} vs {a['metrics'].get('val/accuracy')} "
                        "uninterrupted")


def ddp_predict_matches_one_process(work: Path) -> str:
    fit = run_fit(work / "model", 0)
    expect(fit.returncode == 0, f"fit failed: {fit.stderr[-500:]}")
    ckpt = work / "model" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "SPLIT_MODEL_CACHE": str(work / "split_model")}
    rows = {}
    for devices in (1, 2):
        root = work / f"predict{devices}"
        argv = fit_args(root, "--trainer.devices", str(devices), "--ckpt_path", str(ckpt))[1:]
        if devices == 2:
            argv += ["--trainer.strategy", "ddp"]
        proc = subprocess.run([sys.executable, "-m", "split_model.cli", "predict", *argv], capture_output=True,
                              text=True, env=env, timeout=600)
        expect(proc.returncode == 0, f"predict on {devices} process(es) failed: {proc.stderr[-500:]}")
        rows[devices] = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    questions = [r["question"] for r in rows[2]]
    once = len(questions) == len(set(questions)) == 15
    return expect(once and rows[1] == rows[2], f"2 processes wrote {len(questions)} rows, {len(set(questions))} "
                  f"distinct questions of 15; {'the same rows as' if rows[1] == rows[2] else 'other rows than'} one process")


def interrupted_checkpoint_save(work: Path) -> str:
    from split_model.training.checkpoints import AtomicCheckpointIO

    path, io_ = work / "last.ckpt", AtomicCheckpointIO()
    io_.save_checkpoint({"step": 1}, path)
    before, save = path.read_bytes(), torch.save

    def killed(obj, f, *a, **k):
        Path(f).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt
    torch.save = killed
    try:
        with contextlib.suppress(KeyboardInterrupt):
            io_.save_checkpoint({"step": 2}, path)
    finally:
        torch.save = save
    left = sorted(p.name for p in work.iterdir())
    return expect(path.read_bytes() == before and left == ["last.ckpt"],
                  f"after a save killed half-way: previous file {'intact' if path.read_bytes() == before else 'damaged'}, "
                  f"files {left}")


def truncated_checkpoint(work: Path) -> str:
    from split_model.training import load_checkpoint

    good = trained_checkpoint(work)
    bad = work / "cut.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return raises(lambda: load_checkpoint(str(bad)), ValueError, "cannot read checkpoint", str(bad))


def pickle_with_code(work: Path) -> str:
    from split_model.training import load_checkpoint

    marker = work / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = work / "evil.ckpt"
    torch.save({"split_model": {}, "state_dict": {}, "x": Payload()}, path)
    message = raises(lambda: load_checkpoint(str(path)), ValueError, "refused")
    return expect(not marker.exists(), message + ("" if not marker.exists() else " BUT THE CODE RAN"))


def checkpoint_without_format(work: Path) -> str:
    from split_model.training import load_checkpoint

    ckpt = torch.load(trained_checkpoint(work), weights_only=True)
    ckpt["split_model"]["format"] = None
    path = work / "no_format.ckpt"
    torch.save(ckpt, path)
    return raises(lambda: load_checkpoint(str(path)), ValueError, "lacks format")


def checkpoint_of_another_backbone(work: Path) -> str:
    from split_model.training import load_checkpoint

    path = trained_checkpoint(work)
    return raises(lambda: load_checkpoint(str(path), memory=memory(seed=1)), ValueError, "fingerprint")


def text_file_as_checkpoint(work: Path) -> str:
    path = work / "README.md"
    path.write_text("# not a checkpoint\n")
    return cli_error(["generate", "--checkpoint", str(path), "--question", "hi"], 2, "not a complete torch checkpoint")


def damaged_cache_entry(work: Path) -> str:
    from split_model.memory import MemoryCache

    mem = memory()
    first = MemoryCache(work, mem).get(TEXTS)
    want, states = [first.row(i).clone() for i in range(len(TEXTS))], first.path / "states.npy"
    del first
    states.write_bytes(states.read_bytes()[:-64])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = MemoryCache(work, mem).get(TEXTS)
    same = all(torch.equal(again.row(i), w) for i, w in enumerate(want))
    warned = [str(w.message) for w in caught if "rebuilt" in str(w.message)]
    return expect(same and len(warned) == 1, f"truncated states.npy: {len(warned)} warning(s) "
                  f"({warned[0][:120] if warned else ''}...); rebuilt states {'equal' if same else 'differ'}")


def cache_manifest_of_another_backbone(work: Path) -> str:
    from split_model.memory import MemoryCache
    from split_model.memory.cache import _open

    mem = memory()
    path = MemoryCache(work, mem).get(TEXTS).path
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    return raises(lambda: _open(path, len(TEXTS), mem.fingerprint), ValueError, "another backbone")


def killed_cache_writer(work: Path) -> str:
    from split_model.memory import MemoryCache

    cache = MemoryCache(work, memory())
    _, path = cache._entry(TEXTS, "memory")
    left = path.with_name(f".{path.name}.tmp-deadhost-1-0000")
    left.mkdir(parents=True)
    np.save(left / "states.npy", np.zeros((1, 1, 1), np.float16))
    got = cache.get(TEXTS)
    return expect(got.path == path and got.states.shape[0] > 1,
                  f"a dead writer's {left.name} was ignored; the entry was built at {path.name}")


def cache_key_follows_inputs(work: Path) -> str:
    from split_model.memory import MemoryCache
    from split_model.memory import cache as cache_module

    base = MemoryCache(work, memory())
    ids = base._entry(TEXTS, "memory")[0]
    key = base.key(ids)
    variants = {"weights": MemoryCache(work, memory(seed=1)).key(ids),
                "layers": MemoryCache(work, memory(layers=[1])).key(ids),
                "max_length": (lambda c: c.key(c._entry(TEXTS, "memory")[0]))(MemoryCache(work, memory(max_length=8))),
                "data": base.key(ids[:1])}
    code = cache_module.extraction_code
    cache_module.extraction_code = lambda: "edited"
    try:
        variants["extraction code"] = base.key(ids)
    finally:
        cache_module.extraction_code = code
    same = [k for k, v in variants.items() if v == key]
    return expect(not same, f"a change of {', '.join(variants)} gives a new key" + (f"; NOT {same}" if same else ""))


def nan_loss_stops(work: Path) -> str:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from split_model.training import load_checkpoint
    from split_model.training.module import NonFiniteError

    mod = module()
    poison(mod, 3)
    ckpt = ModelCheckpoint(dirpath=work / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)
    run = trainer(work, max_steps=6, enable_checkpointing=True, callbacks=[ckpt])
    message = raises(lambda: run.fit(mod, datamodule=data(mod, work)), NonFiniteError, "optimizer step 3", "last.ckpt")
    kept = work / "ckpt" / "last.ckpt"
    step = torch.load(kept, weights_only=True)["global_step"]
    return expect(step == 2 and finite(mod) and finite(load_checkpoint(str(kept))),
                  f"{message[:160]}...; last.ckpt from step {step}, weights finite")


def nan_loss_skipped(work: Path) -> str:
    mod = module(nonfinite="skip")
    poison(mod, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(work, max_steps=5)
        run.fit(mod, datamodule=data(mod, work))
    warned = any("skipped the batch of optimizer step 2" in str(w.message) for w in caught)
    return expect(run.global_step == 5 and mod.skipped_batches == 1 and warned and finite(mod),
                  f"{mod.skipped_batches} batch skipped with a warning, trained to step {run.global_step}, "
                  "weights finite")


def padded_embedding_rows(work: Path) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from split_model.memory import HFMemory

    vocab = {w: i for i, w in enumerate("[PAD] [UNK] [CLS] [SEP] ball at swap where is the".split())}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(work / "bert")
    tok.save_pretrained(work / "bert")
    mem = HFMemory(name=str(work / "bert"), max_length=64)
    mod = module(mem, execution="dynamic").eval()
    rows = mod.reasoner.embed.table.shape[0]
    states = mem.encode_texts(["ball at where", "swap"])
    kv = mod.reasoner.encode_memory(states.states, states.mask)
    answers = mod.reasoner.generate(kv, torch.tensor([1, 0]), mem.tokenizer.bos_id, mem.tokenizer.eos_id, 3,
                                    decoder="dynamic")
    return expect(rows == len(vocab) and len(answers) == 2 and all(0 <= i < rows for a in answers for i in a),
                  f"embedding matrix of 64 rows, tokenizer of {len(vocab)} ids: reasoner table of {rows} rows; generates")


def max_length_beyond_positions(work: Path) -> str:
    from split_model.memory import HFMemory

    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 128}
    return raises(lambda: HFMemory(config=gpt2, max_length=512), ValueError, "max_length=512", "128 positions")


def long_input_refused(work: Path) -> str:
    mem = memory(max_length=16, long_inputs="error")
    return raises(lambda: mem.context_ids(["short", "x" * 40], "shells/train"), ValueError, "row 1", "40 tokens")


def long_input_truncated_with_one_warning(work: Path) -> str:
    mem = memory(max_length=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = mem.context_ids(["x" * 40, "y" * 30, "short"], "shells/train")
    warned = [str(w.message) for w in caught if "truncated" in str(w.message)]
    ok = len(warned) == 1 and "2 of the 3" in warned[0] and [len(i) for i in ids] == [16, 16, 5]
    return expect(ok, f"{len(warned)} warning: {warned[0][:120] if warned else ''}")


def _icot(work: Path, text: str):
    from split_model.tasks.icot import IcotMultiplication

    path = work / "train.txt"
    path.write_text(text)
    return lambda: IcotMultiplication(train_path=str(path)).examples("train")


def empty_data_file(work: Path) -> str:
    return raises(_icot(work, ""), ValueError, "no examples", "train.txt")


def malformed_data_line(work: Path) -> str:
    good = "1 2 * 3 4||3 6 #### 3 0 1\n"
    return raises(_icot(work, good * 2 + "1 2 * 3 4 no separator\n"), ValueError, "line 3")


def malformed_json_item(work: Path) -> str:
    from split_model.tasks import ProntoQA

    path = work / "valid.json"
    path.write_text(json.dumps([{"question": "q", "steps": [], "answer": "a"}, {"question": "q"}]))
    return raises(lambda: ProntoQA(valid_path=str(path)).examples("valid"), ValueError, "item 1", "missing key")


def missing_data_file(work: Path) -> str:
    from split_model.tasks import ProntoQA

    return raises(lambda: ProntoQA(valid_path=str(work / "nope.json")).examples("valid"), FileNotFoundError,
                  "nope.json")


def _fit_cli(work: Path, *overrides: str) -> list[str]:
    return fit_args(work / "run", "--trainer.max_steps", "1", *overrides)


def unknown_backbone(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.memory=gpt-17"), 1, "unknown backbone 'gpt-17'")


def heads_not_dividing_width(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.reasoner.n_heads=3"), 1, "not divisible by n_heads=3")


def unknown_training_mode(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.training_mode=parallel"), 2, "model.training_mode",
                     "'sequential', 'jacobi', 'off'", "Got value: parallel")


def unknown_feedback(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.reasoner.feedback=most"), 2, "model.reasoner.feedback",
                     "'none', 'last', 'all'", "most")


def generate_negative_latent_steps(work: Path) -> str:
    path = trained_checkpoint(work)
    return cli_error(["generate", "--checkpoint", str(path), "--question", "hi", "--latent-steps", "-2"], 2,
                     "--latent-steps must be >= 0, got -2")


def missing_config_file(work: Path) -> str:
    return cli_error(["fit", "--config", str(work / "nope.yaml")], 2, "nope.yaml")


def zero_batch_size(work: Path) -> str:
    return cli_error(_fit_cli(work, "--data.batch_size=0"), 1, "batch_size must be positive, got 0")


def bptt_out_of_range(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.bptt_steps=0"), 1, "bptt_steps must be positive")


def negative_latent_steps(work: Path) -> str:
    return cli_error(_fit_cli(work, "--data.latent_steps=-1"), 1, "latent_steps must be >= 0")


def max_length_beyond_positions_cli(work: Path) -> str:
    return cli_error(_fit_cli(work, "--model.memory.init_args.max_length=100000"), 1,
                     "max_length=100000 exceeds the backbone's")


SCENARIOS: list[tuple[str, str, Callable[[Path], str], bool]] = [
    # name, expected, scenario, starts processes (left out of --quick)
    ("resume-after-sigkill", "a fit killed with SIGKILL mid-epoch and resumed with --ckpt_path last ends with "
     "the weights and metrics of an uninterrupted run", resume_after_sigkill, True),
    ("ddp-predict", "predict on 2 processes writes every example once, the same rows as 1 process",
     ddp_predict_matches_one_process, True),
    ("interrupted-checkpoint-save", "a checkpoint save killed half-way leaves the previous file whole and no "
     "temporary behind", interrupted_checkpoint_save, False),
    ("truncated-checkpoint", "refused: cannot read checkpoint PATH", truncated_checkpoint, False),
    ("pickle-with-code", "refused; the pickled code never runs", pickle_with_code, False),
    ("checkpoint-without-format", "refused: it lacks its output format", checkpoint_without_format, False),
    ("checkpoint-of-another-backbone", "refused: fingerprint mismatch", checkpoint_of_another_backbone, False),
    ("text-file-as-checkpoint", "generate exits 2 with one line: not a complete torch checkpoint",
     text_file_as_checkpoint, False),
    ("damaged-cache-entry", "a truncated cache entry is moved aside with a warning and rebuilt to the same states",
     damaged_cache_entry, False),
    ("cache-manifest-of-another-backbone", "refused: written by another backbone",
     cache_manifest_of_another_backbone, False),
    ("killed-cache-writer", "a dead writer's partial temporary entry is ignored", killed_cache_writer, False),
    ("cache-key-follows-inputs", "other weights, layers, max_length, data or extraction code give another "
     "cache key", cache_key_follows_inputs, False),
    ("nan-loss-stops", "training stops at the NaN step, naming it, before the update; last.ckpt stays good",
     nan_loss_stops, False),
    ("nan-loss-skipped", "with nonfinite: skip the NaN batch is skipped with a warning and training goes on",
     nan_loss_skipped, False),
    ("padded-embedding-rows", "a backbone with more embedding rows than tokenizer ids trains and generates",
     padded_embedding_rows, False),
    ("max-length-beyond-positions", "refused: max_length exceeds the backbone's positions",
     max_length_beyond_positions, False),
    ("long-input-refused", "long_inputs: error names the row and its length", long_input_refused, False),
    ("long-input-truncated", "long_inputs: truncate cuts with one warning per data set",
     long_input_truncated_with_one_warning, False),
    ("empty-data-file", "refused: the split has no examples, naming the file", empty_data_file, False),
    ("malformed-data-line", "refused with the line number", malformed_data_line, False),
    ("malformed-json-item", "refused with the item number", malformed_json_item, False),
    ("missing-data-file", "refused, naming the path", missing_data_file, False),
    ("cli-unknown-backbone", "exit 1, one line", unknown_backbone, False),
    ("cli-heads-not-dividing-width", "exit 1, one line", heads_not_dividing_width, False),
    ("cli-unknown-training-mode", "exit 2, one line: the option, the allowed values, the value given",
     unknown_training_mode, False),
    ("cli-unknown-feedback", "exit 2, one line: the option, the allowed values, the value given", unknown_feedback,
     False),
    ("cli-missing-config-file", "exit 2, one line naming the file", missing_config_file, False),
    ("cli-generate-negative-latent-steps", "exit 2, one line", generate_negative_latent_steps, False),
    ("cli-zero-batch-size", "exit 1, one line", zero_batch_size, False),
    ("cli-bptt-out-of-range", "exit 1, one line", bptt_out_of_range, False),
    ("cli-negative-latent-steps", "exit 1, one line", negative_latent_steps, False),
    ("cli-max-length-beyond-positions", "exit 1, one line with the limit", max_length_beyond_positions_cli, False),
]


def run(args) -> dict:
    torch.set_num_threads(1)
    if not DEBUG_CONFIG.is_file():
        raise FileNotFoundError(f"bench faults reads {DEBUG_CONFIG}: run it from a checkout of the repository")
    chosen = [s for s in SCENARIOS if not (args.quick and s[3])]
    results = []
    with tempfile.TemporaryDirectory(prefix="split_model_faults_") as tmp:
        old_cache = os.environ.get("SPLIT_MODEL_CACHE")
        os.environ["SPLIT_MODEL_CACHE"] = str(Path(tmp) / "split_model")  # nothing lands in the user's cache
        try:
            for i, (name, expected, scenario, _) in enumerate(chosen, 1):
                work = Path(tmp) / name
                work.mkdir()
                try:
                    observed, ok = scenario(work), True
                except Broken as e:
                    observed, ok = str(e), False
                except Exception as e:  # an unexpected failure is a scenario that did not behave
                    observed, ok = f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]}", False
                log(f"[{i}/{len(chosen)}] {name}: {'ok' if ok else 'NOT OK'}: {observed[:160]}")
                results.append({"name": name, "expected": expected, "observed": observed, "ok": ok})
        finally:
            if old_cache is None:
                os.environ.pop("SPLIT_MODEL_CACHE", None)
            else:
                os.environ["SPLIT_MODEL_CACHE"] = old_cache
    return {"tried": len(results), "ok": sum(r["ok"] for r in results), "scenarios": results}


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "fit-until":
        fit_until(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit("usage: python -m split_model.bench.faults fit-until ROOT KILL_AT [fit arguments]")
