"""What the memory reads: backbones whose embedding rows differ from the tokenizer's ids, and
inputs longer than `max_length` or than the backbone's positions."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from split_model.memory import HFMemory, MemoryCache
from split_model.reasoner import ReasonerConfig
from split_model.training import SplitModelModule

WORDS = "ball at 0 1 2 swap where is the cup ? .".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0..3
REASONER = ReasonerConfig(d_model=32, n_layers=1, n_heads=4, embed_rank=8)


def local_bert(root: Path, embedding_rows: int | None = None, added: tuple[str, ...] = (), positions: int = 512) -> Path:
    """A tiny BERT directory with a word-level tokenizer, written as a hub model would be.

    embedding_rows: rows of the model's embedding matrix (default: the tokenizer's ids before
    `added`); added: tokens added to the tokenizer after the model was sized.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    core.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    rows = embedding_rows or len(tok)
    tok.add_tokens(list(added))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=positions, pad_token_id=0))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def long_cut_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "were truncated" in str(w.message)]


# -- embedding rows vs tokenizer ids --------------------------------------------------------------
def test_embedding_padded_past_the_tokenizer_uses_the_tokenizer_rows(tmp_path):
    """Hub models round embedding rows up (to a multiple of 64): the reasoner covers the tokenizer's ids."""
    memory = HFMemory(name=str(local_bert(tmp_path, embedding_rows=64)))
    n_ids = memory.tokenizer.vocab_size
    assert memory.input_embeddings().shape[0] == 64 > n_ids == len(SPECIALS + WORDS)
    module = SplitModelModule(memory=memory, reasoner=REASONER, execution="dynamic").eval()
    assert module.reasoner.embed.table.shape == (n_ids, 8)
    assert module.reasoner.embed.logits(torch.randn(2, 32)).shape == (2, n_ids)

    tok = memory.tokenizer
    states = memory.encode_texts(["ball at 2 . swap 0 1 . where is the ball ?", "cup"])
    mem = module.reasoner.encode_memory(states.states, states.mask)
    written = module.reasoner.generate(mem, torch.tensor([1, 0]), tok.bos_id, tok.eos_id, max_new_tokens=3,
                                       decoder="dynamic")
    assert len(written) == 2 and all(0 <= i < n_ids for row in written for i in row)


def test_tokens_added_past_the_embedding_start_near_the_mean_row(tmp_path):
    memory = HFMemory(name=str(local_bert(tmp_path, added=("<a>", "<b>"))))
    rows = memory.input_embeddings().shape[0]
    assert memory.tokenizer.vocab_size == rows + 2
    table = SplitModelModule(memory=memory, reasoner=REASONER, execution="dynamic").reasoner.embed.table.detach()
    assert table.shape == (rows + 2, 8) and torch.isfinite(table).all()
    new, old = table[rows:], table[:rows]
    assert not torch.equal(new[0], new[1])  # added tokens stay distinguishable
    assert ((new - old.mean(0)).norm(dim=1) < 0.5 * old.norm(dim=1).mean()).all()


def test_an_exact_fit_embedding_is_initialised_as_before():
    from split_model.reasoner.layers import FactorisedEmbedding, _pca_table

    emb = torch.randn(40, 16)
    torch.testing.assert_close(FactorisedEmbedding(40, REASONER, emb).table.detach(), _pca_table(emb, 8))
    torch.testing.assert_close(FactorisedEmbedding(30, REASONER, emb).table.detach(), _pca_table(emb[:30], 8))


# -- max_length against the backbone's positions ----------------------------------------------------
@pytest.mark.parametrize(("family", "key"), [("gpt2", "n_positions"), ("bert", "max_position_embeddings")])
def test_max_length_past_the_positions_is_refused_with_what_to_change(tiny, family, key):
    with pytest.raises(ValueError) as err:
        HFMemory(config=tiny.config(family), max_length=512)
    assert str(err.value) == (f"HFMemory max_length=512 exceeds the backbone's 128 positions ({key}): "
                              "set model.memory.init_args.max_length to at most 128")
    assert HFMemory(config=tiny.config(family), max_length=128).max_length == 128


def test_rotary_backbones_are_bounded_by_their_max_position_embeddings(tiny):
    with pytest.raises(ValueError, match=r"max_length=128 exceeds the backbone's 64 positions"):
        HFMemory(config={**tiny.config("llama"), "max_position_embeddings": 64}, max_length=128)


def test_roberta_positions_start_after_the_padding_id():
    from transformers import RobertaConfig, RobertaModel

    from split_model.memory.backbone import _position_limit

    model = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=66, pad_token_id=1))
    assert _position_limit(model) == (64, "max_position_embeddings")


