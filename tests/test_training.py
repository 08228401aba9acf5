"""Training through Lightning: every backbone family trains through the same code, the memory
stays frozen and is read from the cache, the optimiser sees only the reasoner, checkpoints
leave the memory out and round-trip, and bad data or files fail with a clear message."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from split_model.memory import ByteTokenizer
from split_model.tasks import Example, StateTracking, Task
from split_model.training import Formatter, SplitModelModule, TaskDataModule, collate, load_checkpoint

FAMILIES = ("llama", "gpt2", "bert")


def reasoner_weights(module: SplitModelModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.reasoner.state_dict().items()}


def fixed_batch(dm: TaskDataModule, split: str = "train", n: int = 16) -> dict:
    dm.setup("fit")
    return collate([dm.datasets[split][i] for i in range(n)])


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    """A debug-sized model fitted for 2 epochs (8 steps) with a checkpoint callback."""
    root = tmp_path_factory.mktemp("fitted")
    memory = tiny.memory("llama")
    module = tiny.module(memory, feedback="all")
    dm = tiny.data(module, root / "cache")
    memory_before = {k: v.clone() for k, v in memory.state_dict().items()}
    reasoner_before = reasoner_weights(module)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = tiny.trainer(root, max_steps=8, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, datamodule=dm)
    return SimpleNamespace(root=root, memory=memory, module=module, dm=dm, trainer=trainer,
                           memory_before=memory_before, reasoner_before=reasoner_before,
                           ckpt=checkpoints.last_model_path,
                           questions=[e.question for e in dm.task.examples("valid")[:6]])


# -- swapped backbones all train ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_family_trains_through_the_same_code(tiny, tmp_path, family):
    memory = tiny.memory(family, layers=[1, -1])
    module = tiny.module(memory, lr=1e-2)
    dm = tiny.data(module, tmp_path / "cache")
    dm.prepare_data()
    batch = fixed_batch(dm)
    before = reasoner_weights(module)
    with torch.no_grad():
        loss_before = float(module._forward(batch)[0])
    tiny.trainer(tmp_path, max_steps=12, limit_val_batches=0).fit(module, datamodule=dm)
    with torch.no_grad():
        loss_after = float(module._forward(batch)[0])
    assert math.isfinite(loss_after) and loss_after < loss_before
    after = reasoner_weights(module)
    assert all(not torch.equal(before[k], after[k]) for k in ("embed.table", "blocks.0.attn.qkv.weight"))


# -- frozen stays frozen ----------------------------------------------------------------------------
def test_fit_leaves_the_memory_frozen_and_untouched(fitted):
    memory = fitted.module.memory
    assert fitted.trainer.global_step == 8
    assert not any(p.requires_grad for p in memory.parameters())
    assert all(p.grad is None for p in memory.parameters())
    assert not memory.model.training
    fitted.module.train()
    assert fitted.module.reasoner.training and not memory.model.training
    after = memory.state_dict()
    assert after.keys() == fitted.memory_before.keys()
    assert all(torch.equal(after[k], v) for k, v in fitted.memory_before.items())
    # ... while the reasoner did learn
    assert any(not torch.equal(fitted.module.reasoner.state_dict()[k], v) for k, v in fitted.reasoner_before.items())


def test_optimizer_holds_exactly_the_reasoner_parameters(fitted):
    groups = fitted.trainer.optimizers[0].param_groups
    in_optimizer = [id(p) for g in groups for p in g["params"]]
    assert len(in_optimizer) == len(set(in_optimizer))  # nothing twice
    assert set(in_optimizer) == {id(p) for p in fitted.module.reasoner.parameters()}
    assert not set(in_optimizer) & {id(p) for p in fitted.module.memory.parameters()}


# -- cached equals uncached: epoch 2 never runs the memory -------------------------------------------
def test_training_never_runs_the_memory_after_prepare_data(tiny, tmp_path, monkeypatch):
    memory = tiny.memory("llama")
    module = tiny.module(memory)
    dm = tiny.data(module, tmp_path / "cache")
    calls: list = []
    forward = memory.model.forward
    monkeypatch.setattr(memory.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    dm.prepare_data()
    assert calls, "the first prepare_data encodes every split"
    calls.clear()
    trainer = tiny.trainer(tmp_path, max_steps=-1, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 2 and trainer.global_step == 8
    assert calls == []


def test_default_cache_dir_follows_split_model_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLIT_MODEL_CACHE", str(tmp_path / "root"))
    module = tiny.module(tiny.memory("llama"))
    dm = TaskDataModule(tiny.task(), steps="latent")
    dm.connect(module)
    dm.prepare_data()
    manifests = list((tmp_path / "root" / "memory").rglob("manifest.json"))
    assert len(manifests) == 2  # train and valid


# -- checkpoints: without memory weights, and round-trip -----------------------------------------------
def test_checkpoint_leaves_out_the_memory_weights(fitted):
    ckpt = torch.load(fitted.ckpt, map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert not [k for k in keys if k.startswith("memory.")]
    assert keys == {f"reasoner.{k}" for k in fitted.module.reasoner.state_dict()}
    assert ckpt["split_model"]["fingerprint"] == fitted.memory.fingerprint


def test_checkpoint_round_trips(fitted):
    loaded = load_checkpoint(fitted.ckpt)
    assert loaded.memory is not fitted.memory and loaded.memory.fingerprint == fitted.memory.fingerprint
    trained = fitted.module.reasoner.state_dict()
    for k, v in loaded.reasoner.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert loaded.formatter.spec == {"steps": "latent", "latent_steps": 0, "default_latent": 3, "replaced_steps": 0,
                                     "latent_per_step": 1, "max_target": 2, "step_token": "whole", "fixed_steps": None}
    fitted.module.eval()
    want = fitted.module.generate(fitted.questions, n_latent=3, max_new_tokens=4)
    assert loaded.generate(fitted.questions, n_latent=3, max_new_tokens=4) == want
    assert all(isinstance(a, str) for a in want)


class RecordRun(Callback):
    """The reasoner's weights when training starts, and how many batches it trains on."""

    def __init__(self):
        self.start, self.batches = None, 0

    def on_train_start(self, trainer, module):
        self.start = reasoner_weights(module)

    def on_train_batch_end(self, *args):
        self.batches += 1


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_trainer_resumes_from_a_checkpoint_without_memory_weights(fitted, tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"), feedback="all")
    dm = tiny.data(module, fitted.root / "cache")
    record = RecordRun()
    trainer = tiny.trainer(tmp_path, max_steps=10, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, datamodule=dm, ckpt_path=fitted.ckpt)
    assert record.batches == 2 and trainer.global_step == 10  # steps 9 and 10 only
    trained = fitted.module.reasoner.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in record.start.items())


