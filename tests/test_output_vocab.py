"""A task output vocabulary: the head scores only the tokens the training targets use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from split_model.training import SplitModelModule, load_checkpoint


def task_vocab_module(tiny, memory):
    return SplitModelModule(memory=memory, reasoner=tiny.reasoner_config(), lr=3e-3, warmup_steps=2,
                            output_vocab="task")


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    module = task_vocab_module(tiny, tiny.memory("bert"))
    dm = tiny.data(module, root / "cache")
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    tiny.trainer(root, max_steps=6, enable_checkpointing=True, callbacks=[ckpt]).fit(module, datamodule=dm)
    return module, dm, ckpt.last_model_path


def test_fit_restricts_the_head_to_the_training_targets(fitted):
    module, dm, _ = fitted
    tok = module.memory.tokenizer
    # the shell game with 3 cups: the digits 0-2 plus eos, nothing else
    assert module.reasoner.output_ids.tolist() == sorted(tok.encode("0") + tok.encode("1") + tok.encode("2") + [tok.eos_id])
    batch = next(iter(dm.val_dataloader()))
    mem = module.reasoner.encode_memory(batch["mem_states"], batch["mem_mask"])
    assert module.reasoner(batch["tokens"], batch["latent"], mem).shape[-1] == 4


def test_restricted_loss_is_cross_entropy_over_the_kept_tokens(tiny):
    module = task_vocab_module(tiny, tiny.memory("llama"))
    ids = torch.tensor([3, 48, 49, 258])
    module.reasoner.set_output_vocab(ids)
    hidden = torch.randn(2, 5, 32)
    full = module.reasoner.embed.logits(hidden)  # (2, 5, V)
    torch.testing.assert_close(module.reasoner.logits(hidden), full[..., ids])
    labels = torch.tensor([[48, 49, -100, 258, 3], [3, 3, 49, 48, -100]])
    index = module._label_index(labels)
    want = F.cross_entropy(full[..., ids].flatten(0, 1), index.flatten(), ignore_index=-100)
    assert index.tolist() == [[1, 2, -100, 3, 0], [0, 0, 2, 1, -100]]
    assert torch.isfinite(want)
    outside = module._label_index(torch.tensor([[7]]))  # not in the vocabulary: not scored
    assert outside.tolist() == [[-100]]


def test_generation_writes_only_vocabulary_tokens_and_the_checkpoint_keeps_them(fitted):
    module, dm, path = fitted
    questions = [e.question for e in dm.task.examples("valid")]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.reasoner.output_ids, module.reasoner.output_ids)
    module.eval()
    assert loaded.generate(questions, n_latent=3, max_new_tokens=3) == module.generate(questions, n_latent=3, max_new_tokens=3)
    states = module.memory.encode_texts(questions)
    mem = module.reasoner.encode_memory(states.states, states.mask)
    n = torch.full((len(questions),), 3)
    tok = module.memory.tokenizer
    written = module.reasoner.generate(mem, n, tok.bos_id, tok.eos_id, max_new_tokens=3)
    allowed = set(module.reasoner.output_ids.tolist())
    assert all(set(row) <= allowed for row in written)


def test_bad_output_vocabulary_is_refused(tiny):
    module = task_vocab_module(tiny, tiny.memory("llama"))
    with pytest.raises(ValueError, match="output vocabulary"):
        module.reasoner.set_output_vocab(torch.tensor([10_000]))


def test_a_batch_with_no_scorable_label_has_zero_loss_not_nan(fitted):
    module, dm, _ = fitted
    batch = next(iter(dm.val_dataloader()))
    batch["labels"] = torch.where(batch["labels"] == -100, batch["labels"], torch.full_like(batch["labels"], 7))
    loss, acc, _ = module._forward(batch)
    assert float(loss) == 0.0 and float(acc) == 0.0


def test_fit_keeps_only_the_embedding_rows_the_reasoner_reads_and_writes(fitted, tiny):
    module, _, path = fitted
    tok, emb = module.memory.tokenizer, module.reasoner.embed
    kept = sorted(set(module.reasoner.output_ids.tolist()) | {tok.bos_id, tok.eos_id, tok.pad_id})
    assert emb.kept_ids().tolist() == kept
    assert emb.table.shape == (len(kept) + 1, 8)  # plus the row every other id reads
    full = task_vocab_module(tiny, tiny.memory("bert"))
    dropped = (emb.vocab_size - len(kept) - 1) * 8
    assert sum(p.numel() for p in full.reasoner.parameters()) - sum(p.numel() for p in module.reasoner.parameters()) == dropped
    loaded = load_checkpoint(path)
    assert loaded.reasoner.embed.kept_ids().tolist() == kept
    torch.testing.assert_close(loaded.reasoner.embed.table, emb.table)


def _batch(tiny, module, root):
    dm = tiny.data(module, root)
    dm.prepare_data()
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_keeping_rows_changes_neither_the_loss_nor_the_gradients(tiny, tmp_path):
    """What a task vocabulary trains is the same with the whole table and with its kept rows:
    the same loss, and the same gradient on every parameter and on every kept row."""
    modules = []
    for keep in (False, True):
        torch.manual_seed(0)
        module = task_vocab_module(tiny, tiny.memory("bert"))
        dm, batch = _batch(tiny, module, tmp_path / "cache")
        module.reasoner.set_output_vocab(dm.target_token_ids())
        if keep:
            module.reasoner.keep_rows(module.special_ids())
        loss, _, _ = module._forward(batch)
        loss.backward()
        modules.append((module, loss))
    (full, loss_full), (kept, loss_kept) = modules
    torch.testing.assert_close(loss_kept, loss_full)
    ids = kept.reasoner.embed.kept_ids()
    torch.testing.assert_close(kept.reasoner.embed.table.grad[:-1], full.reasoner.embed.table.grad[ids])
    assert float(kept.reasoner.embed.table.grad[-1].abs().max()) == 0.0  # no input reads the shared row
    grads = {n: p.grad for n, p in full.reasoner.named_parameters() if n != "embed.table"}
    for name, p in kept.reasoner.named_parameters():
        if name != "embed.table":
            torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_ids_without_a_row_read_the_shared_one_and_keeping_again_adds_rows(tiny):
    module = task_vocab_module(tiny, tiny.memory("llama"))
    emb = module.reasoner.embed
    before = emb.table.detach().clone()
    emb.keep(torch.tensor([5, 3, 9]))
    assert emb.kept_ids().tolist() == [3, 5, 9]
    torch.testing.assert_close(emb.table[:3], before[[3, 5, 9]])
    torch.testing.assert_close(emb.table[3], before.mean(0))
    out = emb(torch.tensor([3, 4, 100]))
    torch.testing.assert_close(out[0], before[3] @ emb.up.T)
    torch.testing.assert_close(out[1], out[2])  # neither 4 nor 100 is kept: both read the shared row
    torch.testing.assert_close(out[1], before.mean(0) @ emb.up.T)
    emb.keep(torch.tensor([3, 9, 11]))  # 5 dropped, 11 new
    assert emb.kept_ids().tolist() == [3, 9, 11]
    torch.testing.assert_close(emb.table[:2], before[[3, 9]])
    offset = float((emb.table[2] - before.mean(0)).norm())
    assert 0 < offset < 0.5  # starts near the shared row, distinct from it
    with pytest.raises(ValueError, match="no row"):
        module.reasoner.set_output_vocab(torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="whole vocabulary"):
        module.reasoner.set_output_vocab(None)


def test_a_whole_table_checkpoint_loads_into_a_reasoner_that_keeps_rows(tiny):
    torch.manual_seed(0)
    old = task_vocab_module(tiny, tiny.memory("llama"))
    ids = torch.tensor([3, 48, 49, 258])
    old.reasoner.set_output_vocab(ids)
    new = task_vocab_module(tiny, tiny.memory("llama"))
    new.reasoner.set_output_vocab(ids)
    new.reasoner.keep_rows([1, 2])
    new.load_state_dict(old.state_dict())
    kept = new.reasoner.embed.kept_ids()
    torch.testing.assert_close(new.reasoner.embed.table[:-1], old.reasoner.embed.table[kept])
    hidden = torch.randn(2, 3, 32)
    torch.testing.assert_close(new.reasoner.logits(hidden), old.reasoner.logits(hidden))


def test_a_whole_table_run_resumes_into_a_reasoner_that_keeps_rows(fitted, tiny, tmp_path):
    """A run checkpointed with the whole (V, r) table (earlier versions) resumes: its table and
    the optimizer's moments of it shrink to the kept rows, and training goes on."""
    module, dm, path = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    emb = module.reasoner.embed
    kept = torch.tensor(ckpt["split_model"].pop("embed_ids"))

    def whole(t):
        out = t[-1:].expand(emb.vocab_size, -1).clone()
        out[kept] = t[:-1]
        return out

    ckpt["state_dict"]["reasoner.embed.table"] = whole(ckpt["state_dict"]["reasoner.embed.table"])
    n_moments = 0
    for state in ckpt["optimizer_states"][0]["state"].values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == emb.table.shape:
                state[key], n_moments = whole(value), n_moments + 1
    assert n_moments == 2  # AdamW's two moments of the table
    old = tmp_path / "whole.ckpt"
    torch.save(ckpt, old)
    resumed = task_vocab_module(tiny, tiny.memory("bert"))
    data = tiny.data(resumed, tmp_path / "cache")
    trainer = tiny.trainer(tmp_path, max_steps=8)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(old))
    assert trainer.global_step == 8
    assert resumed.reasoner.embed.kept_ids().tolist() == kept.tolist()
    moments = trainer.optimizers[0].state[resumed.reasoner.embed.table]
    assert moments["exp_avg"].shape == resumed.reasoner.embed.table.shape
