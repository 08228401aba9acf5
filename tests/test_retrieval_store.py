"""The retrieval store's promises: it round-trips, every index kind answers, search is the
same one by one as in a batch, `exclude` and `find` work, long documents are split, append
keeps what was there, and a store of another backbone or a damaged file is refused with a
message that says what to do. Tiny random backbones, no downloads."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from split_model.retrieval import IndexSpec, RetrievalStore, read_corpus

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)

WORDS = ["the", "cat", "dog", "bird", "sits", "runs", "on", "under", "a", "mat", "tree", "roof", "red", "blue"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """n distinct short sentences of four random words each."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[" ".join(rng.choice(WORDS, size=4))] = None
    return list(out)


@pytest.fixture(scope="module")
def memory(tiny):
    return tiny.memory("llama")


@pytest.fixture(scope="module")
def built(memory, tmp_path_factory):
    """A flat store of 200 sentences, shared by the read-only tests."""
    return RetrievalStore.build(tmp_path_factory.mktemp("flat") / "store", memory, sentences(200))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- building and reading back -------------------------------------------------------------------
def test_round_trip_gives_identical_search_keys_and_values(built, memory):
    again = RetrievalStore.open(built.path, memory)
    queries = built.keys(np.arange(10)) + 0.01 * torch.randn(10, built.key_dim)
    for a, b in zip(built.search(queries, 5), again.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    ids = np.array([[0, 5], [199, -1]])
    torch.testing.assert_close(built.keys(ids), again.keys(ids), rtol=0, atol=0)
    for a, b in zip(built.values(ids), again.values(ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    m = again.manifest
    assert (m["num_chunks"], m["num_documents"], m["key_dim"], m["chunk_tokens"]) == (200, 200, 32, 32)
    assert m["backbone"].startswith("inline config") and m["fingerprint"] == memory.fingerprint
    assert set(m["files"]) == {"index.faiss", "keys.npy", "values.npy", "lengths.npy", "chunks.jsonl"}


def test_keys_values_and_texts_match_the_memory(built, memory):
    texts = sentences(200)
    states = memory.encode_texts(texts[:3])  # (3, N, 1, D)
    got, mask = built.values(np.arange(3))  # (3, 32, 1, D), (3, 32)
    for i in range(3):
        n = int(states.mask[i].sum())
        assert mask[i].sum() == n and not mask[i, n:].any()
        torch.testing.assert_close(got[i, :n], states.states[i, :n], atol=2e-3, rtol=2e-3)  # stored fp16
        assert not got[i, n:].any()
        key = states.states[i, :n, -1].mean(0)
        torch.testing.assert_close(built.keys(np.array(i)), key / key.norm(), atol=2e-3, rtol=0)
        assert built.text(i) == texts[i]
    states, mask = built.values(np.array([-1]))
    assert not mask.any() and not states.any() and not built.keys(np.array([-1])).any()


def test_keys_of_every_stored_layer_average_each_layers_normalised_mean(tiny, tmp_path):
    """key_layers all: a chunk's key is the mean over the stored layers of each layer's mean
    token state, each L2-normalised first (so the embeddings count as much as the last layer),
    then normalised for the ip metric; an append keys its chunks the same way, and a reopened
    store says how it keys. The default keys by the last layer alone."""
    memory = tiny.memory("llama", layers=[0, -1])
    texts = sentences(30, seed=5)
    store = RetrievalStore.build(tmp_path / "all", memory, texts[:20], key_layers="all")
    store.append(memory, texts[20:])
    states = memory.encode_texts([texts[3], texts[25]])  # (2, N, 2, D)
    for row, i in enumerate((3, 25)):
        n = int(states.mask[row].sum())
        per_layer = F.normalize(states.states[row, :n].mean(0), dim=-1)  # (2, D)
        key = per_layer.mean(0)
        torch.testing.assert_close(store.keys(np.array(i)), key / key.norm(), atol=2e-3, rtol=0)
        last = states.states[row, :n, -1].mean(0)
        assert (store.keys(np.array(i)) - last / last.norm()).abs().max() > 0.05  # not the last layer's key
    reopened = RetrievalStore.open(store.path, memory)
    assert reopened.key_layers == "all" and reopened.manifest["key_layers"] == "all"
    assert reopened.search(reopened.keys(np.array([25])), 1)[1][0, 0] == 25
    assert RetrievalStore.build(tmp_path / "last", memory, texts[:5]).key_layers == "last"


def test_key_layers_are_checked_at_build_and_open(memory, built, tmp_path):
    with pytest.raises(ValueError, match="key_layers must be one of last, all, got 'first'"):
        RetrievalStore.build(tmp_path / "a", memory, ["x"], key_layers="first")
    assert not (tmp_path / "a").exists()
    import shutil

    old = tmp_path / "old"
    shutil.copytree(built.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["key_layers"]  # written before the choice existed: keyed by the last layer
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert RetrievalStore.open(old, memory).key_layers == "last"
    manifest["key_layers"] = "middle"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="names key_layers 'middle', not one of last, all: rebuild"):
        RetrievalStore.open(old)


def test_scores_are_cosines_best_first(built):
    scores, ids = built.search(built.keys(np.arange(4)) * 3.0, 6)  # scale must not matter under ip
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (4, 6)
    assert (ids[:, 0] == np.arange(4)).all() and np.allclose(scores[:, 0], 1.0, atol=2e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    q = built.keys(np.arange(4))
    exact = torch.einsum("bd,bkd->bk", q / q.norm(dim=1, keepdim=True), built.keys(ids)).numpy()
    np.testing.assert_allclose(scores, exact, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_each_index_kind_builds_and_answers_in_batches_as_one_by_one(kind, memory, tmp_path):
    texts = sentences(2000 if kind == "ivfpq" else 300, seed=1)
    spec = IndexSpec(kind=kind, ivf_lists=8, pq_m=8, nprobe=4, refine=8)
    store = RetrievalStore.build(tmp_path / kind, memory, texts, index=spec)
    assert store.spec.kind == kind and store.num_chunks == len(texts)
    assert store.manifest["index"] == {**asdict(spec), "ivf_lists": 8}
    queries = store.keys(np.arange(0, len(texts), len(texts) // 40))  # (40, D)
    scores, ids = store.search(queries, 8)
    found_self = (ids[:, 0] == np.arange(0, len(texts), len(texts) // 40)).mean()
    assert found_self >= (1.0 if kind != "ivfpq" else 0.9)
    one_by_one = np.concatenate([store.search(queries[i : i + 1], 8)[1] for i in range(len(queries))])
    np.testing.assert_array_equal(ids, one_by_one)
    reopened = RetrievalStore.open(store.path)
    np.testing.assert_array_equal(reopened.search(queries, 8)[1], ids)


def test_too_few_chunks_for_ivf_lists_warn_and_shrink(memory, tmp_path):
    with pytest.warns(UserWarning, match="too few"):
        store = RetrievalStore.build(tmp_path / "s", memory, sentences(400), index=IndexSpec("ivfpq", pq_m=8))
    assert store.manifest["index"]["ivf_lists"] == 400 // 39


def test_fewer_chunks_than_k_pad_with_minus_one(memory, tmp_path):
    store = RetrievalStore.build(tmp_path / "s", memory, ["one fact", "another fact"])
    scores, ids = store.search(store.keys(np.array([0])), 4)
    assert ids[0, :2].tolist() == [0, 1] and ids[0, 2:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 2:]).all()


def test_exclude_never_returns_the_listed_ids(built):
    queries = built.keys(np.arange(3))
    _, plain = built.search(queries, 5)
    exclude = np.array([[0, 1], [plain[1, 0], -1], [-1, -1]])
    _, ids = built.search(queries, 5, exclude=exclude)
    assert ids.shape == (3, 5) and not (ids[0, :, None] == [0, 1]).any()
    assert plain[1, 0] not in ids[1] and ids[1, :4].tolist() == plain[1, 1:].tolist()
    np.testing.assert_array_equal(ids[2], plain[2])
    with pytest.raises(ValueError, match="exclude"):
        built.search(queries, 5, exclude=np.array([[0]]))


def test_find_maps_document_texts_to_their_chunks(built):
    texts = sentences(200)
    assert built.find(texts[17]) == 17
    assert built.find("  " + texts[42].replace(" ", "   ") + "\n") == 42  # whitespace-normalised
    assert built.find("no such document") is None


def test_long_documents_split_into_consecutive_chunks(memory, tmp_path):
    long = "abcdefghij" * 10  # 100 byte tokens
    store = RetrievalStore.build(tmp_path / "s", memory, ["short one", long], chunk_tokens=32)
    assert store.num_chunks == 5 and store.num_documents == 2
    assert [store.text(i) for i in range(1, 5)] == [long[:32], long[32:64], long[64:96], long[96:]]
    _, mask = store.values(np.arange(5))
    assert mask.sum(1).tolist() == [9, 32, 32, 32, 4]
    docs = [json.loads(line)["doc"] for line in (store.path / "chunks.jsonl").read_text().splitlines()]
    assert docs == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_append_adds_chunks_and_keeps_old_results(kind, memory, tiny, tmp_path):
    texts = sentences(400, seed=2)
    store = RetrievalStore.build(tmp_path / "s", memory, texts[:300], index=IndexSpec(kind, ivf_lists=4, pq_m=8))
    queries = store.keys(np.arange(0, 300, 10))
    before_ids = store.search(queries, 1)[1]
    assert (before_ids[:, 0] == np.arange(0, 300, 10)).all()
    before_values = store.values(np.arange(300))[0]
    store.append(memory, texts[300:])
    assert store.num_chunks == 400 and store.num_documents == 400
    np.testing.assert_array_equal(store.search(queries, 1)[1], before_ids)  # each query's own chunk
    torch.testing.assert_close(store.values(np.arange(300))[0], before_values, rtol=0, atol=0)
    assert store.find(texts[350]) == 350 and store.text(399) == texts[399]
    assert store.search(store.keys(np.array([350])), 1)[1][0, 0] == 350
    both = np.array([[5, 350], [-1, 399]])  # ids of both parts in one call
    torch.testing.assert_close(store.keys(both)[0, 1], store.keys(np.array(350)), rtol=0, atol=0)
    assert store.values(both)[1].sum(-1)[1].tolist() == [0, len(texts[399])]
    reopened = RetrievalStore.open(store.path, memory)
    np.testing.assert_array_equal(reopened.search(queries, 3)[1], store.search(queries, 3)[1])
    assert not (store.path / "index.faiss").exists()  # replaced by the appended index
    with pytest.raises(ValueError, match="seed 0"):
        store.append(tiny.memory("llama", seed=3), ["a fact"])


# -- refusals ---------------------------------------------------------------------------------------
def test_a_store_of_another_backbone_is_refused_naming_both(built, tiny):
    with pytest.raises(ValueError, match=r"inline config \(llama, seed 0\).*inline config \(llama, seed 1\)"):
        RetrievalStore.open(built.path, tiny.memory("llama", seed=1))


def test_other_dimensions_are_refused_naming_the_dimension(built, tiny):
    from split_model.memory import HFMemory

    config = {**tiny.config("llama"), "hidden_size": 64}
    with pytest.raises(ValueError, match="hidden_size=32, this memory has hidden_size=64"):
        RetrievalStore.open(built.path, HFMemory(config=config, max_length=128))
    with pytest.raises(ValueError, match="num_states=1, this memory has num_states=2"):
        RetrievalStore.open(built.path, tiny.memory("llama", layers=[1, 2]))


def test_missing_store_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="split-model index"):
        RetrievalStore.open(tmp_path / "nowhere")


@pytest.fixture
def copy_of(built, tmp_path):
    import shutil

    return Path(shutil.copytree(built.path, tmp_path / "copy"))


def test_truncated_values_are_refused_with_both_sizes(copy_of):
    values = copy_of / "values.npy"
    size = values.stat().st_size
    with open(values, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match=f"values.npy is {size - 1000:,} bytes, the manifest says {size:,}"):
        RetrievalStore.open(copy_of)


@pytest.mark.parametrize("name", ["keys.npy", "index.faiss", "values.npy", "chunks.jsonl"])
def test_flipped_bytes_are_refused(copy_of, name):
    flip_byte(copy_of / name, (copy_of / name).stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{name} does not match its checksum"):
        RetrievalStore.open(copy_of)


def test_a_missing_file_or_bad_manifest_is_refused(copy_of):
    (copy_of / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        RetrievalStore.open(copy_of)
    (copy_of / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        RetrievalStore.open(copy_of)


def test_a_manifest_that_disagrees_with_the_arrays_is_refused(copy_of):
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["chunk_tokens"] = 16
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="disagrees with the manifest"):
        RetrievalStore.open(copy_of)


def test_build_refuses_bad_settings_before_encoding(memory, tmp_path):
    with pytest.raises(ValueError, match="pq_m=5 does not divide the key dimension 32"):
        RetrievalStore.build(tmp_path / "a", memory, ["x"], index=IndexSpec("ivfpq", pq_m=5))
    with pytest.raises(ValueError, match="chunk_tokens must be in 1..128"):
        RetrievalStore.build(tmp_path / "b", memory, ["x"], chunk_tokens=500)
    with pytest.raises(ValueError, match="empty corpus"):
        RetrievalStore.build(tmp_path / "c", memory, [])
    with pytest.raises(ValueError, match="document 1 .* has no tokens"):
        RetrievalStore.build(tmp_path / "d", memory, ["x", ""])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "something").write_text("")
    with pytest.raises(ValueError, match="already exists"):
        RetrievalStore.build(tmp_path / "e", memory, ["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # failed builds leave nothing behind


@pytest.mark.parametrize("field, value, message", [
    ("kind", "annoy", "flat, hnsw or ivfpq"), ("metric", "cos", "ip .* or l2"), ("nprobe", 0, "nprobe must be"),
    ("hnsw_m", 1.5, "hnsw_m must be"), ("pq_bits", 20, "pq_bits must be"), ("ivf_lists", 0, "ivf_lists must be"),
    ("refine", -1, "refine must be")])
def test_index_spec_refuses_bad_values_quoting_them(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        IndexSpec(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_l2_metric_scores_minus_squared_distance(memory, tmp_path):
    store = RetrievalStore.build(tmp_path / "s", memory, sentences(50), index=IndexSpec(metric="l2"))
    q = store.keys(np.array([3])) + 0.1
    scores, ids = store.search(q, 3)
    want = -((store.keys(ids[0]) - q) ** 2).sum(-1).numpy()
    np.testing.assert_allclose(scores[0], want, rtol=1e-4, atol=1e-4)


# -- the corpus file and the command -----------------------------------------------------------------
def test_read_corpus_refuses_bad_lines_with_their_numbers(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert read_corpus(good) == ["first", "second"]
    plain = tmp_path / "c.txt"
    plain.write_text("first line\n\n  second line  \n")
    assert read_corpus(plain) == ["first line", "second line"]
    for body, line, why in [('{"text": "a"}\n{"txt": "b"}\n', 2, "no non-empty string `text`"),
                            ('{"text": "a"}\n\n{"text": "b"\n', 3, "not valid JSON"),
                            ('["a"]\n', 1, "no non-empty string")]:
        good.write_text(body)
        with pytest.raises(ValueError, match=f"line {line} of .*c.jsonl.*{why}"):
            read_corpus(good)
    plain.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no document"):
        read_corpus(plain)


def local_bert(root: Path) -> Path:
    """A tiny random BERT with a word-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    core.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, pad_token_id=0))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_index_command_builds_appends_and_refuses(tmp_path, capsys):
    from split_model.cli import dispatch
    from split_model.memory import HFMemory

    backbone = str(local_bert(tmp_path / "bert"))
    corpus = tmp_path / "corpus.jsonl"
    texts = sentences(60, seed=4)
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:50]))
    out = tmp_path / "store"
    store = dispatch(["index", "--corpus", str(corpus), "--out", str(out), "--memory", backbone,
                      "--index", "hnsw", "--chunk-tokens", "8", "--layers", "1,2"])
    printed = capsys.readouterr().out
    assert "indexed 50 chunks of 50 documents, key dim 32 (keyed by the last stored layer), hnsw index" in printed
    assert str(out) in printed
    memory = HFMemory(name=backbone, layers=[1, 2], max_length=64)
    reopened = RetrievalStore.open(out, memory)  # built at max_length 8: not part of the backbone
    assert reopened.num_states == 2 and reopened.chunk_tokens == 8 and reopened.find(texts[7]) == 7
    assert store.search(store.keys(np.array([7])), 1)[1][0, 0] == 7
    more = tmp_path / "more.txt"
    more.write_text("\n".join(texts[50:]) + "\n")
    dispatch(["index", "--corpus", str(more), "--out", str(out), "--memory", backbone, "--layers=1,2",
              "--chunk-tokens", "8", "--append"])
    assert "now 60 chunks of 60 documents" in capsys.readouterr().out
    assert RetrievalStore.open(out, memory).find(texts[55]) == 55
    with pytest.raises(ValueError, match="num_states=2, this memory has num_states=1"):
        dispatch(["index", "--corpus", str(more), "--out", str(out), "--memory", backbone, "--append"])
    with pytest.raises(ValueError, match="already exists"):
        dispatch(["index", "--corpus", str(more), "--out", str(out), "--memory", backbone])
    corpus.write_text('{"text": "the cat"}\n{"body": "the dog"}\n')
    with pytest.raises(ValueError, match="line 2 of"):
        dispatch(["index", "--corpus", str(corpus), "--out", str(tmp_path / "x"), "--memory", backbone])
    with pytest.raises(SystemExit):
        dispatch(["index", "--corpus", str(more), "--out", str(tmp_path / "y"), "--layers", "last"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    keyed = dispatch(["index", "--corpus", str(more), "--out", str(tmp_path / "z"), "--memory", backbone,
                      "--layers=0,-1", "--key-layers", "all"])
    assert "(keyed by every stored layer)" in capsys.readouterr().out and keyed.key_layers == "all"


def test_index_help_explains_every_option(capsys):
    from split_model.cli import dispatch

    with pytest.raises(SystemExit):
        dispatch(["index", "--help"])
    text = capsys.readouterr().out
    for option in ("--corpus", "--out", "--memory", "--layers", "--key-layers", "--index", "--metric", "--chunk-tokens",
                   "--ivf-lists", "--pq-m", "--nprobe", "--append", "--seed"):
        assert option in text


def test_retrieval_speed_bench_quick_runs(tmp_path):
    from argparse import Namespace

    from split_model.bench.retrieval_speed import run

    result = run(Namespace(quick=True))
    assert result["chunks"] == 5000 and set(result["indexes"]) == {"flat", "hnsw", "ivfpq"}
    assert result["indexes"]["flat"]["recall_at_8"] == 1.0
    for kind, r in result["indexes"].items():
        assert r["query_ms_b1"] > 0 and r["query_ms_b64"] > 0 and 0 < result["search_share"][kind]["b1"] < 1
