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
