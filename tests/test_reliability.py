"""What survives a crash and what refuses bad files: a run killed with SIGKILL resumes to the
same weights; checkpoints, cache entries and results are all-or-nothing; a NaN stops (or
skips) a step before it changes the weights; an unsafe or incomplete checkpoint is refused;
a damaged cache entry is rebuilt, never read."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from split_model import files
from split_model.bench.faults import finite, poison, run_fit
from split_model.memory import MemoryCache
from split_model.memory import cache as cache_module
from split_model.training import SplitModelModule, load_checkpoint
from split_model.training.checkpoints import AtomicCheckpointIO
from split_model.training.data import EpochSampler
from split_model.training.module import NonFiniteError

TEXTS = ["the ball is under cup 1", "swap 1 and 2", "swap 2 and 3; where is the ball?"]


# -- resume after SIGKILL ---------------------------------------------------------------------------
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """20 steps of 6 batches per epoch, checkpoints every 5 steps: killed after step 13, the run
    restarts from step 10 (epoch 1, batch 4 of 6) and must end bit-identical to an
    uninterrupted run. Without the data loader's saved position it does not (the resumed
    epoch would start over)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_fit(whole, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = run_fit(killed, 13)
    assert crash.returncode == -9  # SIGKILL: no cleanup, no final checkpoint
    assert not (killed / "final.json").exists()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 10
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 4, "seed": 0}]
    resumed = run_fit(killed, 0, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, killed))
    assert a["global_step"] == b["global_step"] == 20
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["metrics"] == b["metrics"] and "val/accuracy" in a["metrics"]


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_part_way():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(EpochSampler(10, seed=3)) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(second) == list(range(10))
    s.resume_at(1, 4)
    assert list(s) == second[4:]
    assert list(s) == second  # the skip applies to one pass only
    s.resume_at(0, 4)
    assert list(s) == second  # a position saved in another epoch does not apply


