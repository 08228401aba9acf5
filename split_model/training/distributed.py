"""Keeping the frozen memory out of DistributedDataParallel.

DDP broadcasts every parameter and buffer from rank 0 when it wraps a module, broadcasts
the buffers again before every forward (`broadcast_buffers=True`, the default), and builds
its gradient buckets from the parameters. The memory backbone is frozen and the same on
every rank (its fingerprint says so), so all of that is traffic and bookkeeping for
nothing: `ignore_frozen_memory` tells DDP to leave it alone.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def ignore_frozen_memory(module: nn.Module, prefix: str = "memory") -> list[str]:
    """Mark every parameter and buffer under `module.<prefix>` as ignored by DDP.

    Call it before DDP wraps `module` (in a LightningModule, from `setup`). Names already
    marked are kept. Returns the names marked here, as DDP spells them.
    """
    head = f"{prefix}."
    params = [(n, p) for n, p in module.named_parameters() if n.startswith(head)]
    buffers = [n for n, _ in module.named_buffers() if n.startswith(head)]
    if not params and not buffers:
        raise ValueError(f"{type(module).__name__} has no parameters or buffers under '{prefix}'; "
                         "pass the attribute that holds the frozen memory as `prefix`")
    trainable = [n for n, p in params if p.requires_grad]
    if trainable:
        # An ignored parameter gets no gradient all-reduce: ranks would silently drift apart.
        raise ValueError(f"{len(trainable)} parameters under '{prefix}' require grad (e.g. {trainable[0]}); "
                         "only a frozen memory may be ignored by DDP")
    names = [n for n, _ in params] + buffers
    already = getattr(module, "_ddp_params_and_buffers_to_ignore", [])
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted({*already, *names}))
    return names
