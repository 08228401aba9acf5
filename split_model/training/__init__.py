"""Training: example formatting, the data module, the LightningModule, curricula and prediction files."""

from split_model.training.curriculum import Curriculum, Stage
from split_model.training.data import TaskDataModule, TaskDataset, collate
from split_model.training.format import Formatter, StepsMode
from split_model.training.module import SplitModelModule, load_checkpoint
from split_model.training.predictions import PredictionWriter, attach_prediction_writer, save_predictions

__all__ = ["Curriculum", "Stage", "TaskDataModule", "TaskDataset", "collate", "Formatter", "StepsMode",
           "SplitModelModule", "load_checkpoint", "PredictionWriter", "attach_prediction_writer", "save_predictions"]