@pytest.mark.parametrize("max_length", [0, -5])
def test_max_length_must_be_positive(tiny, max_length):
    with pytest.raises(ValueError, match="max_length must be a positive number of tokens"):
        HFMemory(config=tiny.config("gpt2"), max_length=max_length)


def test_unknown_long_inputs_policy_is_refused(tiny):
    with pytest.raises(ValueError, match="long_inputs must be truncate or error"):
        HFMemory(config=tiny.config("gpt2"), max_length=16, long_inputs="drop")


# -- the long-input policy ----------------------------------------------------------------------------
TEXTS = ["ball at 2. swap 0 1.", "x" * 30, "hi", "y" * 12, "swap"]  # bytes: 20, 30, 2, 12, 4 tokens


def test_within_limit_inputs_are_untouched_and_nothing_is_said(tiny):
    memory = HFMemory(config=tiny.config("gpt2"), max_length=30, long_inputs="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = memory.context_ids(TEXTS, "shells/train")
    assert ids == [list(t.encode()) for t in TEXTS]


def test_truncate_cuts_long_inputs_with_one_warning_per_data_set(tiny, tmp_path):
    memory = HFMemory(config=tiny.config("gpt2"), max_length=10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ids = memory.context_ids(TEXTS, "shells/train")
    assert long_cut_warnings(record) == [
        "3 of the 5 inputs of shells/train are longer than the memory's max_length=10 tokens (the longest has 30) "
        "and were truncated to it; set model.memory.init_args.long_inputs=error to refuse them instead"]
    assert [len(x) for x in ids] == [10, 10, 2, 10, 4]
    assert ids[0] == list(TEXTS[0].encode()[:10]) and ids[2] == list(b"hi")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = MemoryCache(tmp_path, memory).get(TEXTS, desc="shells/valid")
    assert len(long_cut_warnings(record)) == 1 and "of shells/valid" in long_cut_warnings(record)[0]
    assert np_lengths(got) == [10, 10, 2, 10, 4]


def np_lengths(states) -> list[int]:
    return [int(n) for n in states.offsets[1:] - states.offsets[:-1]]


def test_error_refuses_the_first_long_row_by_index(tiny, tmp_path):
    memory = HFMemory(config=tiny.config("gpt2"), max_length=24, long_inputs="error")
    expected = (r"row 1 \(0-based\) of shells/train is 30 tokens long, over the memory's max_length=24: shorten it, "
                r"raise model.memory.init_args.max_length \(the backbone allows up to 128\), or set "
                r"model.memory.init_args.long_inputs=truncate")
    with pytest.raises(ValueError, match=expected):
        memory.context_ids(TEXTS, "shells/train")
    with pytest.raises(ValueError, match=expected):
        MemoryCache(tmp_path, memory).get(TEXTS, desc="shells/train")
    assert not any(tmp_path.iterdir())  # nothing was encoded or written
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) of the memory inputs is 30 tokens long"):
        memory.encode_texts(TEXTS[1:])


def test_generation_inputs_follow_the_policy(tiny):
    memory = HFMemory(config=tiny.config("gpt2"), max_length=10)
    with pytest.warns(UserWarning, match="1 of the 2 inputs of the memory inputs .* longest has 30"):
        ids, mask = memory.tokenize(TEXTS[1:3])
    assert ids.shape == (2, 10) and mask.sum(1).tolist() == [10, 2]


def test_hugging_face_truncation_keeps_the_special_tokens_and_counts_them(tmp_path):
    memory = HFMemory(name=str(local_bert(tmp_path, positions=64)), max_length=6)
    tok = memory.tokenizer
    text = "ball at 2 . swap 0 1 ."  # 8 words + [CLS] + [SEP]
    with pytest.warns(UserWarning, match=r"1 of the 2 inputs of q are longer .* \(the longest has 10\)"):
        ids = memory.context_ids([text, "cup"], "q")
    assert ids[0] == tok.encode_context(text, 6) and len(ids[0]) == 6
    assert (ids[0][0], ids[0][-1]) == (tok.bos_id, tok.eos_id)
    assert ids[1] == tok.hf("cup")["input_ids"]
    with pytest.raises(ValueError, match="exceeds the backbone's 64 positions"):
        HFMemory(name=str(tmp_path), max_length=65)


# -- the policy in checkpoints ------------------------------------------------------------------------
def test_policy_is_in_the_spec_but_not_the_fingerprint_and_old_specs_default_to_truncate(tiny):
    strict = HFMemory(config=tiny.config("gpt2"), max_length=16, long_inputs="error")
    assert strict.spec["long_inputs"] == "error"
    assert HFMemory(**strict.spec).long_inputs == "error"
    old_spec = {k: v for k, v in strict.spec.items() if k != "long_inputs"}  # written before the policy existed
    old = HFMemory(**old_spec)
    assert old.long_inputs == "truncate"
    assert old.fingerprint == strict.fingerprint
