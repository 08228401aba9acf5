"""The LightningModule: a frozen memory and a trainable recurrent reasoner.

The optimiser sees only the reasoner. Checkpoints hold only the reasoner's weights plus the
backbone's spec and fingerprint; loading with a backbone whose fingerprint differs is
refused, because the reasoner learned to read that backbone's states and no other.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from split_model.memory import HFMemory
from split_model.reasoner import Reasoner, ReasonerConfig, Sampling
from split_model.reasoner.graphs import GraphedTraining
from split_model.retrieval.lookup import StoreLookup
from split_model.tasks import Task
from split_model.training.checkpoints import use_atomic_checkpoints
from split_model.training.distributed import ignore_frozen_memory
from split_model.training.format import IGNORE, Formatter
from split_model.training.report import TestReport, markdown_table
from split_model.training.rl import (
    RLConfig,
    action_log_probs,
    feedback_log_density,
    feedback_parameter_names,
    group_advantages,
    k3_kl,
    noisy_rollout,
    repeat_memory,
    sampled_sequences,
)

CKPT_KEY = "split_model"
FALLBACK_BUDGET = 64  # tokens written in evaluation when neither max_new_tokens nor the train split says


class NonFiniteError(RuntimeError):
    """Training met a NaN or infinite loss or gradient (with `nonfinite: stop`)."""


class SplitModelModule(LightningModule):
    """Train a recurrent reasoner that reads a frozen memory backbone.

    Args:
        memory: the frozen memory backbone: a short name or path (e.g. minilm-l6,
            smollm2-135m, a local HF directory, a .gguf file), or split_model.memory.HFMemory
            with init_args (name or an inline random config, layers, max_length).
        reasoner: the reasoner's shape and feedback mode.
        bptt_steps: truncate backprop through time every this many steps (None: never). What
            is cut, by training mode: sequential (with feedback) detaches the fed-back layer
            states and the self-attention KV cache at every window start, so no gradient
            crosses a window boundary; jacobi detaches the fed-back states there, but its
            parallel passes still carry gradients across boundaries through self-attention;
            off, and feedback none (one parallel pass), truncate nothing.
        training_mode: how training runs the recurrence. sequential: the exact recurrence,
            one step after another. jacobi: `jacobi_passes` parallel passes over all positions,
            pass k feeding position t the layer states of t-1 from pass k-1 (exact once passes
            >= steps; validation logs val/jacobi_gap, the relative distance of its logits to
            the exact ones). off: feedback disabled, one parallel teacher-forced pass (the gate
            stays closed, so switching to sequential later starts from the same function).
            Evaluation and generation always run the exact recurrence. A `Curriculum` callback
            can change the mode during training.
        jacobi_passes: K, the number of parallel passes in jacobi mode.
        halting_weight: weight of the halting loss (see `halting_loss`) when the reasoner has a
            halting head (`reasoner.halting: true`).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrices (not of norms, gates or embeddings).
        warmup_steps: linear warmup before cosine decay to 10% of lr.
        max_new_tokens: generation budget in validation; None: the longest target of the train
            split (what evaluation may know; the gold target of an example is never used).
        output_vocab: which tokens the reasoner writes: full (the backbone's whole vocabulary)
            or task (only tokens that occur in the training targets; far cheaper to train
            with a large vocabulary, and the model can only write what the task needs). With
            task the embedding keeps the rows of those tokens and of bos, eos and padding only
            (other ids read one shared row), so the reasoner holds no parameters that no input
            reads: the 30,522-row MiniLM table at rank 64 alone is 1,953,408 parameters.
        execution: how the recurrence runs. auto: fixed-shape steps (preallocated caches
            written in place, no host syncs, a fused optimizer), captured as CUDA graphs on a
            GPU; on CPU the eager fixed-shape path. compiled: as auto, and on a GPU the
            generation step is compiled by torch.compile before capture (a faster step for
            seconds of compilation per batch and memory shape: for long generations; see
            README "Speed"). static: the fixed-shape path, never captured. dynamic: the
            reference implementation (caches grown step by step, unfused optimizer), for comparison.
        nonfinite: what a NaN or infinite loss or gradient does. stop: training ends with an
            error naming the step, before that step changes the weights, so the last checkpoint
            written stays good; skip: the batch is skipped (no optimizer update; counted in
            train/skipped_batches) and training goes on; off: no check. The check reads one
            value on the host per step (on a GPU that is a synchronisation; `off` removes it).
        store: directory of a retrieval store built by this memory backbone (`split-model index`);
            required when `reasoner.retrieval_k` > 0. Swapping it (e.g. for evaluation) changes
            what the model can look up without retraining; a store of another backbone is refused.
        retrieval_loss: weight of the auxiliary retrieval loss, -log p(gold chunk) among the
            store's chunks, on tasks whose reasoning steps are documents of the store (querying
            step h should fetch step h's document). 0: the query learns through attention alone.
        retrieval_negatives: random store chunks in that loss's softmax besides the gold and the
            fetched ones (the whole store when it is smaller).
        retrieval_pick_loss: weight of a second auxiliary loss on the same tasks: where a
            step's gold chunk is among the fetched ones, -log of its share of the reasoner's
            preference over them (the softmax of the attention bias, with `retrieval_rerank`
            and `retrieval_match_question` their token matches too) plus, with `retrieval_quote`, -log of its share of the
            quote's attention. The fetched chunks are the gold one's nearest rivals (the same
            relation about a person with a similar name): this teaches the step which of them
            to read and quote. 0: off. train/ and val/retrieval_pick log the gold chunk's mean share.
        retrieval_teacher: in training, put each step's gold chunk among the fetched ones when
            the search missed it, so later hops and the answer can be learned before the
            queries are good. Evaluation never does.
        exclude_question: never fetch a chunk whose text is the question itself (for corpora
            that hold the training questions).
        evidence_loss: weight of a loss on where the first block's cross-attention reads, for
            tasks whose examples name what each reasoning step reads in the question
            (`Example.evidence`; ProsQA with steps_as reached or frontier: the facts each hop
            of the search follows): at each labelled latent step, -log of the attention mass,
            averaged over the heads, on the memory states of those characters. 0: off. On, the
            recurrence runs step by step (execution dynamic; no graphs), as the attention is
            computed explicitly; train/ and val/evidence_mass log that mass.
        matmul_precision: float32 matmul precision set on a CUDA device at setup
            (torch.set_float32_matmul_precision): "high" (TF32 tensor cores, measured faster
            for training), "highest" (full fp32) or "medium". Ignored on CPU.
        objective: supervised (cross-entropy on the data's labels) or rl (sample `rl.group_size`
            answers per question, reward them with the task's own score, group-relative policy
            gradient with a KL penalty to the model RL started from; see split_model/training/rl.py
            and README "Reinforcement learning of the neuralese"). RL runs the exact recurrence
            (training_mode sequential) and needs no labels beyond the answers the task scores.
        rl: the RL settings (group size, temperature, KL weight, what is trainable, noise on the
            fed-back vectors); used with objective rl.
        init_from: a checkpoint (`split-model fit` writes them) whose reasoner weights this model
            starts from: the same backbone and reasoner shape. Feedback parameters the checkpoint
            lacks (it was trained with feedback none) start fresh with the gate closed, so the
            model computes what the checkpoint computed. Optimizer state and step are not taken
            (`--ckpt_path` resumes a run; this starts a new one).
    """

    def __init__(
        self,
        memory: HFMemory | str,
        reasoner: ReasonerConfig = ReasonerConfig(),  # never mutated: safe as a default
        bptt_steps: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        max_new_tokens: int | None = None,
        output_vocab: Literal["full", "task"] = "full",
        execution: Literal["auto", "compiled", "static", "dynamic"] = "auto",
        matmul_precision: Literal["highest", "high", "medium"] = "high",
        training_mode: Literal["sequential", "jacobi", "off"] = "sequential",
        jacobi_passes: int = 4,
        halting_weight: float = 0.5,
        nonfinite: Literal["stop", "skip", "off"] = "stop",
        store: str | None = None,
        retrieval_loss: float = 1.0,
        retrieval_negatives: int = 1024,
        retrieval_teacher: bool = True,
        retrieval_pick_loss: float = 0.0,
        exclude_question: bool = False,
        evidence_loss: float = 0.0,
        objective: Literal["supervised", "rl"] = "supervised",
        rl: RLConfig = RLConfig(),  # never mutated: safe as a default
        init_from: str | None = None,
    ):
        super().__init__()
        if bptt_steps is not None and bptt_steps <= 0:
            raise ValueError(f"bptt_steps must be positive or None, got {bptt_steps}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if execution not in ("auto", "compiled", "static", "dynamic"):
            raise ValueError(f"execution must be one of auto, compiled, static, dynamic; got {execution!r}")
        if training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode must be one of {', '.join(TRAINING_MODES)}; got {training_mode!r}")
        if jacobi_passes < 1:
            raise ValueError(f"jacobi_passes must be at least 1, got {jacobi_passes}")
        if halting_weight < 0:
            raise ValueError(f"halting_weight must be >= 0, got {halting_weight}")
        if nonfinite not in ("stop", "skip", "off"):
            raise ValueError(f"nonfinite must be one of stop, skip, off; got {nonfinite!r}")
        if matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(f"matmul_precision must be one of highest, high, medium; got {matmul_precision!r}")
        if evidence_loss < 0:
            raise ValueError(f"evidence_loss must be >= 0, got {evidence_loss}")
        if retrieval_loss < 0 or retrieval_negatives < 0 or retrieval_pick_loss < 0:
            raise ValueError(f"retrieval_loss, retrieval_negatives and retrieval_pick_loss must be >= 0, got "
                             f"{retrieval_loss}, {retrieval_negatives}, {retrieval_pick_loss}")
        if objective not in ("supervised", "rl"):
            raise ValueError(f"objective must be supervised or rl, got {objective!r}")
        if objective == "rl":
            check_rl_settings(rl, reasoner, training_mode, store)
        self.save_hyperparameters(ignore=["memory"])
        self.memory = memory = HFMemory(name=memory) if isinstance(memory, str) else memory
        self.store = open_store(store, memory, reasoner.retrieval_k)
        self.reasoner = Reasoner(
            reasoner, vocab_size=memory.tokenizer.vocab_size, memory_dim=memory.hidden_size,
            num_states=memory.num_states, embed_init=memory.input_embeddings(),
            key_dim=None if self.store is None else self.store.key_dim,
        )
        self.formatter: Formatter | None = None
        self.step_acc: torch.Tensor | None = None  # the last _forward's labelled latent steps right (steps: latent)
        # The last _forward's label sets (step_token: set): each position's recall, whether its own set
        # (exact, see _set_terms) is its label, and which positions have a set, (B, T) each.
        self.set_found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.halt_loss: torch.Tensor | None = None  # the last _forward's halting loss (halting on)
        self.evidence_mass: torch.Tensor | None = None  # the last _forward's attention on the steps' evidence
        self.task: Task | None = None
        self._format_spec: dict | None = None
        self._graphed: GraphedTraining | None = None
        self._report: TestReport | None = None  # what a test run has answered so far
        self.last_written: list[int] = []  # tokens (eos included) each row wrote in the last generation
        # What training runs now: the configured mode, until a Curriculum changes it.
        self.training_mode, self.jacobi_passes = training_mode, jacobi_passes
        self.grad_probe: list[torch.Tensor] | None = None  # per-position input gradients (stability logging)
        self._loss: torch.Tensor | None = None  # this step's training loss, checked before the optimizer step
        self.skipped_batches = 0  # batches skipped for a non-finite loss or gradient (nonfinite: skip)
        if init_from is not None:
            self.load_reasoner_weights(init_from)
        self.rl = rl if objective == "rl" else None
        self._reference: Reasoner | None = None  # the frozen policy RL started from (built on first use)
        self._reference_state: dict[str, torch.Tensor] | None = None
        if self.rl is not None:
            self._reference_state = {k: v.detach().clone() for k, v in self.reasoner.state_dict().items()}
            if self.rl.trainable == "feedback_only":
                trained = set(feedback_parameter_names(self.reasoner))
                for name, p in self.reasoner.named_parameters():
                    p.requires_grad_(name in trained)
        # with output_vocab task the table shrinks to the task's rows later (fit's setup prints the count again)
        rank_zero_info(self.describe() + ("; before the embedding keeps only the task's rows (output_vocab: task)"
                                          if output_vocab == "task" else ""))

    def load_reasoner_weights(self, path: str) -> None:
        """Start from the reasoner weights of the checkpoint at `path` (see `init_from`)."""
        ckpt = read_checkpoint(path)
        check_fingerprint(ckpt[CKPT_KEY], self.memory)
        if ckpt[CKPT_KEY].get("embed_ids") is not None:  # its table holds only these ids' rows: so will ours
            self.reasoner.embed.keep(ckpt[CKPT_KEY]["embed_ids"])
        weights = {_RENAMED.get(k, k): v for k, v in ckpt["state_dict"].items() if k.startswith("reasoner.")}
        ours = {k: v for k, v in super().state_dict().items() if k.startswith("reasoner.")}
        fresh = [k for k in ours if k not in weights and k.startswith("reasoner.feedback.")]
        missing = [k for k in ours if k not in weights and k not in fresh]
        unexpected = [k for k in weights if k not in ours]
        wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
                 if k in weights and weights[k].shape != v.shape]
        if missing or unexpected or wrong:
            theirs = ckpt[CKPT_KEY].get("reasoner", {})
            raise ValueError(
                f"model.init_from={path}: its reasoner does not fit model.reasoner "
                f"(checkpoint: {', '.join(f'{k}={theirs.get(k)}' for k in _SHAPE_KEYS)}; config: "
                f"{', '.join(f'{k}={getattr(self.reasoner.cfg, k)}' for k in _SHAPE_KEYS)}). Missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]}: set the reasoner as "
                "the checkpoint was trained")
        with torch.no_grad():
            for k, v in weights.items():
                ours[k].copy_(v)
        rank_zero_info(f"reasoner weights from {path}" + (f"; feedback path fresh (gate closed): {len(fresh)} tensors"
                                                          if fresh else ""))

    def describe(self) -> str:
        n_train = sum(p.numel() for p in self.reasoner.parameters())
        n_frozen = sum(p.numel() for p in self.memory.parameters())
        kept = self.reasoner.embed.kept_ids()
        rows = "" if kept is None else f", embedding rows of the {len(kept)} token ids it reads and writes"
        return (f"split model: reasoner {n_train:,} trainable parameters (feedback={self.reasoner.cfg.feedback}{rows}), "
                f"memory {n_frozen:,} frozen parameters")

    def connect_data(self, formatter: Formatter, task: Task) -> None:
        self.formatter, self.task, self._format_spec = formatter, task, formatter.spec

    def setup(self, stage: str) -> None:
        ignore_frozen_memory(self)  # before any DDP wrapping: the frozen backbone has no gradients to sync
        use_atomic_checkpoints(self.trainer.strategy)
        if self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        data = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.output_vocab == "task" and data is not None:
            self.reasoner.set_output_vocab(data.target_token_ids())
            self.reasoner.keep_rows(self.special_ids())
            if self.rl is not None:  # the reference is the starting policy, in the reasoner's new shape
                self._reference_state = {k: v.detach().clone() for k, v in self.reasoner.state_dict().items()}
                self._reference = None
            rank_zero_info(self.describe())

    def special_ids(self) -> list[int]:
        """Token ids the reasoner reads besides the ones it writes: bos, eos and padding."""
        tok = self.memory.tokenizer
        return sorted({tok.bos_id, tok.eos_id, tok.pad_id})

    # -- frozen memory stays out of state dicts and optimisers --------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if k.startswith("memory.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {_RENAMED.get(k, k): v for k, v in state_dict.items()}  # checkpoints of earlier versions
        if TABLE_KEY in state_dict:  # a whole-vocabulary table (earlier versions) into a reasoner that keeps some rows
            state_dict[TABLE_KEY] = self.reasoner.embed.reduce(state_dict[TABLE_KEY])
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("memory.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match the reasoner: missing {missing}, "
                               f"unexpected {result.unexpected_keys}")
        return result

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the reasoner only, weight decay on `decayed_parameters()` alone."""
        decayed = set(self.decayed_parameters())
        decay, no_decay = [], []
        for name, p in self.reasoner.named_parameters():
            if p.requires_grad:  # rl.trainable feedback_only freezes the rest
                (decay if name in decayed else no_decay).append(p)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.95), fused=self._fused_optimizer(),
        )

    def decayed_parameters(self) -> list[str]:
        """Names of the reasoner parameters that take weight decay: the weight matrices of its
        projections. Not decayed: gates (decay would pull the zero-initialised feedback gate and
        the cross-attention gates back towards closed), position maps, the latent input,
        norms, the feedback mix and the tied embedding."""
        return [name for name, p in self.reasoner.named_parameters()
                if p.ndim == 2 and not any(part in _NO_DECAY for part in name.split("."))]

    def configure_optimizers(self):
        opt = self.build_optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}

    def _fused_optimizer(self) -> bool | None:
        """One kernel per parameter group instead of a dozen per tensor, where torch has it."""
        if self.hparams.execution == "dynamic":
            return None
        return all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.reasoner.parameters())

    # -- steps ---------------------------------------------------------------------------------
    def _logits(self, batch: dict):
        """(B, T, V or K) logits of the batch's sequences, the memory K/V (None when a captured
        graph computed them inside) and, with a halting head, the normed final hidden (B, T, d)."""
        args = (batch["tokens"], batch["latent"])
        execution, bptt = self.hparams.execution, self.hparams.bptt_steps
        mode = self.training_mode if self.training and torch.is_grad_enabled() else "sequential"
        halting = self.reasoner.halt is not None
        watched = self.reasoner.blocks[0].xattn.record is not None  # see _forward
        if self._uses_graphs(batch) and not watched:
            if self._graphed is None:
                self._graphed = GraphedTraining(self.reasoner, bptt)
            return self._graphed(*args, batch["mem_states"], batch["mem_mask"], mode, self.jacobi_passes), None, None
        mem = self.encode_memory(batch)
        if mode == "off":
            out = self.reasoner.forward_off(*args, mem, return_hidden=halting)
        elif mode == "jacobi":
            out = self.reasoner.forward_jacobi(*args, mem, self.jacobi_passes, bptt, return_hidden=halting)
        else:
            # The fixed-shape path computes attention inside its own kernels: a watched layer runs dynamic.
            forward = self.reasoner.forward_dynamic if execution == "dynamic" or watched else self.reasoner
            out = forward(*args, mem, bptt, return_hidden=halting)
        return (out[0], mem, out[1]) if halting else (out, mem, None)

    def _watches_evidence(self, batch: dict) -> bool:
        """Whether this forward records the first block's attention for the evidence loss."""
        if not self.hparams.evidence_loss:
            return False
        if "evidence" not in batch:
            if not self.training:  # evaluation needs no evidence: it is only watched where there is some
                return False
            raise ValueError(
                "evidence_loss needs examples that name what each reasoning step reads (Example.evidence: "
                "ProsQA with data.task.init_args.steps_as reached or frontier, read by a memory with a fast "
                "Hugging Face tokenizer); this data has none: set model.evidence_loss=0")
        return True

    def _evidence_terms(self, batch: dict, record: list[torch.Tensor]) -> torch.Tensor:
        """-log of the first block's head-averaged attention mass on each labelled step's evidence,
        averaged over the steps that have some; sets `evidence_mass` (their mean mass)."""
        t = batch["tokens"].shape[1]
        p = record[-1] if record[-1].shape[2] == t else torch.cat(record, dim=2)  # jacobi: the last pass
        evidence = batch["evidence"]  # (B, T, N)
        mass = (p.mean(1) * evidence).sum(-1)  # (B, T)
        has = evidence.any(-1)
        n = has.sum().clamp_min(1)
        self.evidence_mass = (mass * has).sum().detach() / n
        return -(mass.clamp_min(1e-6).log() * has).sum() / n

    def _uses_graphs(self, batch: dict) -> bool:
        """Whether this batch's forward and backward run as captured CUDA graphs: training (in
        any mode) on a GPU with execution auto or compiled, without a halting head (graphs
        return the logits only)."""
        return (self.hparams.execution in ("auto", "compiled") and batch["tokens"].is_cuda
                and torch.is_grad_enabled() and self.reasoner.halt is None and self.store is None)

    def encode_memory(self, batch: dict):
        """The batch's memory K/V, with a lookup into the store when the model retrieves. The
        examples' gold chunks (their steps, where those are documents of the store) score
        retrieval and, in training, teach it; they never change how evaluation runs."""
        mem = self.reasoner.encode_memory(batch["mem_states"], batch["mem_mask"])
        if self.store is not None:
            examples = batch.get("examples")
            gold = None if examples is None else self.gold_chunks(examples)
            exclude = None
            if self.hparams.exclude_question and examples is not None:
                exclude = np.array([[self._find(e.question)] for e in examples], dtype=np.int64)
            mem.lookup = StoreLookup(self.store, self.reasoner.cfg.retrieval_k, mem.mask.device, gold=gold,
                                     teacher=self.training and self.hparams.retrieval_teacher, exclude=exclude,
                                     negatives=self.hparams.retrieval_negatives, seed=self.global_step)
        return mem

    def gold_chunks(self, examples) -> np.ndarray | None:
        """(B, T) the chunk each querying step should fetch: querying step h (position
        h * retrieval_every) -> the chunk of the example's step h, -1 where a step is not a
        document of the store; None when no step of the batch is."""
        every = self.reasoner.cfg.retrieval_every
        rows = [[self._find(step) for step in e.steps] for e in examples]
        if not any(i >= 0 for row in rows for i in row):
            return None
        gold = np.full((len(rows), every * max(len(r) for r in rows)), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            gold[b, : every * len(row) : every] = row
        return gold

    def _find(self, text: str) -> int:
        found = self.store.find(text)
        return -1 if found is None else found

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        watched = self.reasoner.blocks[0].xattn if self._watches_evidence(batch) else None
        self.evidence_mass = None
        if watched is not None:
            watched.record = []
        try:
            logits, mem, hidden = self._logits(batch)
        finally:
            record = None if watched is None else watched.record
            if watched is not None:
                watched.record = None
        labels = self._label_index(batch["labels"])
        self.halt_loss = None
        # The mean over scored labels, without asking the host whether there are any (a sync per
        # step on a GPU): with none, e.g. all outside the output vocabulary, the loss is 0, not nan.
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        count = (labels != IGNORE).sum()
        sets, self.set_found = batch.get("label_sets"), None
        if sets is not None:  # each labelled set position counts as one label
            set_total, set_count, set_right, found, exact, with_set = self._set_terms(logits, self._label_index(sets))
            self.set_found = (found, exact, with_set)
            total, count = total + set_total, count + set_count
        loss = total / count.clamp_min(1)
        if record:
            loss = loss + self.hparams.evidence_loss * self._evidence_terms(batch, record)
        lookup = None if mem is None else mem.lookup
        if lookup is not None:
            loss = loss + self._retrieval_terms(lookup, labels.shape[0])
        if hidden is not None:
            self.halt_loss = self.halting_loss(logits, hidden, batch)
            loss = loss + self.hparams.halting_weight * self.halt_loss
        hit = self.reasoner.token_ids(logits.argmax(-1)) == batch["labels"]
        self.step_acc = None
        if self.formatter is not None and self.formatter.steps == "latent":
            # The share of labelled latent steps right (teacher-forced); logged by the step hooks.
            labelled = batch["latent"] & (batch["labels"] != IGNORE)
            right_steps, n_steps = (hit & labelled).sum(), labelled.sum()
            if sets is not None:
                right_steps, n_steps = right_steps + set_right, n_steps + set_count
            self.step_acc = right_steps / n_steps.clamp_min(1)
        right = hit | ~batch["answer_mask"]
        return loss, right.all(dim=1).float().mean(), mem

    @staticmethod
    def _set_terms(logits: torch.Tensor, sets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Label sets (step_token="set"): `sets` (B, T, W) holds each position's target indices
        in the logits, IGNORE for none. Returns the summed cross-entropy against an equal share
        on each member (the mean of -log p over the members, per labelled position), the number
        of labelled positions, how many of them have exactly their set as the top |set| logits
        (every member above every other token), each position's recall (the share of its members
        among its top |set| logits; 0 where it has no set), whether the set the model itself
        names is the label (exact: its top m tokens, m = exp(entropy) rounded, the number of
        tokens its probability is spread over, are the members) and which positions have a set,
        (B, T) each. Recall and "right" take the set's size from the label: a model that always
        ranks "not" fourth after "alex is happy" has recall 1.00 on both "Alex is happy" and
        "Alex is not happy" without telling them apart; exact needs it to."""
        member = sets != IGNORE  # (B, T, W)
        n = member.sum(-1)  # (B, T) members per position
        labelled = n > 0
        logp = logits.float().log_softmax(-1)
        index = sets.clamp_min(0)
        nll = -(logp.gather(-1, index) * member).sum(-1) / n.clamp_min(1)
        top = logits.topk(min(sets.shape[-1] + 1, logits.shape[-1]), dim=-1).values  # largest first
        top = torch.cat([top, top.new_full((*top.shape[:-1], 1), float("-inf"))], dim=-1)  # a set of every token
        kth = top.gather(-1, (n - 1).clamp_min(0)[..., None]).squeeze(-1)  # the |set|-th largest logit
        after = top.gather(-1, n[..., None]).squeeze(-1)  # the next one: the best other token when all are in
        chosen = logits.gather(-1, index)
        found = ((chosen >= kth[..., None]) & member).sum(-1) / n.clamp_min(1)
        lowest_member = chosen.masked_fill(~member, float("inf")).amin(-1)
        right = labelled & (lowest_member > after)
        own_size = (-(logp.exp() * logp).sum(-1)).exp().round()  # (B, T) tokens the probability is spread over
        exact = right & (own_size == n)
        return (nll * labelled).sum(), labelled.sum(), right.sum(), found, exact, labelled

    def set_recall(self, by_step: bool = False, exact: bool = False) -> torch.Tensor | dict[int, torch.Tensor] | None:
        """The last forward's recall of its label sets (None without sets), or with `exact` the
        share of labelled positions whose own set is the label (see _set_terms): the mean over
        labelled positions, or with `by_step` {k: mean over the rows' k-th labelled position}
        (one host sync: for evaluation)."""
        if self.set_found is None:
            return None
        recall, right, labelled = self.set_found
        found = right.float() if exact else recall
        if not by_step:
            return (found * labelled).sum() / labelled.sum().clamp_min(1)
        step = (labelled.cumsum(1) - 1)[labelled]  # each labelled position's index in its row
        total = torch.zeros(labelled.shape[1], device=found.device).index_add_(0, step, found[labelled])
        count = torch.zeros_like(total).index_add_(0, step, torch.ones_like(found[labelled]))
        return {k: total[k] / count[k] for k in range(int(labelled.sum(1).max()))}

    def _retrieval_terms(self, lookup, b: int) -> torch.Tensor | float:
        """Logs the search's recall of the gold chunks; returns the weighted auxiliary loss."""
        prefix = "train" if self.training else "val"
        recall = lookup.recall()
        if recall is not None:
            self.log(f"{prefix}/retrieval_recall", recall, batch_size=b, sync_dist=not self.training)
            for step, value in lookup.recall_by_step().items():
                self.log(f"{prefix}/retrieval_recall_step{step}", value, batch_size=b, sync_dist=not self.training)
        share = lookup.pick_share()
        if share is not None:
            self.log(f"{prefix}/retrieval_pick", share, batch_size=b, sync_dist=not self.training)
        total = 0.0
        aux = lookup.loss()
        if aux is not None:
            self.log(f"{prefix}/retrieval_loss", aux, batch_size=b, sync_dist=not self.training)
            total = self.hparams.retrieval_loss * aux
        pick = lookup.pick_loss() if self.hparams.retrieval_pick_loss else None
        if pick is not None:
            self.log(f"{prefix}/retrieval_pick_loss", pick, batch_size=b, sync_dist=not self.training)
            total = total + self.hparams.retrieval_pick_loss * pick
        return total

    def halting_loss(self, logits: torch.Tensor, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """What trains the halting head, over the unlabelled latent steps of each row:
        - a probe: the output head at latent step t predicts the row's first target token (what
          it will write after bos), so every latent step carries a readout of "the answer so far";
        - the head: binary cross-entropy of its halt probability at step t against whether that
          probe is already right there (detached).
        Mean over those steps (0 where there are none)."""
        labels = batch["labels"]
        t = labels.shape[1]
        first = labels.gather(1, batch["n_latent"].clamp(max=t - 1)[:, None])  # (B, 1) label at the bos step
        target = self._label_index(first)  # index in the logits, or IGNORE
        steps = batch["latent"] & (labels == IGNORE) & (target != IGNORE)  # (B, T) unlabelled latent steps
        if "label_sets" in batch:
            steps = steps & (batch["label_sets"] == IGNORE).all(-1)
        weight, n = steps.float(), steps.sum().clamp_min(1)
        probe = F.cross_entropy(logits.flatten(0, 1), torch.where(steps, target, IGNORE).flatten(),
                                ignore_index=IGNORE, reduction="sum") / n
        right = (logits.detach().argmax(-1) == target).float()
        halt = F.binary_cross_entropy_with_logits(self.reasoner.halt(hidden).squeeze(-1), right, reduction="none")
        return probe + (halt * weight).sum() / n

    def _label_index(self, labels: torch.Tensor) -> torch.Tensor:
        """Token-id labels -> positions in the logits; ids outside the output vocabulary are
        not scored by the loss (they still count as wrong answers)."""
        ids = self.reasoner.output_ids
        if ids is None:
            return labels
        lookup = torch.full((self.reasoner.embed.vocab_size,), IGNORE, dtype=torch.long, device=labels.device)
        lookup[ids] = torch.arange(len(ids), device=labels.device)
        return torch.where(labels == IGNORE, labels, lookup[labels.clamp_min(0)])

    def _diagnostics_now(self) -> bool:
        """Whether this training step's values reach the logger (every trainer.log_every_n_steps):
        the diagnostics (gates, gradient norms) are computed and logged only then, since each
        logged value costs a few small kernels and Lightning's bookkeeping on every step."""
        try:
            return bool(self.trainer._logger_connector.should_update_logs)
        except (AttributeError, RuntimeError, NotImplementedError):  # no trainer, or another Lightning
            return True

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.rl is not None:
            return self._rl_step(batch)
        diagnostics = self._diagnostics_now()
        probe = diagnostics and not self._uses_graphs(batch)  # a captured graph runs no Python hooks
        self.grad_probe = [] if probe else None
        self.reasoner.input_grad_hook = self.grad_probe.append if probe else None
        loss, acc, _ = self._forward(batch)
        self.reasoner.input_grad_hook = None
        self._loss = loss.detach()
        b = batch["tokens"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/answer_acc", acc, prog_bar=True, batch_size=b)
        if self.step_acc is not None:
            self.log("train/step_acc", self.step_acc, batch_size=b)
        if self.set_found is not None:
            self.log("train/set_recall", self.set_recall(), batch_size=b)
            self.log("train/set_exact", self.set_recall(exact=True), batch_size=b)
        if self.halt_loss is not None:
            self.log("train/halt_loss", self.halt_loss, batch_size=b)
        if self.evidence_mass is not None:
            self.log("train/evidence_mass", self.evidence_mass, batch_size=b)
        if diagnostics:
            if self.reasoner.feedback is not None:
                self.log("train/feedback_gate", self.reasoner.feedback.openness(), batch_size=b)
            gates = torch.stack([torch.tanh(blk.xattn.gate.detach()) for blk in self.reasoner.blocks])
            self.log("train/xattn_gate", gates.mean(), batch_size=b)
        return loss

    # -- reinforcement learning (objective: rl) -------------------------------------------------
    def reference(self) -> Reasoner:
        """The frozen reference policy: the reasoner as RL started (or as the checkpoint being
        resumed recorded it), with the same output vocabulary."""
        if self._reference is None:
            ref = copy.deepcopy(self.reasoner).requires_grad_(False).eval()
            ref.load_state_dict(self._reference_state)
            object.__setattr__(self, "_reference", ref)  # not a submodule: out of state dicts and optimizers
        return self._reference

    def _rl_step(self, batch: dict) -> torch.Tensor:
        """Sample G answers per question, reward them with the task's score, and return the
        group-relative policy-gradient loss plus the KL penalty (see split_model/training/rl.py)."""
        cfg, r = self.rl, self.reasoner
        g, b = cfg.group_size, batch["mem_states"].shape[0]
        tok, fmt = self.memory.tokenizer, self.formatter
        states, mask = repeat_memory(batch["mem_states"], batch["mem_mask"], g)
        mem = r.encode_memory(states, mask)
        k, budget = fmt.default_latent, self.answer_budget()
        sampling = cfg.sampling(self.global_step, self.global_rank)
        fed = None
        if cfg.feedback_noise > 0:
            ids, fed = noisy_rollout(r, mem, k, budget, tok.bos_id, tok.eos_id, sampling,
                                     cfg.feedback_noise)
        else:
            with torch.no_grad():
                n_latent = torch.full((b * g,), k, dtype=torch.long, device=mask.device)
                ids = r.generate(mem, n_latent, tok.bos_id, tok.eos_id, budget, sampling=sampling,
                                 decoder=self._decoder_kind())
        examples = [e for e in batch["examples"] for _ in range(g)]
        rewards = torch.tensor([float(self.task.score(fmt.answer_from(x), e)) for x, e in zip(ids, examples)],
                               device=mask.device).view(b, g)
        adv = group_advantages(rewards, cfg.scale_by_std).flatten()  # (B*G,)
        tokens, latent, chosen = sampled_sequences(ids, k, budget, tok.bos_id, tok.eos_id, tok.pad_id, mask.device)
        actions = self._label_index(chosen)
        taken = actions != IGNORE  # (B*G, T)
        n_actions = taken.sum().clamp_min(1)
        ref = self.reference()
        if fed is not None:
            fed = fed[:, : tokens.shape[1]]
            logits, logdens = feedback_log_density(r, tokens, latent, mem, fed, cfg.feedback_noise)
            used = taken.flip(1).cumsum(1).flip(1) > 0  # positions up to each row's last action
            with torch.no_grad():
                ref_logits, _ = feedback_log_density(ref, tokens, latent, ref.encode_memory(states, mask), fed, 1.0)
        else:
            logits = r(tokens, latent, mem, self.hparams.bptt_steps)
            with torch.no_grad():
                ref_logits = ref(tokens, latent, ref.encode_memory(states, mask))
        logp = action_log_probs(logits, actions, cfg.temperature)
        ref_logp = action_log_probs(ref_logits, actions, cfg.temperature)
        policy = -(adv[:, None] * logp).sum() / n_actions  # token-level mean over the batch
        if fed is not None:
            policy = policy - (adv[:, None] * logdens * used).sum() / n_actions
        kl = k3_kl(logp, ref_logp, taken)
        loss = policy + cfg.kl_weight * kl
        self._loss = loss.detach()
        group_std = rewards.std(dim=1, unbiased=False)
        log = dict(batch_size=b)
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/reward", rewards.mean(), prog_bar=True, **log)
        self.log("train/reward_std", group_std.mean(), **log)
        self.log("train/kl", kl, prog_bar=True, **log)
        self.log("train/answer_tokens", taken.sum(1).float().mean(), **log)
        if r.feedback is not None:
            self.log("train/feedback_gate", r.feedback.openness(), **log)
        return loss

    def on_after_backward(self) -> None:
        """Gradient norm of the steps' inputs by window of positions (bptt_steps wide, else 4):
        train/grad_norm_depth_W is the window starting at position W."""
        if not self.grad_probe:
            return
        per_step = torch.stack(self.grad_probe).sum(0).pow(2).sum((0, 2))  # (T,) squared norms
        self.grad_probe = None
        width = self.hparams.bptt_steps or 4
        for start in range(0, per_step.shape[0], width):
            self.log(f"train/grad_norm_depth_{start}", per_step[start : start + width].sum().sqrt())

    def on_before_optimizer_step(self, optimizer) -> None:
        """Checks the step's loss and gradients (see `nonfinite`) and logs the gradient norm
        before clipping (Lightning clips after this hook)."""
        diagnostics, check = self._diagnostics_now(), self.hparams.nonfinite != "off"
        if not (diagnostics or check):
            return
        grads = [p.grad.detach() for p in self.reasoner.parameters() if p.grad is not None]
        norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(())
        if check:
            loss = self._loss if self._loss is not None else torch.zeros((), device=norm.device)
            if not bool(torch.isfinite(loss) & torch.isfinite(norm)):  # one host read per step
                self._nonfinite(optimizer, float(loss), float(norm))
                return
        if diagnostics and grads:
            self.log("train/grad_norm", norm)

    def _nonfinite(self, optimizer, loss: float, grad_norm: float) -> None:
        """A NaN/inf loss or gradient at this step: stop before the update, or skip it."""
        step = self.trainer.global_step
        what = f"loss {loss}, gradient norm {grad_norm}"
        if self.hparams.nonfinite == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the optimizer leaves parameters without gradients untouched
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            rank_zero_warn(f"skipped the batch of optimizer step {step}: {what}")
            return
        kept = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"non-finite values at optimizer step {step} (epoch {self.current_epoch}): {what}. Training stopped "
            f"before this step changed the weights; the last checkpoint is kept: {kept}. Lower the learning rate, "
            "clip gradients (trainer.gradient_clip_val), or set model.nonfinite: skip to skip such batches.")

    def _eval_step(self, batch: dict, prefix: str) -> None:
        loss, acc, mem = self._forward(batch)  # no graphs in evaluation (no grad): mem is set
        b = batch["tokens"].shape[0]
        if self.training_mode == "jacobi" and self.reasoner.feedback is not None:
            self.log(f"{prefix}/jacobi_gap", self.jacobi_gap(batch, mem), batch_size=b, sync_dist=True)
        preds = self.predict_answers(batch, mem)
        score = sum(self.task.score(p, e) for p, e in zip(preds, batch["examples"])) / b
        latent = self.reasoner.last_latent_steps if self.reasoner.halt is not None else None
        if latent is not None:  # how long the rows thought before answering
            self.log(f"{prefix}/latent_steps_used", latent.float().mean(), batch_size=b, sync_dist=True)
        if prefix == "test" and self._report is not None:
            used = latent.tolist() if latent is not None else [self.formatter.default_latent] * b
            self._report.add(list(batch["examples"]), preds, used, self.last_written)
        oracle = score
        if bool((batch["n_latent"] != self.formatter.default_latent).any()):  # gold chains of other lengths
            preds = self.predict_answers(batch, mem, oracle=True)
            oracle = sum(self.task.score(p, e) for p, e in zip(preds, batch["examples"])) / b
        self.log(f"{prefix}/accuracy_oracle", oracle, batch_size=b, sync_dist=True)
        self.log(f"{prefix}/loss", loss, batch_size=b, sync_dist=True)
        self.log(f"{prefix}/answer_acc_teacher_forced", acc, batch_size=b, sync_dist=True)
        if self.step_acc is not None:
            self.log(f"{prefix}/step_acc_teacher_forced", self.step_acc, batch_size=b, sync_dist=True)
        if self.set_found is not None:
            self.log(f"{prefix}/set_recall_teacher_forced", self.set_recall(), batch_size=b, sync_dist=True)
            self.log(f"{prefix}/set_exact_teacher_forced", self.set_recall(exact=True), batch_size=b, sync_dist=True)
            for k, value in self.set_recall(by_step=True).items():  # where a search stops growing right
                self.log(f"{prefix}/set_recall_step{k}", value, batch_size=b, sync_dist=True)
            for k, value in self.set_recall(by_step=True, exact=True).items():
                self.log(f"{prefix}/set_exact_step{k}", value, batch_size=b, sync_dist=True)
        if self.halt_loss is not None:
            self.log(f"{prefix}/halt_loss", self.halt_loss, batch_size=b, sync_dist=True)
        if self.evidence_mass is not None:
            self.log(f"{prefix}/evidence_mass", self.evidence_mass, batch_size=b, sync_dist=True)
        self.log(f"{prefix}/accuracy", score, prog_bar=True, batch_size=b, sync_dist=True)

    def jacobi_gap(self, batch: dict, mem) -> torch.Tensor:
        """||jacobi logits - exact logits|| / ||exact logits|| over the scored positions."""
        exact = self.reasoner(batch["tokens"], batch["latent"], mem)
        approx = self.reasoner.forward_jacobi(batch["tokens"], batch["latent"], mem, self.jacobi_passes)
        scored = (batch["labels"] != IGNORE)[..., None]
        return ((approx - exact) * scored).norm() / (exact * scored).norm().clamp_min(1e-12)

    def on_test_epoch_start(self) -> None:
        self._report = TestReport(self.task)

    def on_test_epoch_end(self) -> None:
        """predictions.jsonl and summary.json in the run's log directory, and a markdown table."""
        report, self._report = self._report, None
        if report is None:
            return
        trainer = self.trainer
        directory = trainer.log_dir or trainer.default_root_dir
        summary = report.write(directory, trainer.global_rank, trainer.world_size)
        if trainer.is_global_zero:
            print(f"\n{markdown_table(summary)}\n\npredictions and summary written to {directory}", flush=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        mem = self.encode_memory(batch)
        preds = self.predict_answers(batch, mem)
        return [{"question": e.question, "prediction": p, "answer": e.answer, "score": self.task.score(p, e)}
                for p, e in zip(preds, batch["examples"])]

    def predict_answers(self, batch: dict, mem, oracle: bool = False) -> list[str]:
        """Generated answers to the batch's questions, run as on raw questions: every row takes
        the formatter's default latent count and the token budget is the longest training target
        (both from the train split, kept in checkpoints), or `max_new_tokens`. Nothing comes from
        the rows' own labels, except with `oracle` (a diagnosis: each row's gold latent count and
        a budget from the batch's gold targets; logged as accuracy_oracle)."""
        if oracle:
            budget = self.hparams.max_new_tokens or int((batch["labels"] != IGNORE).sum(1).max()) + 2
            return self._answers(mem, batch["n_latent"], budget)
        n_latent = torch.full_like(batch["n_latent"], self.formatter.default_latent)
        return self._answers(mem, n_latent, self.answer_budget())

    def answer_budget(self) -> int:
        """Tokens a raw question may be answered with: `max_new_tokens`, else the longest target
        of the train split + 2."""
        return self.hparams.max_new_tokens or (self.formatter.max_target or FALLBACK_BUDGET) + 2

    def _answers(self, mem, n_latent: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
                 on_token=None) -> list[str]:
        """Generation after n_latent (B,) latent steps (greedy unless sampling), decoded to answers."""
        tok = self.memory.tokenizer
        ids = self.reasoner.generate(mem, n_latent, tok.bos_id, tok.eos_id, max_new_tokens, sampling=sampling,
                                     decoder=self._decoder_kind(), on_token=on_token)
        self.last_written = [len(x) + (len(x) < max_new_tokens) for x in ids]  # + the eos, when one was written
        return [self.formatter.answer_from(x) for x in ids]

    def _decoder_kind(self) -> str:
        return {"auto": "graphs", "compiled": "compiled", "static": "static", "dynamic": "dynamic"}[self.hparams.execution]

    @torch.no_grad()
    def generate(self, questions: list[str], n_latent: int = 0, max_new_tokens: int = 64,
                 sampling: Sampling | None = None, on_token=None) -> list[str]:
        """Answers to raw questions, in one batch: the memory reads them all in one pass, the
        reasoner takes n_latent latent steps, then writes until eos. on_token(ids, writing)
        streams each step's ids (see Reasoner.generate)."""
        if self.formatter is None:
            raise RuntimeError("no output format known: load the model with load_checkpoint()")
        states = self.memory.encode_texts(questions)
        device = self.reasoner.latent_input.device
        mem = self.encode_memory({"mem_states": states.states.to(device), "mem_mask": states.mask.to(device)})
        n = torch.full((len(questions),), n_latent, dtype=torch.long, device=device)
        return self._answers(mem, n, max_new_tokens, sampling, on_token)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        fmt = self.formatter.spec if self.formatter is not None else self._format_spec
        if fmt is None:
            raise RuntimeError("cannot checkpoint a model that has no output format: connect it to its data "
                               "(TaskDataModule.connect(model), or train with datamodule=TaskDataModule(...))")
        checkpoint[CKPT_KEY] = {
            "memory_spec": self.memory.spec, "fingerprint": self.memory.fingerprint,
            "reasoner": asdict(self.reasoner.cfg),
            "format": fmt,
            "output_ids": None if self.reasoner.output_ids is None else self.reasoner.output_ids.tolist(),
            "embed_ids": None if (kept := self.reasoner.embed.kept_ids()) is None else kept.tolist(),
        }
        # Lightning reads `ckpt_path` with torch.load(weights_only=True), which refuses pickled
        # classes: keep the hyperparameters plain data, as LightningCLI already does.
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict):
            for key, kind in (("reasoner", ReasonerConfig), ("rl", RLConfig)):
                if isinstance(hp.get(key), kind):
                    hp[key] = asdict(hp[key])
        if self._reference_state is not None:  # a resumed RL run keeps its reference policy
            checkpoint[RL_REFERENCE_KEY] = self._reference_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get(CKPT_KEY)
        if info is None:
            raise ValueError("not a split_model checkpoint: it has no backbone fingerprint")
        check_fingerprint(info, self.memory)
        if self.rl is not None and RL_REFERENCE_KEY in checkpoint:
            self._reference_state, self._reference = checkpoint[RL_REFERENCE_KEY], None
        self._format_spec = info.get("format")
        emb = self.reasoner.embed
        if info.get("embed_ids") is not None:  # the table holds these ids' rows (and the shared one)
            emb.keep(info["embed_ids"])
        elif emb.rows is not None:  # resuming a whole-table run: its optimizer moments of the table shrink too
            for optimizer in checkpoint.get("optimizer_states", []):
                for state in optimizer.get("state", {}).values():
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.shape == (emb.vocab_size, emb.table.shape[1]):
                            state[key] = emb.reduce(value)
        self.reasoner.set_output_vocab(info.get("output_ids"))
        fmt, formatter = self._format_spec or {}, self.formatter
        if formatter is not None and not formatter.from_train:  # validate/test without the train split
            for key in ("default_latent", "max_target"):
                if fmt.get(key) is not None:
                    setattr(formatter, key, fmt[key])


def check_fingerprint(info: dict, memory: HFMemory) -> None:
    if info["fingerprint"] != memory.fingerprint:
        raise ValueError(
            f"backbone mismatch: the checkpoint was trained on memory {info['memory_spec']} with fingerprint "
            f"{info['fingerprint'][:16]}..., but the given backbone's fingerprint is {memory.fingerprint[:16]}.... "
            "A reasoner only reads the states of the backbone it was trained with."
        )


def check_rl_settings(rl: RLConfig, reasoner: ReasonerConfig, training_mode: str, store: str | None) -> None:
    """What objective rl refuses, with what to change."""
    if training_mode != "sequential":
        raise ValueError(f"objective rl samples and scores answers with the exact recurrence: set training_mode "
                         f"sequential (it is {training_mode!r}); Jacobi and off passes are for supervised training")
    if store is not None or reasoner.retrieval_k:
        raise ValueError("objective rl does not support retrieval yet: drop model.store and reasoner.retrieval_k")
    if reasoner.halting:
        raise ValueError("objective rl runs a fixed number of latent steps: set reasoner.halting false")
    if rl.trainable == "feedback_only" and reasoner.feedback == "none":
        raise ValueError("rl.trainable feedback_only trains the feedback path, and reasoner.feedback is none: "
                         "set feedback last or all (the gate starts closed, so the policy starts unchanged)")
    if rl.feedback_noise > 0 and reasoner.feedback == "none":
        raise ValueError("rl.feedback_noise explores the fed-back vectors: set reasoner.feedback last or all")


def open_store(path: str | None, memory: HFMemory, k: int):
    """The retrieval store at `path` (checked against the backbone), or None without retrieval."""
    if k and path is None:
        raise ValueError("reasoner.retrieval_k > 0 needs a retrieval store: set model.store to a directory written "
                         "by `split-model index` with this memory backbone")
    if path is None:
        return None
    if not k:
        raise ValueError(f"model.store={path} is set but reasoner.retrieval_k is 0: set retrieval_k (chunks per "
                         "query) to use the store, or drop model.store")
    from split_model.retrieval.store import RetrievalStore

    return RetrievalStore.open(path, memory)


def read_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """The contents of a split_model checkpoint (tensors and plain data only), or a clear error:
    no file, not a complete torch checkpoint, a pickled object, not written by split_model, or
    lacking what decoding its answers needs."""
    import pathlib
    import re
    import zipfile

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read checkpoint {path}: it is not a complete torch checkpoint (a .ckpt file written "
                         "by `split-model fit` is a zip archive; this file is another kind, or cut short)")
    try:  # weights_only: tensors and plain data only; a pickled object is refused, never run
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged, foreign or unsafe files
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = (f"it holds a pickled {unsafe.group(1)}, which is refused (a split_model checkpoint holds only "
                  "tensors and plain data)" if unsafe else " ".join(str(e).split())[:300])
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from e
    info = ckpt.get(CKPT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a split_model checkpoint (no '{CKPT_KEY}' entry)")
    missing = [k for k in ("memory_spec", "fingerprint", "reasoner", "format") if not info.get(k)]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: without them its answers cannot be "
                         "decoded as it was trained; retrain, or save it from a model connected to its data")
    return ckpt


def load_checkpoint(path: str, memory: HFMemory | None = None, map_location: str = "cpu",
                    store: str | None = None) -> SplitModelModule:
    """A trained model from a checkpoint; the backbone is rebuilt from its spec unless given,
    and a retrieving model opens the store it was trained with unless `store` names another.

    Refuses a file that is not a split_model checkpoint and a backbone whose fingerprint differs.
    """
    ckpt = read_checkpoint(path, map_location)
    info = ckpt[CKPT_KEY]
    memory = memory or HFMemory(**info["memory_spec"])
    hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in _HPARAMS}
    if store is not None:
        hp["store"] = store
    module = SplitModelModule(memory=memory, **{**hp, "reasoner": ReasonerConfig(**info["reasoner"])})
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    module.formatter = Formatter(memory.tokenizer, **info["format"])
    return module.eval()


RL_REFERENCE_KEY = "split_model_rl_reference"  # checkpoint entry: the reference policy's weights
_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "feedback", "embed_rank", "halting", "retrieval_k")
_RENAMED = {"reasoner.latent": "reasoner.latent_input"}  # old state-dict key -> new
TABLE_KEY = "reasoner.embed.table"
_NO_DECAY = {"gate", "token_gate", "position", "latent", "embed", "norm", "norm1", "norm2", "norm3", "mix"}  # name parts
_HPARAMS = ("bptt_steps", "lr", "weight_decay", "warmup_steps", "max_new_tokens", "output_vocab", "execution",
            "matmul_precision", "training_mode", "jacobi_passes", "halting_weight", "nonfinite", "store",
            "retrieval_loss", "retrieval_negatives", "retrieval_teacher", "retrieval_pick_loss", "exclude_question")
TRAINING_MODES = ("sequential", "jacobi", "off")
