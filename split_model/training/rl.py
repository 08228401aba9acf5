"""Reinforcement learning of the reasoner from outcomes: group-relative policy gradients.

For each question the reasoner samples G answers after its latent steps; the task's own
`score` rewards each; the advantage of an answer is its reward minus the mean of its group
(optionally divided by the group's std), and the update is the policy gradient of those
advantages plus a KL penalty to a frozen reference (the model RL started from). The memory
stays frozen and its states cached, exactly as in supervised training.

The policy's log-probabilities are recomputed, with gradients, by the same exact recurrence
that sampled the answers (teacher-forced on the sampled tokens), so feedback is trained by
backprop through every step. With `feedback_noise` > 0 the neuralese itself is explored:
every fed-back vector gets Gaussian noise while sampling; those noisy vectors are actions of
the policy, their log-density under N(feedback(states), sigma^2) joins the policy gradient,
and because they are then given inputs, the recomputation is one parallel pass.

`SplitModelModule(objective="rl", rl=RLConfig(...))` uses these functions in its training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from split_model.reasoner.layers import MemoryKV
from split_model.reasoner.sampling import Sampling
from split_model.training.format import IGNORE

FEEDBACK_PREFIX = "feedback."  # the neuralese path's parameters: mix, proj, norm, gate


@dataclass
class RLConfig:
    """How `objective: rl` trains.

    Args:
        group_size: G, answers sampled per question; advantages are relative to the group.
        temperature: sampling temperature of the answer tokens (> 0); log-probabilities are of
            softmax(logits / temperature), the distribution sampled from.
        top_p: nucleus sampling (1: off). Below 1 the sampled distribution is truncated while the
            log-probabilities are not: a small bias, accepted by most RL recipes.
        kl_weight: weight of the KL penalty to the reference model (k3 estimator per sampled token).
        scale_by_std: divide advantages by the group's reward std (+1e-6); groups with equal
            rewards then have zero advantage either way.
        trainable: all (every reasoner parameter) or feedback_only (mix, projection, norm and gate
            of the feedback path, the neuralese encoding; every other parameter stays bit-identical).
        feedback_noise: sigma of Gaussian exploration noise on every fed-back vector while sampling
            (0: none); the noise's log-density enters the policy gradient.
        seed: base seed of the sampling streams (with the global step and rank: reproducible).
    """

    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    kl_weight: float = 0.02
    scale_by_std: bool = True
    trainable: Literal["all", "feedback_only"] = "all"
    feedback_noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rl.group_size must be at least 2 (advantages are relative to the group), "
                             f"got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature must be > 0 (RL samples its answers), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rl.top_p must be in (0, 1], got {self.top_p}")
        if self.kl_weight < 0:
            raise ValueError(f"rl.kl_weight must be >= 0, got {self.kl_weight}")
        if self.trainable not in ("all", "feedback_only"):
            raise ValueError(f"rl.trainable must be all or feedback_only, got {self.trainable!r}")
        if self.feedback_noise < 0:
            raise ValueError(f"rl.feedback_noise must be >= 0, got {self.feedback_noise}")

    def sampling(self, step: int, rank: int = 0) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p,
                        seed=(self.seed * 1_000_003 + step) * 1_009 + rank)


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G): reward minus its group's mean, divided by the
    group's (population) std + 1e-6 when scale_by_std. Each group's advantages sum to zero."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return adv


def repeat_memory(states: torch.Tensor, mask: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question's cached memory states G times in a row: (B, ...) -> (B*G, ...)."""
    return states.repeat_interleave(g, dim=0), mask.repeat_interleave(g, dim=0)


