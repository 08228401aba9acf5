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

    With `compile`, the step is first compiled by torch.compile (inductor fuses its small
    elementwise kernels) and the compiled kernels are what the graph captures: fewer launches
    per replay, for a compilation of some seconds per batch and memory shape.
    The logits it returns live in the graph's output buffer: read them before the next step.
    """

    def __init__(self, decoder: StaticDecoder, warmup: int = 2, compile: bool = False):
        b, device = decoder.layer_states.shape[1], decoder.pos.device
        self.decoder = decoder
        step = torch.compile(decoder.step, dynamic=False) if compile else decoder.step
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.latent = torch.zeros(b, dtype=torch.bool, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(warmup):
                step(self.tokens, self.latent)
        torch.cuda.current_stream(device).wait_stream(side)
        decoder.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, self.latent)  # recorded, not run: still at step 0

    @property
    def hidden(self) -> torch.Tensor:
        return self.decoder.hidden  # the tensor the captured step wrote: the graph rewrites it

    def step(self, tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.latent.copy_(latent)
        self.graph.replay()
        return self.logits


def graphed_or_eager(decoder: StaticDecoder, compile: bool = False):
    """The decoder behind a CUDA graph (of the torch.compile'd step with `compile`) when it can
    be captured; else itself, with one warning (after a failure, later calls do not try again)."""
    key = "compiled decoder" if compile else "decoder"
    if key in _warned:
        return graphed_or_eager(decoder) if compile else decoder
    try:
        return GraphedDecoder(decoder, compile=compile)
    except Exception as e:  # capture and compile failures come as many types
        what = "compilation and capture" if compile else "CUDA graph capture"
        warn_once(key, f"{what} of the reasoner step failed ({type(e).__name__}: {e}); generating with the "
                       f"{'graphed' if compile else 'eager fixed-shape'} step instead")
        decoder.reset()
        return graphed_or_eager(decoder) if compile else decoder


class _Unrolled(torch.nn.Module):
    """The whole training forward as one module of tensors in, logits out (what capture needs),
    in one training mode: sequential (the exact recurrence), jacobi (`passes` parallel passes)
    or off (one parallel pass without feedback)."""

    def __init__(self, reasoner, bptt_steps: int | None, mode: str = "sequential", passes: int = 1):
        super().__init__()
        self.reasoner, self.bptt_steps, self.mode, self.passes = reasoner, bptt_steps, mode, passes

    def forward(self, tokens, latent, mem_states, mem_mask):
        memory = self.reasoner.encode_memory(mem_states, mem_mask)
        if self.mode == "off":
            return self.reasoner.forward_off(tokens, latent, memory)
        if self.mode == "jacobi":
            return self.reasoner.forward_jacobi(tokens, latent, memory, self.passes, self.bptt_steps)
        return self.reasoner(tokens, latent, memory, self.bptt_steps)


def pad_batch_shape(tokens, latent, mem_states, mem_mask, rows: int, steps: int, slots: int):
    """Pad a batch to (rows, steps) steps and `slots` memory slots without changing what the
    real rows compute: padded steps come after every real one (causal), padded memory slots
    are masked, and a padded row sees one zero memory slot (all-masked attention is nan)."""
    b, t = tokens.shape
    n = mem_states.shape[1]
    tok = tokens.new_zeros(rows, steps)
    tok[:b, :t] = tokens
    lat = latent.new_zeros(rows, steps)
    lat[:b, :t] = latent
    states = mem_states.new_zeros(rows, slots, *mem_states.shape[2:])
    states[:b, :n] = mem_states
    mask = mem_mask.new_zeros(rows, slots)
    mask[:b, :n] = mem_mask
    mask[b:, 0] = True
    return tok, lat, states, mask


def bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GraphedTraining:
    """Forward and backward of the training recurrence captured as CUDA graphs.

    One graph pair per padded batch shape (steps rounded up to 8, memory slots to 64, rows
    to the largest batch seen) and training mode (sequential, jacobi with its number of
    passes, off: a curriculum that switches modes captures each once), so a training run
    captures a handful of graphs and then only replays. Padded steps come after the real ones,
    which no mode lets them influence; logits of the padded parts are cut off before the loss,
    so they get no gradient. If capture fails, training continues on the eager path after one
    warning.
    """

    def __init__(self, reasoner, bptt_steps: int | None, max_graphs: int = 16):
        self.reasoner, self.bptt_steps = reasoner, bptt_steps
        self.graphs: dict[tuple, torch.nn.Module] = {}
        self.max_graphs, self.rows, self.failed = max_graphs, 0, False
        self.keep_alive: list = []

    def __call__(self, tokens, latent, mem_states, mem_mask, mode: str = "sequential", passes: int = 1) -> torch.Tensor:
        passes = passes if mode == "jacobi" else 1
        eager = _Unrolled(self.reasoner, self.bptt_steps, mode, passes)
        if self.failed or torch.is_autocast_enabled("cuda"):
            return eager(tokens, latent, mem_states, mem_mask)
        b, t = tokens.shape
        self.rows = max(self.rows, b)
        padded = pad_batch_shape(tokens, latent, mem_states, mem_mask, self.rows, bucket(t, 8),
                                 bucket(mem_states.shape[1], 64))
        ids = self.reasoner.output_ids  # a graph reads the tensors it was captured with: a new one needs a new graph
        key = (tuple((x.shape, x.dtype) for x in padded), None if ids is None else ids.data_ptr(), mode, passes)
        graphed = self.graphs.get(key)
        if graphed is None:
            graphed = self._capture(padded, key, eager)
            if graphed is None:
                return eager(tokens, latent, mem_states, mem_mask)
        return graphed(*padded)[:b, :t]

    def _capture(self, padded: tuple, key: tuple, module: _Unrolled):
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        # Built outside the graph's memory pool, and kept alive with it: the graph reads them.
        self.keep_alive.append((self.reasoner.position_tables(padded[0].shape[1], padded[0].device),
                                self.reasoner.output_ids))
        try:  # a module of its own per shape: capture replaces the module's forward
            graphed = torch.cuda.make_graphed_callables(module, padded, allow_unused_input=True)
        except Exception as e:
            self.failed = True
            warn_once("training", f"CUDA graph capture of the training recurrence failed ({e}); training on "
                                  "the eager path instead (model.execution: static skips the attempt)")
            return None
        self.graphs[key] = graphed
        return graphed
