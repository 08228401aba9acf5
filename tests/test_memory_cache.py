"""The state cache's storage and encoding: float16 on disk (half of fp32, fp32 when read, no
silent inf), batches filled to a token budget that do not change any row's states, the
encoding precision per device and in the key, and waiting for another process's entry."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from split_model.memory import MemoryCache, encode_dtype, token_batches
from split_model.memory.cache import FP16_MAX

TEXTS = ["ball at 2. swap 0 1. swap 1 2. where is the ball?", "hi", "ball at 0. where is the ball?",
         "ball at 1. swap 0 2. where is the ball?", "swap 2 1.", "ball at 2. swap 1 0. swap 0 2. swap 2 1."]
FP16 = {"rtol": 1e-3, "atol": 1e-5}  # float16 keeps 11 significant bits


def count_forward_calls(memory, monkeypatch) -> list:
    calls: list = []
    forward = memory.model.forward
    monkeypatch.setattr(memory.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


# -- float16 on disk -------------------------------------------------------------------------------
def test_fp16_cache_takes_half_the_bytes_of_fp32(tiny, tmp_path):
    memory = tiny.memory("llama", layers=[1, -1])
    cached = MemoryCache(tmp_path, memory).get(TEXTS)
    n_values = cached.states.shape[0] * memory.num_states * memory.hidden_size
    on_disk = (cached.path / "states.npy").stat().st_size
    assert cached.states.dtype == np.float16
    assert 0.5 <= on_disk / (4 * n_values) < 0.52  # 2 bytes a value, plus the .npy header
    assert json.loads((cached.path / "manifest.json").read_text())["stored_as"] == "float16"


def _embed(memory, byte: str, value: float) -> None:
    """Sets one coordinate of a byte's embedding: with layers=[0] it is that token's state."""
    with torch.no_grad():
        memory.model.get_input_embeddings().weight[ord(byte), 0] = value


def test_states_beyond_fp16_are_clamped_with_one_warning(tiny, tmp_path):
    memory = tiny.memory("llama", layers=[0])
    _embed(memory, "a", 1e6)
    _embed(memory, "w", -3e5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = MemoryCache(tmp_path, memory, tokens_per_batch=64).get(TEXTS, desc="shells/train")  # many batches
    clamp_warnings = [w for w in caught if "clamped" in str(w.message)]
    assert len(clamp_warnings) == 1 and "shells/train" in str(clamp_warnings[0].message)
    direct = memory.encode_texts(TEXTS).states
    n_big = sum(t.count("a") + t.count("w") for t in TEXTS)
    assert int((direct.abs() > FP16_MAX).sum()) == n_big > 0
    for i, text in enumerate(TEXTS):
        row = cached.row(i)[:, 0, 0]
        assert torch.isfinite(row).all()
        want = torch.tensor([{"a": FP16_MAX, "w": -FP16_MAX}.get(c, 0.0) for c in text])
        big = want != 0
        assert torch.equal(row[big], want[big])
        torch.testing.assert_close(row[~big], direct[i, : len(text), 0, 0][~big], **FP16)
    assert json.loads((cached.path / "manifest.json").read_text())["clamped"] == n_big


def test_non_finite_states_are_refused(tiny, tmp_path):
    memory = tiny.memory("llama", layers=[0])
    _embed(memory, "h", float("nan"))
    with pytest.raises(ValueError, match="non-finite states while encoding shells/train.*float32"):
        MemoryCache(tmp_path, memory).get(TEXTS, desc="shells/train")
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # nothing half-made left behind


# -- batches filled to a token budget --------------------------------------------------------------
def test_token_batches_fill_the_budget_longest_first():
    lengths = np.array([5, 30, 10, 10, 30, 1, 100])
    batches = token_batches(lengths, tokens_per_batch=60, max_rows=3)
    assert [b.tolist() for b in batches] == [[6], [1, 4], [2, 3, 0], [5]]  # 100 > 60: alone; rows capped at 3
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches[1:]:
        assert len(b) * lengths[b].max() <= 60


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("tokens_per_batch, n_batches", [(1, 6), (100, 3), (16384, 1)])
def test_every_row_equals_its_encoding_alone_whatever_the_batching(tiny, tmp_path, monkeypatch, family,
                                                                   tokens_per_batch, n_batches):
    memory = tiny.memory(family, layers=[1, -1])
    alone = [memory.encode_texts([t]).states[0] for t in TEXTS]  # (N_i, S, D), no padding at all
    calls = count_forward_calls(memory, monkeypatch)
    cached = MemoryCache(tmp_path, memory, tokens_per_batch=tokens_per_batch).get(TEXTS)
    assert len(calls) == n_batches
    for i, want in enumerate(alone):
        torch.testing.assert_close(cached.row(i), want, **FP16)


def test_bad_batch_budget_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="tokens_per_batch and max_rows must be positive, got 0"):
        MemoryCache(tmp_path, tiny.memory("llama"), tokens_per_batch=0)


# -- precision per device, part of the key ------------------------------------------------------------
def test_precision_is_fp32_on_cpu_and_as_asked_otherwise():
    assert encode_dtype("cpu") is torch.float32
    assert encode_dtype("cpu", "bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16; got 'half'"):
        encode_dtype("cpu", "half")


@pytest.mark.parametrize("native_bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_is_bf16_where_the_card_has_it(monkeypatch, native_bf16, want):
    """The CUDA branch, run here without CUDA: emulated bf16 (pre-Ampere) must not count."""
    asked: list = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert encode_dtype(torch.device("cuda", 0)) is want
    assert asked == [False]


def test_precision_is_part_of_the_key(tiny, tmp_path):
    memory = tiny.memory("llama", layers=[1, -1])
    full = MemoryCache(tmp_path, memory, dtype="float32").get(TEXTS)
    low = MemoryCache(tmp_path, memory, dtype="bfloat16").get(TEXTS)  # autocast, as on a GPU
    assert full.path != low.path
    assert json.loads((low.path / "manifest.json").read_text())["computed_in"] == "bfloat16"
    assert not torch.equal(low.row(0), full.row(0))
    torch.testing.assert_close(low.row(0), full.row(0), rtol=5e-2, atol=5e-2)
    assert memory.model.get_input_embeddings().weight.dtype == torch.float32  # weights untouched


# -- waiting for another process's entry -----------------------------------------------------------
def test_wait_returns_once_another_process_has_written_the_entry(tiny, tmp_path, monkeypatch):
    builder, waiter = tiny.memory("llama"), tiny.memory("llama")  # same backbone, two "processes"
    calls = count_forward_calls(waiter, monkeypatch)

    def build_later():
        time.sleep(0.3)
        MemoryCache(tmp_path, builder).get(TEXTS)

    thread = threading.Thread(target=build_later)
    thread.start()
    got = MemoryCache(tmp_path, waiter).wait(TEXTS, timeout_s=60, poll_s=0.05)
    thread.join()
    assert calls == []
    assert len(got) == len(TEXTS)
    torch.testing.assert_close(got.row(1), waiter.encode_texts([TEXTS[1]]).states[0], **FP16)


def test_wait_times_out_with_a_message_that_says_where_to_look(tiny, tmp_path):
    cache = MemoryCache(tmp_path, tiny.memory("llama"))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"shells/train did not appear .* within 0.2 s.*prepare_data") as err:
        cache.wait(TEXTS, desc="shells/train", timeout_s=0.2, poll_s=0.05)
    assert time.monotonic() - start < 5
    assert str(tmp_path) in str(err.value) and "cache_wait_s" in str(err.value)