def sampled_sequences(ids: list[list[int]], n_latent: int, budget: int, bos_id: int, eos_id: int, pad_id: int,
                      device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the rows generated, as teacher-forced sequences: tokens, latent (B, T) and the
    actions (B, T): the id chosen at each position (IGNORE where none was).

    Row r took n_latent latent steps, read bos, then wrote ids[r], then eos when it stopped
    before the budget. Position n_latent + i chose action i, reading action i-1 (bos for i=0),
    exactly as `Reasoner.generate` ran it.
    """
    actions = [row + [eos_id] if len(row) < budget else list(row) for row in ids]
    t = n_latent + max(len(a) for a in actions)
    tokens = torch.full((len(ids), t), pad_id, dtype=torch.long)
    chosen = torch.full((len(ids), t), IGNORE, dtype=torch.long)
    for r, a in enumerate(actions):
        tokens[r, n_latent] = bos_id
        tokens[r, n_latent + 1 : n_latent + len(a)] = torch.tensor(a[:-1], dtype=torch.long)
        chosen[r, n_latent : n_latent + len(a)] = torch.tensor(a, dtype=torch.long)
    latent = torch.zeros((len(ids), t), dtype=torch.bool)
    latent[:, :n_latent] = True
    return tokens.to(device), latent.to(device), chosen.to(device)


@torch.no_grad()
def noisy_rollout(reasoner, memory: MemoryKV, n_latent: int, budget: int, bos_id: int, eos_id: int,
                  sampling: Sampling, sigma: float) -> tuple[list[list[int]], torch.Tensor]:
    """Generation as `Reasoner.generate` runs it (n_latent latent steps, bos, tokens until eos
    or the budget), with N(0, sigma^2) noise added to every fed-back vector. Returns each row's
    written ids (eos excluded) and the feedback inputs every position received (B, T, d):
    zeros at position 0, which reads no feedback."""
    if reasoner.feedback is None:
        raise ValueError("rl.feedback_noise explores the fed-back vectors: it needs reasoner.feedback last or all")
    b, d, device = memory.mask.shape[0], reasoner.cfg.d_model, memory.mask.device
    choose = sampling.chooser(device)
    noise = torch.Generator(device=device).manual_seed((sampling.seed or 0) + 7919)
    prev = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    caches, states, fed, written = None, None, [], []
    for t in range(n_latent + budget):
        fb = torch.zeros(b, 1, d, device=device)
        if states is not None:
            fb = reasoner.feedback(states) + sigma * torch.randn(b, 1, d, device=device, generator=noise)
        fed.append(fb)
        tokens = prev if t > n_latent else torch.full_like(prev, bos_id)
        latent = torch.full((b, 1), t < n_latent, dtype=torch.bool, device=device)
        hidden, states, caches, _ = reasoner.run(tokens, latent, memory, caches, fb)
        prev = reasoner.token_ids(choose(reasoner.logits(hidden[:, 0])))[:, None]
        if t >= n_latent:
            written.append(prev[:, 0])
            done |= prev[:, 0] == eos_id
            if bool(done.all()):
                break
    record = torch.stack(written, dim=1).tolist() if written else [[] for _ in range(b)]
    ids = [row[: row.index(eos_id)] if eos_id in row else row for row in record]
    return ids, torch.cat(fed, dim=1)


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, T, V), actions (B, T) as indices into the logits (IGNORE where none) ->
    log softmax(logits / temperature) of each action (B, T), 0 where IGNORE."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    taken = logp.gather(-1, actions.clamp_min(0)[..., None])[..., 0]
    return torch.where(actions == IGNORE, torch.zeros_like(taken), taken)


def feedback_log_density(reasoner, tokens: torch.Tensor, latent: torch.Tensor, memory: MemoryKV,
                         fed: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One parallel pass with the recorded feedback inputs `fed` (B, T, d) as given inputs.

    Returns the logits (B, T, V) and, per position t >= 1, the log-density (up to a constant)
    of fed[:, t] under N(feedback(layer states of t-1), sigma^2): (B, T), 0 at position 0.
    Exact for the noisy policy: given its inputs, each position depends on earlier ones only
    through causal self-attention, which one pass computes.
    """
    hidden, states, *_ = reasoner.run(tokens, latent, memory, None, fed)
    mean = reasoner.feedback(states[:, :, :-1])  # (B, T-1, d): the noise-free feedback into 1..T-1
    logdens = -(fed[:, 1:] - mean).pow(2).sum(-1) / (2 * sigma**2)
    return reasoner.logits(hidden), F.pad(logdens, (1, 0))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of exp(r) - r - 1 with r = ref_logp - logp: an unbiased,
    non-negative estimate of KL(policy || reference) from the policy's own samples; exactly 0
    where the two models agree."""
    r = (ref_logp - logp).masked_fill(~mask, 0.0)
    return ((r.exp() - r - 1) * mask).sum() / mask.sum().clamp_min(1)


def feedback_parameter_names(reasoner) -> list[str]:
    """The reasoner parameters of the feedback path (what `trainable: feedback_only` trains)."""
    return [name for name, _ in reasoner.named_parameters() if name.startswith(FEEDBACK_PREFIX)]
