"""CUDA graphs for the fixed-shape reasoner: capture once, replay every step.

A small reasoner's step is a hundred tiny kernels; on a GPU their launches, not their
arithmetic, set its speed. The fixed-shape step (static.py) reads and writes only
preallocated buffers and never synchronises with the host, so it can be captured once
per generation and replayed. Capture is chosen at run time, on CUDA only; if it fails on
a user's GPU, the eager fixed-shape step runs instead, after one warning.
"""

from __future__ import annotations

import warnings

import torch

from split_model.reasoner.static import StaticDecoder

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class GraphedDecoder:
    """A StaticDecoder whose `step` replays one captured CUDA graph.

    The logits it returns live in the graph's output buffer: read them before the next step.
    """

    def __init__(self, decoder: StaticDecoder, warmup: int = 2):
        b, device = decoder.states.shape[1], decoder.pos.device
        self.decoder = decoder
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.latent = torch.zeros(b, dtype=torch.bool, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(warmup):
                decoder.step(self.tokens, self.latent)
        torch.cuda.current_stream(device).wait_stream(side)
        decoder.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(self.tokens, self.latent)  # recorded, not run: still at step 0

    def step(self, tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.latent.copy_(latent)
        self.graph.replay()
        return self.logits


def graphed_or_eager(decoder: StaticDecoder):
    """The decoder behind a CUDA graph when it can be captured; else itself, with one warning."""
    try:
        return GraphedDecoder(decoder)
    except Exception as e:  # capture failures come as RuntimeError, CUDA or driver errors alike
        warn_once("decoder", f"CUDA graph capture of the reasoner step failed ({e}); generating with the eager "
                             "fixed-shape step instead (set model.execution: static to skip the attempt)")
        decoder.reset()
        return decoder
