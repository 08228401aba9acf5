"""The data module around the cache: batches equal to padding item by item, the memory
encodes on the trainer's device, and under DDP only the rank that prepares the data encodes
while the others wait for its entry on disk."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from split_model.training import collate
from split_model.training import data as data_module
from split_model.training.format import IGNORE


def collate_reference(items) -> dict:
    """Pads item by item: the plain definition that `collate` must reproduce exactly."""
    b, n = len(items), max(len(it.states) for it in items)
    seqs = [it.steps.tolist() for it in items]
    t = max(len(s) for s in seqs)
    out = {"mem_states": torch.zeros(b, n, *items[0].states.shape[1:]), "mem_mask": torch.zeros(b, n, dtype=torch.bool),
           "tokens": torch.zeros(b, t, dtype=torch.long), "latent": torch.zeros(b, t, dtype=torch.bool),
           "labels": torch.full((b, t), IGNORE, dtype=torch.long), "answer_mask": torch.zeros(b, t, dtype=torch.bool)}
    for i, (it, seq) in enumerate(zip(items, seqs)):
        out["mem_states"][i, : len(it.states)] = it.states
        out["mem_mask"][i, : len(it.states)] = True
        for key, column in zip(("tokens", "latent", "labels", "answer_mask"), zip(*seq)):
            out[key][i, : len(seq)] = torch.tensor(column)
    out["n_latent"] = torch.tensor([it.n_latent for it in items])
    return out


def train_split(tiny, module, cache_dir, **kwargs):
    dm = data_module.TaskDataModule(tiny.task(n_items=5, **kwargs.pop("task")), cache_dir=str(cache_dir), **kwargs)
    dm.connect(module)
    dm.setup("fit")
    return dm.datasets["train"]


@pytest.mark.parametrize("steps, latent_steps", [("text", 0), ("latent", 1)])
def test_collate_equals_padding_item_by_item(tiny, tmp_path, steps, latent_steps):
    module = tiny.module(tiny.memory("llama"))
    # Games of 2 and 5 swaps: questions (N) and step sequences (T) of different lengths.
    splits = [train_split(tiny, module, tmp_path, steps=steps, latent_steps=latent_steps, task={"length": n})
              for n in (2, 5)]
    items = [d[i] for d in splits for i in range(6)]
    got, want = collate(items), collate_reference(items)
    assert set(got) == set(want) | {"examples"}
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].is_contiguous(), key
        assert torch.equal(got[key], value), key
    assert not got["mem_mask"].all() and (got["labels"][:6, -1] == IGNORE).all()  # both padded
    sequences = [s for d in splits for s in d.sequences[:6]]
    for i, seq in enumerate(sequences):  # the items are the formatter's sequences
        k = len(seq.tokens)
        assert got["tokens"][i, :k].tolist() == seq.tokens and got["labels"][i, :k].tolist() == seq.labels
        assert got["latent"][i, :k].tolist() == seq.latent and got["answer_mask"][i, :k].tolist() == seq.answer
    assert list(got["examples"]) == [e for d in splits for e in d.examples[:6]]


def test_label_sets_of_different_widths_pad_with_ignore():
    from split_model.memory import ByteTokenizer
    from split_model.tasks import Example
    from split_model.training.format import Formatter

    f = Formatter(ByteTokenizer(), steps="latent", step_token="set")
    wide = [Example("q", ("a b c", "a b c d"), "x")]
    narrow = [Example("q", ("z",), "y")]
    steps = [data_module._step_tensors([f.encode(e) for e in exs])[0] for exs in (wide, narrow)]
    assert [s.shape for s in steps] == [(2 + 2, 4 + 4), (1 + 2, 4 + 1)]  # each split as wide as its largest set
    items = [data_module.Item(torch.zeros(1, 2, 3), s, n, e) for s, n, e in zip(steps, (2, 1), (*wide, *narrow))]
    got = collate(items)
    a, b, c, d, z = (ord(ch) for ch in "abcdz")
    assert got["label_sets"].tolist() == [
        [[a, b, c, IGNORE], [a, b, c, d], *[[IGNORE] * 4] * 2],  # latent, latent, bos, answer
        [[z, IGNORE, IGNORE, IGNORE], *[[IGNORE] * 4] * 3],  # the last position is padding
    ]
    assert got["labels"][:, :2].tolist() == [[IGNORE, IGNORE], [IGNORE, ord("y")]]


# -- the trainer's device -------------------------------------------------------------------------
def fake_trainer(device: str, world_size: int = 1) -> SimpleNamespace:
    """What the data module reads of a trainer: its device, world size and stage."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=world_size,
                           state=SimpleNamespace(fn="fit"))


