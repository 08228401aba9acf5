"""Training: example formatting, the data module, the LightningModule and curricula."""

from split_model.training.curriculum import Curriculum, Stage
from split_model.training.data import TaskDataModule, TaskDataset, collate
from split_model.training.format import Formatter, StepsMode
from split_model.training.module import SplitModelModule, load_checkpoint

__all__ = ["Curriculum", "Stage", "TaskDataModule", "TaskDataset", "collate", "Formatter", "StepsMode",
           "SplitModelModule", "load_checkpoint"]
