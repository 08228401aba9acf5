"""DDP and the frozen memory: once marked, DistributedDataParallel holds none of the memory's
parameters or buffers (no broadcast, no gradient buckets), and only a frozen memory may be
marked. Runs DDP for real: in a one-process gloo group, and in a two-process Lightning fit on
the CPU, where only the rank that prepares the data runs the memory.

Predictions under DDP: a two-process Lightning predict writes predictions.jsonl with every
test example exactly once, in dataset order, whether the ranks' shares are uneven (Lightning's
sampler) or padded with repeats (torch's DistributedSampler); in one process the file holds
exactly what predict_step returned."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from split_model.training.distributed import ignore_frozen_memory
from split_model.training.predictions import (PredictionWriter, attach_prediction_writer, indexed_rows,
                                              merge_predictions, save_predictions)


@pytest.fixture
def process_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def memory_names(module) -> tuple[set[str], set[str]]:
    return ({n for n, _ in module.named_parameters() if n.startswith("memory.")},
            {n for n, _ in module.named_buffers() if n.startswith("memory.")})


def test_ddp_holds_none_of_the_frozen_memory(tiny, process_group):
    module = tiny.module(tiny.memory("bert"))  # BERT carries buffers (position and token type ids)
    params, buffers = memory_names(module)
    assert params and buffers
    module._ddp_params_and_buffers_to_ignore = ["reasoner.kept_by_someone_else"]
    assert set(ignore_frozen_memory(module)) == params | buffers
    ddp = DistributedDataParallel(module)
    assert ddp.parameters_to_ignore == params | buffers | {"reasoner.kept_by_someone_else"}
    assert {id(p) for p in ddp._module_parameters} == {id(p) for p in module.reasoner.parameters()}
    assert not any(n.startswith("memory.") for n in ddp.named_module_buffers)


def test_without_the_mark_ddp_would_sync_the_memory(tiny, process_group):
    """The contrast that makes the test above mean something."""
    module = tiny.module(tiny.memory("bert"))
    params, buffers = memory_names(module)
    ddp = DistributedDataParallel(module)
    held = {id(p) for p in ddp._module_parameters}
    assert params <= {n for n, p in module.named_parameters() if id(p) in held}
    assert buffers <= set(ddp.named_module_buffers)


def test_a_trainable_memory_parameter_is_refused(tiny):
    module = tiny.module(tiny.memory("llama"))
    next(module.memory.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 parameters under 'memory' require grad \(e.g. memory\.model\."):
        ignore_frozen_memory(module)
    assert not hasattr(module, "_ddp_params_and_buffers_to_ignore")


def test_a_missing_prefix_is_named(tiny):
    with pytest.raises(ValueError, match="no parameters or buffers under 'backbone'"):
        ignore_frozen_memory(tiny.module(tiny.memory("llama")), prefix="backbone")


def test_two_process_ddp_fit_encodes_once_and_syncs_no_memory(tmp_path):
    """Lightning's own DDP, two CPU processes: rank 0 encodes in prepare_data, rank 1 reads its
    entry from disk, and DDP holds none of the memory on either rank."""
    env = {**os.environ, "SPLIT_MODEL_CACHE": str(tmp_path / "split_model"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "_ddp_fit.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert [r["memory_calls"] for r in reports] == [2, 0]  # train and valid, on rank 0 only
    assert not any(r["ddp_holds_memory_params"] or r["ddp_memory_buffers"] for r in reports)


def run_script(name: str, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPLIT_MODEL_CACHE": str(work / "split_model"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(Path(__file__).parent / name), str(work)],
                          capture_output=True, text=True, env=env, timeout=300)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_process_ddp_predict_writes_every_example_once_in_order(tmp_path):
    """15 examples in batches of 4 on two CPU processes: neither rank predicts them all, one run
    has uneven shares, the other a padded repeat, and the file holds each example once, in order."""
    done = run_script("_ddp_predict.py", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("lightning", "padded"):
        out = tmp_path / run
        questions = json.loads((out / "questions.json").read_text())
        reports = [json.loads((out / f"report_{rank}.json").read_text()) for rank in (0, 1)]
        assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
        seen = [i for r in reports for i in r["indices"]]
        assert all(r["rows"] == len(r["indices"]) < len(questions) for r in reports)
        assert sorted(set(seen)) == list(range(len(questions))) == list(range(15))
        assert len(seen) == (16 if run == "padded" else 15)  # the padded run predicts example 0 twice
        rows = read_rows(out / "predictions.jsonl")
        assert [r["question"] for r in rows] == questions
        assert all(set(r) == {"question", "prediction", "answer", "score"} for r in rows)
        assert sorted(os.listdir(out)) == ["predictions.jsonl", "questions.json", "report_0.json", "report_1.json"]
        line = f"15 predictions written to {out / 'predictions.jsonl'}; accuracy "
        assert done.stdout.count(line) == 1  # printed by rank 0 only


def test_one_process_predict_writes_what_predict_step_returned(tiny, tmp_path, capsys):
    module = tiny.module(tiny.memory("gpt2"))
    dm = tiny.data(module, tmp_path / "cache", batch_size=4, n_test=15)
    writer = PredictionWriter()
    trainer = tiny.trainer(tmp_path / "root", callbacks=[writer])
    assert attach_prediction_writer(trainer) is writer and trainer.callbacks.count(writer) == 1
    batches = trainer.predict(module, datamodule=dm)
    returned = [row for batch in batches for row in batch]
    out = tmp_path / "root" / "predictions.jsonl"
    assert writer.path == out
    assert out.read_text() == "".join(json.dumps(r) + "\n" for r in returned)
    assert [r["question"] for r in returned] == [e.question for e in dm.datasets["test"].examples]
    acc = sum(r["score"] for r in returned) / 15
    assert capsys.readouterr().out.splitlines()[-1] == f"15 predictions written to {out}; accuracy {acc:.4f}"
    assert os.listdir(out.parent) == ["predictions.jsonl"]


def test_rows_are_keyed_by_dataset_index_and_repeats_dropped():
    rank0 = indexed_rows([[{"q": 0}, {"q": 2}], [{"q": 4}]], [[0, 2], [4]])
    rank1 = indexed_rows([[{"q": 1}, {"q": 3}], [{"q": 0, "repeat": True}]], [[1, 3], [0]])
    assert merge_predictions([rank0, rank1]) == [{"q": i} for i in range(5)]
    assert indexed_rows([[{"q": 0}], [{"q": 1}]], None) == [(0, {"q": 0}), (1, {"q": 1})]
    with pytest.raises(ValueError, match="batch 1: 1 predictions for 2 examples"):
        indexed_rows([[{"q": 0}], [{"q": 1}]], [[0], [1, 2]])


def test_saving_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, capsys):
    (tmp_path / "predictions.jsonl").write_text("old\n")
    rows = [{"question": "a", "score": 1.0}, {"question": "b", "score": 0.0}]
    out = save_predictions(rows, tmp_path)
    assert read_rows(out) == rows and os.listdir(tmp_path) == ["predictions.jsonl"]
    assert capsys.readouterr().out == f"2 predictions written to {out}; accuracy 0.5000\n"
