"""Training curricula from the config: stages that change how the reasoner trains.

A stage starts at an optimizer step and can, from then on:
- switch the training mode (`off` -> `sequential` turns feedback on; its gate starts
  closed, so the model computes the same function at the switch), or the Jacobi passes;
- replace the first s written reasoning steps by s * latent_per_step latent steps
  (Coconut's schedule; needs `data.steps: text`);
- sample the number of unlabelled latent steps (`data.latent_steps`) per batch from an
  inclusive range, so the model does not learn one fixed count.

In a config (trainer.callbacks):

    - class_path: split_model.training.Curriculum
      init_args:
        latent_per_step: 2
        stages:
          - {start_step: 0, mode: "off"}
          - {start_step: 500, mode: sequential, replaced_steps: 1}
          - {start_step: 1000, replaced_steps: 2, latent_steps: [0, 8]}

A stage leaves unchanged what it does not name. The stage in force is logged as
train/curriculum_stage; on resume it is recomputed from the global step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from split_model.training.format import IGNORE

_MODES = ("sequential", "jacobi", "off")


@dataclass
class Stage:
    """What changes at `start_step`; None leaves a setting as the stage before had it."""

    start_step: int = 0
    mode: str | None = None  # sequential | jacobi | off
    jacobi_passes: int | None = None
    replaced_steps: int | None = None  # Coconut stage s: written steps replaced by latent steps
    latent_steps: int | list[int] | None = None  # unlabelled latent steps: a count, or [low, high] sampled per batch

    def __post_init__(self):
        where = f"curriculum stage at step {self.start_step}"
        if self.start_step < 0:
            raise ValueError(f"{where}: start_step must be >= 0")
        if self.mode is not None and self.mode not in _MODES:
            raise ValueError(f"{where}: mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.jacobi_passes is not None and self.jacobi_passes < 1:
            raise ValueError(f"{where}: jacobi_passes must be >= 1, got {self.jacobi_passes}")
        if self.replaced_steps is not None and self.replaced_steps < 0:
            raise ValueError(f"{where}: replaced_steps must be >= 0, got {self.replaced_steps}")
        if self.latent_steps is not None:
            low, high = latent_range(self.latent_steps)
            if low < 0 or high < low:
                raise ValueError(f"{where}: latent_steps must be a count >= 0 or [low, high] with 0 <= low <= high, "
                                 f"got {self.latent_steps!r}")


def latent_range(spec: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(spec, int):
        return spec, spec
    if len(spec) != 2:
        raise ValueError(f"latent_steps as a range is [low, high], got {spec!r}")
    return int(spec[0]), int(spec[1])


def resample_latent(batch: dict, old: int, new: int, pad_id: int) -> dict:
    """The batch with its first `old` positions (unlabelled latent steps, as the formatter puts
    them first) replaced by `new` of them; every later position is unchanged."""
    if new == old:
        return batch
    b, device = batch["tokens"].shape[0], batch["tokens"].device

    def lead(value, like):
        return torch.full((b, new), value, dtype=like.dtype, device=device)

    out = dict(batch)
    for key, value in (("tokens", pad_id), ("latent", True), ("labels", IGNORE), ("answer_mask", False)):
        out[key] = torch.cat([lead(value, batch[key]), batch[key][:, old:]], dim=1)
    if "label_sets" in batch:
        sets = batch["label_sets"]
        out["label_sets"] = torch.cat([sets.new_full((b, new, sets.shape[2]), IGNORE), sets[:, old:]], dim=1)
    out["n_latent"] = batch["n_latent"] + (new - old)
    return out


class Curriculum(Callback):
    """Stages of training, applied at their start steps (see the module docstring).

    Args:
        stages: list of stages (start_step, mode, jacobi_passes, replaced_steps, latent_steps).
        latent_per_step: latent steps that replace one written step (Coconut's c).
        seed: seed of the per-batch latent-count draws (with the global step: reproducible on resume).
    """

    def __init__(self, stages: list[Stage | dict], latent_per_step: int = 1, seed: int = 0):
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        if latent_per_step < 1:
            raise ValueError(f"latent_per_step must be >= 1, got {latent_per_step}")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        starts = [s.start_step for s in self.stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"curriculum stages must have increasing start_step values, got {starts}")
        self.latent_per_step, self.seed = latent_per_step, seed
        self.current = -1  # no stage applied yet
        self.latent_spec: tuple[int, int] | None = None
        self._base_latent = 0

    def stage_at(self, step: int) -> int:
        """Index of the stage in force at optimizer step `step` (-1: before the first)."""
        return max((i for i, s in enumerate(self.stages) if s.start_step <= step), default=-1)

    def settings_at(self, index: int) -> dict:
        """The settings stages 0..index add up to (None: as configured)."""
        out = {f.name: None for f in fields(Stage) if f.name != "start_step"}
        for stage in self.stages[: index + 1]:
            out.update({k: v for k, v in asdict(stage).items() if k != "start_step" and v is not None})
        return out

    def on_fit_start(self, trainer, pl_module) -> None:
        fmt = pl_module.formatter
        if fmt is None:
            raise RuntimeError("Curriculum needs the model connected to its data (TaskDataModule.connect)")
        if any(s.replaced_steps for s in self.stages) and fmt.steps != "text":
            raise ValueError(f"curriculum replaced_steps replaces written steps: set data.steps: text (it is {fmt.steps!r})")
        self._base_latent = fmt.latent_steps
        self._configured = (pl_module.hparams.training_mode, pl_module.hparams.jacobi_passes)
        fmt.latent_per_step = self.latent_per_step
        self.current = -1
        self._apply(trainer, pl_module, self.stage_at(trainer.global_step))

    def _apply(self, trainer, module, index: int) -> None:
        now = self.settings_at(index)
        self.current = index
        module.training_mode = now["mode"] or self._configured[0]
        module.jacobi_passes = now["jacobi_passes"] or self._configured[1]
        fmt = module.formatter
        replaced = now["replaced_steps"] or 0
        self.latent_spec = None if now["latent_steps"] is None else latent_range(now["latent_steps"])
        sampled = self.latent_spec is not None and self.latent_spec[0] != self.latent_spec[1]
        fixed = self.latent_spec[0] if self.latent_spec is not None and not sampled else self._base_latent
        if (replaced, fixed) != (fmt.replaced_steps, fmt.latent_steps):
            fmt.replaced_steps, fmt.latent_steps = replaced, fixed
            data = getattr(trainer, "datamodule", None)
            if data is not None and hasattr(data, "reformat"):
                data.reformat()
        if index >= 0:
            s = self.stages[index]
            rank_zero_info(f"curriculum: stage {index} from step {s.start_step}: mode {module.training_mode}"
                           f"{f' ({module.jacobi_passes} passes)' if module.training_mode == 'jacobi' else ''}, "
                           f"{replaced} written steps replaced, latent steps "
                           f"{list(self.latent_spec) if self.latent_spec else fmt.latent_steps}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index = self.stage_at(trainer.global_step)
        if index != self.current:
            self._apply(trainer, pl_module, index)
        pl_module.log("train/curriculum_stage", float(index), batch_size=batch["tokens"].shape[0])
        if self.latent_spec is not None and self.latent_spec[0] != self.latent_spec[1]:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
            new = int(torch.randint(self.latent_spec[0], self.latent_spec[1] + 1, (), generator=gen))
            batch.update(resample_latent(batch, pl_module.formatter.latent_steps, new, pl_module.formatter.tok.pad_id))
