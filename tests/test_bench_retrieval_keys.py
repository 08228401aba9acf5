"""The retrieval-keys bench's parts: the query it states for a fact, and recall@k."""

from __future__ import annotations

import pytest
import torch

from split_model.bench.retrieval_keys import recall, stated_query


def test_a_stated_query_is_the_fact_without_its_answer():
    assert stated_query("The friend of Selin is Perga.") == ("The friend of Selin is", "relation")
    assert stated_query("Selin lives in Rome.") == ("Selin lives in", "city")
    with pytest.raises(ValueError, match="not a fact of a knowledge world: 'Selin likes Rome.'"):
        stated_query("Selin likes Rome.")


def test_recall_counts_the_gold_chunk_among_the_k_most_similar_keys():
    keys = torch.eye(20)
    queries = torch.zeros(2, 20)
    queries[0, :5] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6])  # gold 0 ranks fifth
    queries[1, 3] = 1.0  # gold 3 ranks first
    assert recall(queries, keys, torch.tensor([0, 3])) == {"1": 0.5, "4": 0.5, "16": 1.0}
