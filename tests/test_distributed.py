"""DDP and the frozen memory: once marked, DistributedDataParallel holds none of the memory's
parameters or buffers (no broadcast, no gradient buckets), and only a frozen memory may be
marked. Runs DDP for real: in a one-process gloo group, and in a two-process Lightning fit on
the CPU, where only the rank that prepares the data runs the memory."""

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