def test_checkpoint_refuses_another_backbone(fitted, tiny, tmp_path):
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(fitted.ckpt, memory=tiny.memory("llama", seed=1))
    module = tiny.module(tiny.memory("llama", seed=1), feedback="all")  # same shapes, other weights
    dm = tiny.data(module, tmp_path / "cache")
    with pytest.raises(ValueError, match="fingerprint"):
        tiny.trainer(tmp_path, max_steps=10).fit(module, datamodule=dm, ckpt_path=fitted.ckpt)


def _random_bytes(path, ckpt):
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes())


def _truncated(path, ckpt):
    data = open(ckpt, "rb").read()
    path.write_bytes(data[: len(data) // 2])


def _foreign(path, ckpt):
    torch.save({"state_dict": {}, "epoch": 0}, path)


@pytest.mark.parametrize("damage", [_random_bytes, _truncated, _foreign])
def test_unreadable_checkpoint_is_named_in_the_error(fitted, tmp_path, damage):
    path = tmp_path / "bad.ckpt"
    damage(path, fitted.ckpt)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_missing_checkpoint_is_named_in_the_error(tmp_path):
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_checkpoint(str(path))


# -- data and format errors ---------------------------------------------------------------------------
class NoTrainSplit(Task):
    name = "no_train"

    def examples(self, split):
        return [] if split == "train" else StateTracking(n_items=3, length=3, n_train=8, n_valid=4).examples(split)


def test_empty_train_split_is_named(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"))
    dm = TaskDataModule(NoTrainSplit(), steps="latent", cache_dir=str(tmp_path))
    dm.connect(module)
    with pytest.raises(ValueError, match="empty data set.*no_train/train"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="split 'train' has no examples"):
        tiny.task(n_train=0).examples("train")


def test_latent_steps_are_labelled_with_their_states():
    tok = ByteTokenizer()
    seq = Formatter(tok, steps="latent", latent_steps=1).encode(Example("ball at 0. swap 0 1.", ("1", "2"), "2"))
    ignore = -100
    assert seq.n_latent == 3
    assert seq.latent == [True, True, True, False, False]
    assert seq.tokens[3:] == [tok.bos_id, ord("2")]
    assert seq.labels == [ignore, ord("1"), ord("2"), ord("2"), tok.eos_id]
    assert seq.answer == [False, False, False, True, True]


def test_latent_steps_must_be_single_tokens():
    ex = Example("ball at 0. swap 0 1.", ("12", "3"), "3")
    with pytest.raises(ValueError, match=r"steps='latent'.*'12' is 2 tokens"):
        Formatter(ByteTokenizer(), steps="latent").encode(ex)


@pytest.mark.parametrize("kwargs, message", [({"bptt_steps": 0}, "bptt_steps must be positive"),
                                             ({"lr": 0.0}, "lr must be positive")])
def test_bad_module_settings_are_refused(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitModelModule(memory=tiny.memory("llama"), reasoner=tiny.reasoner_config(), **kwargs)


# -- label sets (step_token="set") ------------------------------------------------------------------
class DigitSets(Task):
    """Questions of 3 distinct digits ("7 2 9"); one latent step labelled with the set of them; the answer
    is the largest."""

    name = "digit_sets"

    def examples(self, split):
        gen = torch.Generator().manual_seed({"train": 0, "valid": 1, "test": 2}[split])
        out = []
        for _ in range({"train": 512, "valid": 64, "test": 16}[split]):
            digits = torch.randperm(10, generator=gen)[:3].tolist()
            out.append(Example(" ".join(map(str, digits)), (" ".join(map(str, sorted(digits))),), str(max(digits))))
        return out


def set_data(tiny, module, cache_dir):
    dm = TaskDataModule(DigitSets(), steps="latent", step_token="set", batch_size=32, cache_dir=str(cache_dir))
    dm.connect(module)
    return dm


def test_a_label_set_scores_the_mean_of_its_members_log_probabilities(tiny, tmp_path):
    module = tiny.module(tiny.memory("llama"))
    dm = set_data(tiny, module, tmp_path)
    batch = fixed_batch(dm, n=8)
    assert batch["label_sets"].shape == (8, batch["tokens"].shape[1], 3)
    with torch.no_grad():
        loss = float(module._forward(batch)[0])
        logp = module._logits(batch)[0].log_softmax(-1)  # full vocabulary: no output_vocab here
    terms = []
    for b, ex in enumerate(batch["examples"]):
        digits = [ord(d) for d in ex.steps[0].split()]
        terms.append(-logp[b, 0, digits].mean())  # the one latent step: equal share on each digit
        for t in range(1, batch["tokens"].shape[1]):
            label = int(batch["labels"][b, t])
            if label != -100:
                terms.append(-logp[b, t, label])
    assert loss == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_label_sets_teach_a_latent_step_to_hold_the_whole_set(tiny, tmp_path):
    torch.manual_seed(0)
    module = tiny.module(tiny.memory("llama"), lr=1e-2)
    dm = set_data(tiny, module, tmp_path / "cache")
    trainer = tiny.trainer(tmp_path, max_steps=240, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    metrics = tiny.trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    # Held-out questions: the three digits are exactly the latent step's three most likely tokens.
    assert metrics["val/step_acc_teacher_forced"] >= 0.9 and metrics["val/set_recall_teacher_forced"] >= 0.9
    assert metrics["val/set_recall_step0"] == metrics["val/set_recall_teacher_forced"]  # the one labelled step


def test_label_set_terms_count_exact_sets_and_recall():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0], [9.0, 0.0, 0.0, 0.0, 0.0]]])
    sets = torch.tensor([[[0, 1], [4, -100], [-100, -100]]])  # {0, 1}, {4}, no set
    total, count, right, found, exact, labelled = SplitModelModule._set_terms(logits, sets)
    logp = logits.log_softmax(-1)[0]
    assert float(total) == pytest.approx(float(-(logp[0, 0] + logp[0, 1]) / 2 - logp[1, 4]))
    # {0, 1}: its top two are 0 and 2, half the set; {4}: exactly the top one.
    assert (int(count), int(right)) == (2, 1) and found.tolist() == [[0.5, 1.0, 0.0]]
    assert labelled.tolist() == [[True, True, False]]
    # A second row whose two sets sit one position later, recalled 0.0 and 1.0.
    module = SimpleNamespace(set_found=(torch.cat([found, torch.tensor([[0.0, 0.0, 1.0]])]),
                                        torch.cat([exact, torch.tensor([[False, False, True]])]),
                                        torch.cat([labelled, torch.tensor([[False, True, True]])])))
    assert float(SplitModelModule.set_recall(module)) == 0.625
    # By step: the rows' first sets (0.5 and 0.0), then their second ones (1.0 and 1.0).
    assert {k: float(v) for k, v in SplitModelModule.set_recall(module, by_step=True).items()} == {0: 0.25, 1: 1.0}


def test_exact_sets_tell_a_set_from_its_superset_where_recall_cannot():
    """"Alex is happy" and "Alex is not happy" as label sets {alex, is, happy} and {alex, is,
    happy, not}: a model that gives both positions the same output, "not" ranked fourth, has
    recall 1.00 and every member above every other token on both; only the set it names itself
    (its probability spread over m = exp(entropy) tokens) shows that it tells them apart."""
    alex, is_, happy, not_ = 0, 1, 2, 3
    hedged = torch.tensor([2.0, 2.0, 2.0, 1.2, -9.0, -9.0])  # "not" at 0.14: neither in nor out
    sets = torch.tensor([[[alex, is_, happy, -100], [alex, is_, happy, not_]]])
    _, count, right, found, exact, _ = SplitModelModule._set_terms(torch.stack([hedged, hedged])[None], sets)
    assert found.tolist() == [[1.0, 1.0]] and int(right) == 2
    assert exact.tolist() == [[False, True]]  # it names four tokens at both: right only for the negation
    sure = torch.tensor([[5.0, 5.0, 5.0, -5.0, -9.0, -9.0], [5.0, 5.0, 5.0, 5.0, -9.0, -9.0]])
    _, _, _, _, exact, _ = SplitModelModule._set_terms(sure[None], sets)
    assert exact.tolist() == [[True, True]]
