"""objective rl: group-relative advantages, the KL to the starting model, what feedback_only
may change, the sampled answers' recomputation, neuralese noise, and starting from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_reasoner import make_reasoner, memory

from split_model.reasoner import Sampling
from split_model.training import SplitModelModule
from split_model.training.module import RL_REFERENCE_KEY
from split_model.training.rl import (
    RLConfig,
    action_log_probs,
    feedback_log_density,
    feedback_parameter_names,
    group_advantages,
    k3_kl,
    noisy_rollout,
    sampled_sequences,
)

BOS, EOS, PAD = 1, 2, 0
RL_STEPS = 200


def rl_module(tiny, mem, init_from=None, lr=3e-3, **rl):
    return SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(), lr=lr, warmup_steps=1,
                            objective="rl", rl=RLConfig(**{"group_size": 4, **rl}), init_from=init_from)


class Record(Callback):
    """Every training step's logged values."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(tiny, module, root, steps, callbacks=(), **task):
    data = tiny.data(module, root / "cache", batch_size=8, **task)
    trainer = tiny.trainer(root, max_steps=steps, limit_val_batches=0, gradient_clip_val=1.0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer, data


SHELL = dict(length=2, n_items=5, n_train=1500, n_valid=64)  # two swaps: one layer cannot relay the ball


@pytest.fixture(scope="module")
def supervised_off(tiny, tmp_path_factory):
    """A one-layer reasoner trained with feedback off (`training_mode: off`, its gate closed) on
    the two-swap shell game, and its checkpoint: with one layer, what a step computes reaches
    later steps only through the feedback (self-attention there sees only the steps' inputs)."""
    root = tmp_path_factory.mktemp("supervised_off")
    mem = tiny.memory("bert")
    torch.manual_seed(0)
    module = SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(n_layers=1), lr=3e-3, warmup_steps=5,
                              training_mode="off")
    data = tiny.data(module, root / "cache", batch_size=32, **SHELL)
    trainer = tiny.trainer(root, max_steps=800, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "off.ckpt")
    return mem, str(root / "off.ckpt"), root / "cache"


def test_group_advantages_sum_to_zero_in_every_group_and_vanish_for_equal_rewards():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (16, 8), generator=gen).float()
    rewards[3] = 1.0  # a group that is all right: nothing to learn from it
    for scale in (False, True):
        adv = group_advantages(rewards, scale)
        torch.testing.assert_close(adv.sum(1), torch.zeros(16), atol=1e-5, rtol=0)
        assert torch.equal(adv[3], torch.zeros(8))
        assert ((adv > 0) == (rewards > rewards.mean(1, keepdim=True))).all()  # better than the group: pushed up
    scaled = group_advantages(rewards, True)
    mixed = rewards.std(1) > 0
    torch.testing.assert_close(scaled[mixed].std(1, unbiased=False), torch.ones(int(mixed.sum())), atol=1e-4, rtol=0)


def test_k3_kl_is_zero_for_equal_models_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    mask = torch.tensor([[True, True, False]])
    assert k3_kl(logp, logp, mask) == 0
    assert k3_kl(logp, logp + 0.3, mask) > 0
    assert k3_kl(logp, logp + torch.tensor([[0.0, 0.0, 5.0]]), mask) == 0  # unmasked positions do not count


def test_sampled_sequences_place_each_action_where_generation_chose_it():
    tokens, latent, chosen = sampled_sequences([[7, 8], [9], [5, 6, 4]], n_latent=2, budget=3,
                                               bos_id=BOS, eos_id=EOS, pad_id=PAD, device="cpu")
    assert latent.tolist() == [[True, True, False, False, False]] * 3
    # row 0 wrote 7 8 then eos; row 2 ran out of budget (no eos)
    assert tokens.tolist() == [[PAD, PAD, BOS, 7, 8], [PAD, PAD, BOS, 9, PAD], [PAD, PAD, BOS, 5, 6]]
    assert chosen.tolist() == [[-100, -100, 7, 8, EOS], [-100, -100, 9, EOS, -100], [-100, -100, 5, 6, 4]]


