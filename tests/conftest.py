"""Shared test setup: one CPU thread, a private cache root, and builders of tiny parts.

Every backbone here is a random-weight inline config (nothing is downloaded), every task a
small shell game, every trainer a CPU trainer that logs nothing. Tests get the builders
through the `tiny` fixture: `tiny.memory("gpt2")`, `tiny.module(memory)`, `tiny.trainer(dir)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)  # the machine has 2 cores, shared with benchmarks

REPO = Path(__file__).resolve().parents[1]

# Tiny random backbones of the three families the memory must handle.
BACKBONES: dict[str, dict] = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "bert": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128},
}
_LAYER_KEY = {"llama": "num_hidden_layers", "gpt2": "n_layer", "bert": "num_hidden_layers"}


def pytest_configure(config):
    # Expected with a frozen memory and tiny data; they only bury real warnings.
    for pattern in (r"Found \d+ module\(s\) in eval mode", "The number of training batches",
                    ".*isinstance.treespec, LeafSpec", "does not have many workers",
                    "Checkpoint directory .* exists and is not empty"):
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")


_SEED_ENVIRONMENT = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}


@pytest.fixture(autouse=True)
def _seed_environment_restored():
    """Lightning's seed_everything (a CLI fit, with the config's seed) writes PL_GLOBAL_SEED,
    which seeds the data order of every later fit in the process: after each test it is as
    the session began, so no test's outcome depends on which tests ran before it."""
    yield
    for key, value in _SEED_ENVIRONMENT.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def _private_cache_root(tmp_path_factory):
    """Whatever falls back on cache_root() writes into a temporary directory, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLIT_MODEL_CACHE", str(tmp_path_factory.mktemp("split_model_cache")))
        yield


def backbone_config(family: str = "llama", n_layers: int | None = None) -> dict:
    cfg = dict(BACKBONES[family])
    if n_layers is not None:
        cfg[_LAYER_KEY[family]] = n_layers
    return cfg


def tiny_memory(family: str = "llama", *, n_layers: int | None = None, seed: int = 0, **kwargs):
    from split_model.memory import HFMemory

    return HFMemory(config=backbone_config(family, n_layers), seed=seed, **{"max_length": 128, **kwargs})


def tiny_task(**kwargs):
    from split_model.tasks import StateTracking

    return StateTracking(**{"n_items": 3, "length": 3, "n_train": 64, "n_valid": 16, "n_test": 16, **kwargs})


def tiny_reasoner_config(**kwargs):
    from split_model.reasoner import ReasonerConfig

    return ReasonerConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "embed_rank": 8, "feedback": "all", **kwargs})


def tiny_module(memory, *, lr: float = 3e-3, warmup_steps: int = 2, bptt_steps: int | None = None,
                execution: str = "auto", matmul_precision: str = "high", **reasoner):
    from split_model.training import SplitModelModule

    return SplitModelModule(memory=memory, reasoner=tiny_reasoner_config(**reasoner), lr=lr,
                            warmup_steps=warmup_steps, bptt_steps=bptt_steps, execution=execution,
                            matmul_precision=matmul_precision)


def tiny_data(module, cache_dir: Path, *, steps: str = "latent", batch_size: int = 16, latent_steps: int = 0, **task):
    """A connected data module (the model has its formatter, the data its backbone)."""
    from split_model.training import TaskDataModule

    dm = TaskDataModule(tiny_task(**task), steps=steps, latent_steps=latent_steps, batch_size=batch_size,
                        cache_dir=str(cache_dir))
    dm.connect(module)
    return dm


def tiny_trainer(root: Path, **kwargs):
    from lightning.pytorch import Trainer

    args = {"accelerator": "cpu", "devices": 1, "max_steps": 4, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "num_sanity_val_steps": 0, **kwargs}
    return Trainer(**args)


@pytest.fixture(scope="session")
def tiny():
    """The builders above, as one fixture."""
    return SimpleNamespace(config=backbone_config, memory=tiny_memory, task=tiny_task,
                           reasoner_config=tiny_reasoner_config, module=tiny_module, data=tiny_data,
                           trainer=tiny_trainer, repo=REPO)