# -- checkpoints: atomic, safe, complete ---------------------------------------------------------------
def test_an_interrupted_checkpoint_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt  # as a kill would interrupt it

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_training_writes_checkpoints_atomically(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"))
    dm = tiny.data(module, tmp_path / "cache")
    trainer = tiny.trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_temporary_names_differ_across_hosts_and_calls(tmp_path, monkeypatch):
    target = tmp_path / "states"
    names = {files.temporary_name(target) for _ in range(20)}
    monkeypatch.setattr(socket, "gethostname", lambda: "other-node")
    other = files.temporary_name(target)
    assert len(names) == 20 and other not in names
    assert "other-node" in other.name and str(os.getpid()) in other.name and other.name.startswith(".")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    Evil.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"split_model": {"format": {}}, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match=r"pickled posix.system, which is refused"):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A tiny model trained 4 steps by a plain Trainer.fit, never connected by hand."""
    from split_model.training import TaskDataModule

    root = tmp_path_factory.mktemp("trained")
    module = tiny.module(tiny.memory("llama"))
    dm = TaskDataModule(tiny.task(), steps="latent", batch_size=16, cache_dir=str(root / "cache"))
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    tiny.trainer(root, max_steps=4, enable_checkpointing=True, callbacks=[checkpoints]).fit(module, datamodule=dm)
    return checkpoints.last_model_path


def test_a_plain_fit_connects_the_data_and_saves_the_format(trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["split_model"]["format"]["steps"] == "latent"
    assert load_checkpoint(trained).formatter.steps == "latent"


def test_a_checkpoint_without_its_output_format_is_refused(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["split_model"]["format"] = None
    path = tmp_path / "no_format.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="lacks format"):
        load_checkpoint(str(path))


# -- numerical faults ----------------------------------------------------------------------------------
def test_a_nan_loss_stops_training_before_the_update_and_keeps_the_checkpoint(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"))
    dm = tiny.data(module, tmp_path / "cache")
    poison(module, 3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)
    trainer = tiny.trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoints])
    with pytest.raises(NonFiniteError, match=r"optimizer step 3 .*loss nan.*last\.ckpt"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and finite(module)
    kept = load_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert finite(kept)


def test_skip_leaves_the_weights_of_a_nan_step_untouched_and_trains_on(tiny, tmp_path):
    module = SplitModelModule(memory=tiny.memory("llama"), reasoner=tiny.reasoner_config(), lr=3e-3, warmup_steps=2,
                              nonfinite="skip")
    dm = tiny.data(module, tmp_path / "cache")
    poison(module, 2)
    seen = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                seen["before"] = [p.detach().clone() for p in pl_module.reasoner.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "before" in seen and "after" not in seen:
                seen["after"] = [p.detach().clone() for p in pl_module.reasoner.parameters()]

    with pytest.warns(UserWarning, match="skipped the batch of optimizer step 2"):
        tiny.trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[Watch()]).fit(module, datamodule=dm)
    assert module.skipped_batches == 1 and finite(module)
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))


# -- memory cache entries ------------------------------------------------------------------------------
def test_a_damaged_cache_entry_is_rebuilt_never_read(tiny, tmp_path):
    memory = tiny.memory("llama")
    good = MemoryCache(tmp_path, memory).get(TEXTS)
    want = [good.row(i).clone() for i in range(len(TEXTS))]
    states = good.path / "states.npy"
    del good
    states.write_bytes(states.read_bytes()[:-100])  # truncated on disk
    with pytest.warns(UserWarning, match="unreadable.*moved to .*damaged"):
        again = MemoryCache(tmp_path, memory).get(TEXTS)
    assert all(torch.equal(again.row(i), w) for i, w in enumerate(want))
    assert len(list(again.path.parent.glob("*.damaged-*"))) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(fingerprint="0" * 64), "another backbone"),
    (lambda m: m.update(rows=99), "99 rows"),
    (lambda m: m.update(tokens="many"), "wrong type: tokens"),
])
def test_a_manifest_that_disagrees_is_caught(tiny, tmp_path, edit, message):
    memory = tiny.memory("llama")
    path = MemoryCache(tmp_path, memory).get(TEXTS).path
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        cache_module._open(path, expected_rows=len(TEXTS), fingerprint=memory.fingerprint)
    with pytest.warns(UserWarning, match=message):
        MemoryCache(tmp_path, memory).get(TEXTS)  # rebuilt


def test_a_killed_writers_leftover_is_ignored(tiny, tmp_path):
    memory = tiny.memory("llama")
    cache = MemoryCache(tmp_path, memory)
    _, path = cache._entry(TEXTS, "memory")
    leftover = path.with_name(f".{path.name}.tmp-deadhost-123-abcd")
    leftover.mkdir(parents=True)
    np.save(leftover / "states.npy", np.zeros((1, 1, 1), np.float16))  # half a write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cache.get(TEXTS)
    assert got.path == path and len(got) == len(TEXTS) and got.states.shape[0] > 1


def test_the_cache_key_follows_everything_the_states_depend_on(tiny, tmp_path, monkeypatch):
    memory = tiny.memory("llama")
    base = MemoryCache(tmp_path, memory)
    ids, _ = base._entry(TEXTS, "memory")
    key = base.key(ids)
    assert MemoryCache(tmp_path, tiny.memory("llama", seed=1)).key(ids) != key  # other weights
    assert MemoryCache(tmp_path, tiny.memory("llama", n_layers=1)).key(ids) != key  # other layers
    short = MemoryCache(tmp_path, tiny.memory("llama", max_length=8))
    assert short.key(short._entry(TEXTS, "memory")[0]) != key  # other max_length: other ids
    assert base.key(ids[:-1]) != key  # other data
    monkeypatch.setattr(cache_module, "extraction_code", lambda: "changed")
    assert base.key(ids) != key  # other state-extraction code


def test_results_files_are_written_whole(tmp_path, monkeypatch):
    path = files.write_text(tmp_path / "r.json", "{}\n")
    assert path.read_text() == "{}\n"

    def broken(self, text, encoding=None):
        Path.write_bytes(self, text[:1].encode())
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_text(tmp_path / "r.json", '{"a": 1}\n')
    monkeypatch.undo()
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_generation_refuses_negative_latent_counts_and_an_empty_budget(tiny):
    module = tiny.module(tiny.memory("llama")).eval()
    tok = module.memory.tokenizer
    states = module.memory.encode_texts(TEXTS[:2])
    mem = module.reasoner.encode_memory(states.states, states.mask)
    with pytest.raises(ValueError, match="latent step counts must be >= 0, got -1"):
        module.reasoner.generate(mem, torch.tensor([2, -1]), tok.bos_id, tok.eos_id, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        module.reasoner.generate(mem, torch.tensor([2, 1]), tok.bos_id, tok.eos_id, 0)
    assert len(module.reasoner.generate(mem, torch.tensor([2, 0]), tok.bos_id, tok.eos_id, 4)) == 2


def test_a_saved_position_applies_only_to_its_own_epoch():
    """A checkpoint written at the end of a shortened epoch (limit_train_batches) says 2 of 4
    batches; the next epoch must start from its first batch and count from 0."""
    from split_model.training.data import ResumableLoader

    loader = ResumableLoader(list(range(8)), batch_size=2, sampler=EpochSampler(8, seed=0))
    loader.load_state_dict({"epoch": 0, "batches": 2, "seed": 0})
    loader.sampler.set_epoch(1)
    assert [int(x) for batch in loader for x in batch] == EpochSampler(8, seed=0).order(1)
    assert loader.delivered == 4
    loader.load_state_dict({"epoch": 1, "batches": 3, "seed": 0})
    assert [int(x) for batch in loader for x in batch] == EpochSampler(8, seed=0).order(1)[6:]
    assert loader.state_dict() == {"epoch": 1, "batches": 4, "seed": 0}
    with pytest.raises(ValueError, match="shuffled with seed 5"):
        loader.load_state_dict({"epoch": 1, "batches": 1, "seed": 5})