@pytest.mark.parametrize("feedback", ["none", "all"])
def test_recomputing_the_sampled_answers_gives_the_policy_that_sampled_them(feedback):
    """Teacher-forced on what generation wrote, the exact recurrence reproduces generation's
    logits: greedy choices are the argmax at every action, and a sampled row's log-probability
    is that of the distribution it was drawn from."""
    torch.manual_seed(0)
    model = make_reasoner(feedback)
    with torch.no_grad():
        model.feedback is not None and model.feedback.gate.weight.normal_(0, 0.3)  # feedback open
    mem = memory(model)
    b, k, budget = mem.mask.shape[0], 3, 6
    n_latent = torch.full((b,), k)
    ids = model.generate(mem, n_latent, BOS, EOS, budget)
    tokens, latent, chosen = sampled_sequences(ids, k, budget, BOS, EOS, PAD, "cpu")
    with torch.no_grad():
        logits = model(tokens, latent, mem)
    taken = chosen != -100
    assert taken.sum() > b  # rows wrote more than one token
    assert torch.equal(logits.argmax(-1)[taken], chosen[taken])
    # a sampled generation: its per-token log-probs are finite and the sequence is reproducible
    sampled = model.generate(mem, n_latent, BOS, EOS, budget, sampling=Sampling(temperature=1.0, seed=3))
    again = model.generate(mem, n_latent, BOS, EOS, budget, sampling=Sampling(temperature=1.0, seed=3))
    assert sampled == again
    tokens, latent, chosen = sampled_sequences(sampled, k, budget, BOS, EOS, PAD, "cpu")
    with torch.no_grad():
        lp = action_log_probs(model(tokens, latent, mem), chosen, 1.0)
    assert torch.isfinite(lp).all() and (lp[chosen != -100] < 0).all() and (lp[chosen == -100] == 0).all()


def test_noisy_feedback_is_recorded_and_its_log_density_centres_on_the_noise_free_feedback():
    torch.manual_seed(0)
    model = make_reasoner("all")
    with torch.no_grad():
        model.feedback.gate.weight.normal_(0, 0.3)
    mem = memory(model)
    sigma, k, budget = 0.05, 4, 5
    ids, fed = noisy_rollout(model, mem, k, budget, BOS, EOS, Sampling(temperature=1.0, seed=1), sigma)
    tokens, latent, chosen = sampled_sequences(ids, k, budget, BOS, EOS, PAD, "cpu")
    fed = fed[:, : tokens.shape[1]]
    assert torch.equal(fed[:, 0], torch.zeros_like(fed[:, 0]))  # position 0 reads no feedback
    with torch.no_grad():
        logits, logdens = feedback_log_density(model, tokens, latent, mem, fed, sigma)
    # fed = feedback(states of t-1) + sigma * N(0, 1): -2 * logdens / d is the noise's mean square / sigma^2 ~ 1
    # at every position up to a row's last action (after it, the rollout read tokens the row never wrote)
    used = (chosen != -100).flip(1).cumsum(1).flip(1) > 0
    used[:, 0] = False
    d = model.cfg.d_model
    ratio = (-2 * logdens / d)[used].mean()
    assert used.sum() > 10 and 0.85 < float(ratio) < 1.15, ratio
    with torch.no_grad():  # another row's feedback inputs: far from what these states feed back
        _, other = feedback_log_density(model, tokens, latent, mem, fed.roll(1, dims=0), sigma)
    assert (-2 * other / d)[used].mean() > 3
    # and the parallel pass with those inputs is the rollout's own policy: its actions are finite log-probs
    lp = action_log_probs(logits, chosen, 1.0)
    assert torch.isfinite(lp).all() and (lp[chosen != -100] < 0).all()
    with pytest.raises(ValueError, match="feedback last or all"):
        noisy_rollout(make_reasoner("none"), mem, k, budget, BOS, EOS, Sampling(temperature=1.0, seed=1), sigma)


def test_rl_starts_at_zero_kl_and_logs_rewards(tiny, tmp_path):
    module, record = rl_module(tiny, tiny.memory()), Record()
    fit(tiny, module, tmp_path, 6, callbacks=[record])
    first = record.steps[0]
    assert first["train/kl"] == 0.0  # the first batch is scored before any update: policy == reference
    assert 0.0 <= first["train/reward"] <= 1.0 and first["train/reward_std"] >= 0.0
    assert first["train/answer_tokens"] >= 1.0
    assert record.steps[-1]["train/kl"] > 0.0  # the policy moved away from the reference
    ref = module.reference()
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("_reference") for k in module.state_dict())


def test_feedback_only_changes_nothing_outside_the_feedback_path(tiny, tmp_path, supervised_off):
    mem, ckpt, _ = supervised_off
    module = SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(n_layers=1), lr=1e-2, warmup_steps=1,
                              objective="rl", rl=RLConfig(group_size=8, trainable="feedback_only"), init_from=ckpt)
    before = {k: v.clone() for k, v in module.reasoner.state_dict().items()}
    fit(tiny, module, tmp_path, 6, **SHELL)
    trained = set(feedback_parameter_names(module.reasoner))
    assert trained == {"feedback.mix", "feedback.proj.weight", "feedback.norm.weight", "feedback.gate.weight"}
    after = module.reasoner.state_dict()
    for name, value in before.items():
        if name in trained:
            continue
        assert torch.equal(after[name], value), f"{name} changed under feedback_only"
    assert not torch.equal(after["feedback.gate.weight"], before["feedback.gate.weight"])  # the gate opened


