"""The small recurrent reasoner with neuralese feedback."""

from split_model.reasoner.config import FeedbackMode, ReasonerConfig
from split_model.reasoner.layers import LayerCache, MemoryKV
from split_model.reasoner.model import Reasoner, ReasonerState
from split_model.reasoner.sampling import Sampling
from split_model.reasoner.static import StaticDecoder

__all__ = ["FeedbackMode", "ReasonerConfig", "LayerCache", "MemoryKV", "Reasoner", "ReasonerState", "Sampling",
           "StaticDecoder"]