def test_prepare_data_encodes_on_the_trainers_device_not_the_models(tiny, tmp_path, monkeypatch):
    """Lightning calls prepare_data while the model is still on the CPU."""
    module = tiny.module(tiny.memory("llama"))
    dm = tiny.data(module, tmp_path)
    dm.memory_dtype = "float32"  # "auto" would ask a CUDA device (absent here) for bf16
    seen = []
    monkeypatch.setattr(data_module.MemoryCache, "get", lambda cache, texts, desc: seen.append(cache.device))
    dm.trainer = fake_trainer("cuda:1")
    dm.prepare_data()
    assert seen == [torch.device("cuda", 1)] * 2  # train and valid
    assert module.memory.device == torch.device("cpu")


def test_without_a_trainer_the_memory_encodes_where_it_is(tiny, tmp_path, monkeypatch):
    dm = tiny.data(tiny.module(tiny.memory("llama")), tmp_path)
    devices = []
    forward = dm.memory.model.forward
    monkeypatch.setattr(dm.memory.model, "forward", lambda input_ids, **k: devices.append(input_ids.device)
                        or forward(input_ids=input_ids, **k))
    dm.prepare_data()
    assert devices and set(devices) == {dm.memory.device}


# -- DDP: one rank encodes, the others wait on the file system ------------------------------------
def test_ddp_ranks_that_did_not_prepare_wait_for_the_entry_and_never_encode(tiny, tmp_path, monkeypatch):
    rank0 = tiny.data(tiny.module(tiny.memory("llama")), tmp_path)
    rank1 = tiny.data(tiny.module(tiny.memory("llama")), tmp_path)  # same backbone, another "process"
    rank1.trainer = fake_trainer("cpu", world_size=2)
    calls: list = []
    forward = rank1.memory.model.forward
    monkeypatch.setattr(rank1.memory.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))

    def prepare_later():
        time.sleep(0.3)
        rank0.prepare_data()

    thread = threading.Thread(target=prepare_later)
    thread.start()
    rank1.setup("fit")
    thread.join()
    assert calls == []
    assert len(rank1.datasets["train"]) == 64 and len(rank1.datasets["valid"]) == 16


def test_ddp_rank_without_the_entry_times_out_with_a_clear_message(tiny, tmp_path):
    dm = data_module.TaskDataModule(tiny.task(), steps="latent", cache_dir=str(tmp_path), cache_wait_s=0.1)
    dm.connect(tiny.module(tiny.memory("llama")))
    dm.trainer = fake_trainer("cpu", world_size=2)
    with pytest.raises(TimeoutError, match=r"state_tracking/train did not appear.*prepare_data.*cache_wait_s"):
        dm.setup("fit")


def test_step_labelling_settings_reach_the_model_formatter(tiny):
    module = tiny.module(tiny.memory("llama"))
    dm = data_module.TaskDataModule(tiny.task(), steps="latent", step_token="first", fixed_steps=5)
    dm.connect(module)
    assert module.formatter is dm.formatter
    assert (module.formatter.spec["step_token"], module.formatter.spec["fixed_steps"]) == ("first", 5)
    assert module.formatter.n_latent(tiny.task().examples("train")[0]) == 5  # whatever the chain's length


def test_bad_token_budget_is_refused(tiny):
    with pytest.raises(ValueError, match="tokens_per_batch must be positive, got 0"):
        data_module.TaskDataModule(tiny.task(), tokens_per_batch=0)


# -- on a GPU (skipped on this project's CPU machine) ------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_fit_encodes_on_the_gpu(tiny, tmp_path, monkeypatch):
    module = tiny.module(tiny.memory("llama"))
    dm = tiny.data(module, tmp_path / "cache")
    devices = []
    forward = module.memory.model.forward
    monkeypatch.setattr(module.memory.model, "forward", lambda input_ids, **k: devices.append(input_ids.device)
                        or forward(input_ids=input_ids, **k))
    trainer = tiny.trainer(tmp_path, accelerator="gpu", max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert devices and {d.type for d in devices} == {"cuda"}
