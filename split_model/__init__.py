"""split_model: a small recurrent reasoner with full neuralese feedback that reads a large
frozen memory transformer through cross-attention.

Packages: memory (frozen backbones, state cache), reasoner (the recurrent model), training
(data, LightningModule), tasks (benchmarks), bench (named experiments), cli (`split-model`).
"""

__version__ = "0.1.0"