def test_rl_on_the_feedback_path_alone_raises_the_reward(tiny, tmp_path, supervised_off):
    """Only the feedback path may change (feedback_only) and the one-layer reasoner's steps reach
    each other only through it: whatever RL gains, it gains through the neuralese."""
    mem, ckpt, _ = supervised_off
    torch.manual_seed(0)
    module = SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(n_layers=1), lr=3e-3, warmup_steps=5,
                              objective="rl", rl=RLConfig(group_size=8, trainable="feedback_only", kl_weight=0.0),
                              init_from=ckpt)
    record = Record()
    data = tiny.data(module, tmp_path / "cache", batch_size=16, **SHELL)
    trainer = tiny.trainer(tmp_path, max_steps=RL_STEPS, limit_val_batches=0, gradient_clip_val=1.0,
                           callbacks=[record])
    trainer.fit(module, datamodule=data)
    reward = [s["train/reward"] for s in record.steps]
    first, last = sum(reward[:50]) / 50, sum(reward[-50:]) / 50
    assert last > first + 0.04, (first, last)
    assert float(module.reasoner.feedback.openness()) > 0.005  # the gate opened


def test_init_from_a_feedback_off_checkpoint_starts_rl_at_the_same_function(tiny, tmp_path):
    """The recipe: supervised with feedback none, then feedback all from that checkpoint, whose
    fresh feedback path has its gate closed: exactly the model the checkpoint holds."""
    mem = tiny.memory()
    sft = tiny.module(mem, feedback="none")
    trainer, data = fit(tiny, sft, tmp_path / "sft", 3)
    ckpt = tmp_path / "sft.ckpt"
    trainer.save_checkpoint(ckpt)
    rl = rl_module(tiny, mem, init_from=str(ckpt))
    assert rl.reasoner.feedback is not None and float(rl.reasoner.feedback.openness()) == 0.0
    batch = next(iter(data.val_dataloader()))
    rl.reasoner.set_output_vocab(sft.reasoner.output_ids)
    with torch.no_grad():
        want = sft.reasoner(batch["tokens"], batch["latent"], sft.encode_memory(batch))
        got = rl.reasoner(batch["tokens"], batch["latent"], rl.encode_memory(batch))
    torch.testing.assert_close(got, want)


def test_init_from_refuses_a_missing_file_and_another_reasoner_shape(tiny, tmp_path):
    mem = tiny.memory()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        rl_module(tiny, mem, init_from=str(tmp_path / "nope.ckpt"))
    sft = tiny.module(mem, d_model=64)
    trainer, _ = fit(tiny, sft, tmp_path / "sft", 1)
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match=r"does not fit model.reasoner .*d_model=64.*d_model=32"):
        rl_module(tiny, mem, init_from=str(tmp_path / "wide.ckpt"))


def test_a_resumed_rl_run_keeps_the_reference_it_started_from(tiny, tmp_path):
    mem = tiny.memory()
    module = rl_module(tiny, mem, lr=1e-2)
    start = {k: v.clone() for k, v in module.reasoner.state_dict().items()}
    trainer, _ = fit(tiny, module, tmp_path, 4)
    trainer.save_checkpoint(tmp_path / "rl.ckpt")
    ckpt = torch.load(tmp_path / "rl.ckpt", weights_only=True)
    assert torch.equal(ckpt[RL_REFERENCE_KEY]["feedback.gate.weight"], start["feedback.gate.weight"])
    resumed = rl_module(tiny, mem)  # a fresh module: its own initial weights differ from the run's
    resumed.on_load_checkpoint(ckpt)
    for name, value in start.items():
        assert torch.equal(resumed._reference_state[name], value)


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=1), "group_size must be at least 2"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(trainable="gates"), "trainable must be all or feedback_only"),
    (dict(kl_weight=-1.0), "kl_weight must be >= 0"),
])
def test_absurd_rl_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        RLConfig(**bad)


def test_rl_refuses_settings_it_cannot_honour(tiny):
    mem = tiny.memory()
    with pytest.raises(ValueError, match="set training_mode sequential"):
        SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(), objective="rl", training_mode="off")
    with pytest.raises(ValueError, match="feedback_only trains the feedback path"):
        SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(feedback="none"), objective="rl",
                         rl=RLConfig(trainable="feedback_only"))
    with pytest.raises(ValueError, match="halting false"):
        SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(halting=True), objective="rl")
    with pytest.raises(ValueError, match="objective must be supervised or rl"):
        SplitModelModule(memory=mem, reasoner=tiny.reasoner_config(), objective="ppo")
