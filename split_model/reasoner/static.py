"""Fixed-shape execution of the reasoner: preallocated KV caches written in place.

The dynamic path (`Reasoner.step`, `Reasoner.forward_dynamic`) grows its self-attention
cache by concatenation, so every step allocates, changes shapes and, under autograd, keeps
a copy of the whole cache per step (memory grows with T^2). Here every tensor a step
touches has one shape for the whole sequence:

- the self-attention K/V of each block live in a (B, H, T_max, dh) buffer written in place
  at the step's position; a step attends to every slot with the future ones masked;
- rotary angles and step-position features come from precomputed tables;
- in generation the position is a 0-dim device tensor advanced in place, so a step runs
  with no host synchronisation and can be captured once as a CUDA graph and replayed.

Training keeps the in-place buffer too. `CachedAttention` is an autograd function that
saves only its query: its backward recomputes the attention weights from the buffer and
adds dK/dV into a shared gradient buffer, so memory grows with T, not T^2.
`MemoryAttention` keeps each step's attention weights over the memory and computes the
memory K/V gradients of all steps in one matmul at the end. Every such node takes an
`order` tensor produced by the node before it; autograd therefore runs the backward of
step t only after the backward of every later step, which is when those sums are complete.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from split_model.reasoner.fused import RotaryFn, SwiGLUFn, rms_norm
from split_model.reasoner.layers import Block, MemoryKV, rotary_angles, sinusoid


class PositionTables:
    """Rotary cos/sin (T, dh/2) and step-position sinusoid features (T, d) for T positions.

    Built by the functions the dynamic path uses (layers.py), so a table row is bitwise what
    it computes for that position.
    """

    def __init__(self, n: int, head_dim: int, d_model: int, rope_base: float, device):
        self.cos, self.sin = rotary_angles(0, n, head_dim, rope_base, device)  # (T, dh/2) each
        self.features = sinusoid(torch.arange(n, device=device), d_model)  # (T, d)
        self.length = n


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on interleaved pairs: x (B, H, T, dh), cos/sin (T, dh/2) of x's positions."""
    return RotaryFn.apply(x, cos, sin)


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, dh), k (B, H, N, dh), additive bias (0 or -inf) broadcastable to
    (B, H, 1, N) -> softmax weights (B, H, 1, N)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias).softmax(-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one query as plain matmuls -> (B, H, 1, dh). Several times faster on
    CPU than the fused kernels, whose per-call setup dominates at these sizes."""
    return attention_weights(q, k, bias) @ v


def memory_bias(memory: MemoryKV) -> torch.Tensor:
    """(B, 1, 1, N) additive mask: 0 on real memory tokens, -inf on padding."""
    zero = torch.zeros((), dtype=memory.kv[0][0].dtype, device=memory.mask.device)
    return torch.where(memory.mask, zero, float("-inf"))


def causal_bias(t: int, like: torch.Tensor) -> torch.Tensor:
    """(T, T) additive masks: row t is 0 on slots 0..t and -inf after."""
    return like.new_full((t, t), float("-inf")).triu(1)


class StepKV:
    """Self-attention K/V of one block for T_max steps, and their gradient sums."""

    def __init__(self, b: int, h: int, dh: int, causal: torch.Tensor):
        t = causal.shape[0]
        self.k = causal.new_zeros(b, h, t, dh)  # zeros, not empty: masked slots meet p = 0, and 0 * nan = nan
        self.v = causal.new_zeros(b, h, t, dh)
        self.causal = causal  # (T, T), shared by the blocks
        self.dk: torch.Tensor | None = None
        self.dv: torch.Tensor | None = None


class MemoryReads:
    """What every step of one block read from the memory, kept for one batched backward.

    dK = sum_t ds_t^T q_t and dV = sum_t p_t^T dy_t are one matmul each over all T steps;
    summed step by step they would rewrite the whole (B, H, N, dh) gradient T times, which
    is what bounds a long memory's backward on a CPU.
    """

    def __init__(self, b: int, h: int, steps: int, n: int, dh: int, like: torch.Tensor):
        self.p = like.new_empty(b, h, steps, n)  # attention weights of each step
        self.q = like.new_empty(b, h, steps, dh)  # each step's (unscaled) query
        self.ds: torch.Tensor | None = None  # d(scores), filled by backward
        self.dy: torch.Tensor | None = None  # d(output), filled by backward


class CachedAttention(torch.autograd.Function):
    """Step t's query attends to slots 0..t of a StepKV after writing its own k, v at t.

    Args of forward: q, k, v (B, H, 1, dh); order (0-dim, threads the steps for backward);
    kv the StepKV; t the step; floor the first step whose keys receive gradient from this
    step (truncated backprop through time: keys before the window are constants).
    Returns the attention output (B, H, 1, dh) and the next node's `order`.
    """

    @staticmethod
    def forward(ctx, q, k, v, order, kv: StepKV, t: int, floor: int):
        kv.k[:, :, t] = k[:, :, 0]
        kv.v[:, :, t] = v[:, :, 0]
        ctx.save_for_backward(q)
        ctx.kv, ctx.t, ctx.floor = kv, t, floor  # the buffer itself: saving it would copy-check versions
        return attend(q, kv.k, kv.v, kv.causal[t]), order.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dorder):
        (q,) = ctx.saved_tensors
        kv, t = ctx.kv, ctx.t
        if kv.dk is None:
            kv.dk, kv.dv = torch.zeros_like(kv.k), torch.zeros_like(kv.v)
        live = slice(ctx.floor, t + 1)  # keys inside this step's BPTT window get gradient
        p = attention_weights(q, kv.k, kv.causal[t])  # recomputed: keeping it would cost O(T) per step
        dq = _attend_backward(p, q, kv.k, kv.v, dy, kv.dk, kv.dv, live)
        # Every later step has run its backward (see `order`): slot t is complete.
        dk, dv = kv.dk[:, :, t : t + 1].clone(), kv.dv[:, :, t : t + 1].clone()
        return dq, dk, dv, dy.new_zeros(()), None, None, None


class MemoryAttention(torch.autograd.Function):
    """Step t's query (B, H, 1, dh) attends to the memory K/V (B, H, N, dh) shared by all steps.

    Backward returns dq at every step but dK/dV only at step 0, whose node runs last (see
    `order`): by then every step has left its weights and gradients in `reads`.
    """

    @staticmethod
    def forward(ctx, q, k, v, order, bias, reads: MemoryReads, t: int):
        p = attention_weights(q, k, bias)  # (B, H, 1, N)
        reads.p[:, :, t : t + 1] = p
        reads.q[:, :, t : t + 1] = q
        ctx.save_for_backward(k, v)
        ctx.reads, ctx.t = reads, t
        return p @ v, order.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dorder):
        k, v = ctx.saved_tensors
        r, t = ctx.reads, ctx.t
        scale = k.shape[-1] ** -0.5
        if r.ds is None:  # zeros: a step whose backward never runs contributes nothing
            r.ds, r.dy = torch.zeros_like(r.p), torch.zeros_like(r.q)
        ds = _score_grad(r.p[:, :, t : t + 1], v, dy)
        r.ds[:, :, t : t + 1] = ds
        r.dy[:, :, t : t + 1] = dy
        dq = (ds @ k) * scale
        if t:
            return dq, None, None, dy.new_zeros(()), None, None, None
        dk = (r.ds.transpose(-1, -2) @ r.q) * scale  # (B, H, N, T) @ (B, H, T, dh): every step at once
        dv = r.p.transpose(-1, -2) @ r.dy
        return dq, dk, dv, dy.new_zeros(()), None, None, None


def _score_grad(p: torch.Tensor, v: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of the (pre-softmax) scores of one query: p (B, H, 1, N), v (B, H, N, dh),
    dy (B, H, 1, dh) the gradient of the attention output -> (B, H, 1, N)."""
    dp = dy @ v.transpose(-1, -2)
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def _attend_backward(p, q, k, v, dy, dk, dv, live: slice) -> torch.Tensor:
    """Backward of `attend` for one query with weights p (B, H, 1, N): returns dq; adds
    into dk, dv at slots `live`."""
    scale = q.shape[-1] ** -0.5
    ds = _score_grad(p, v, dy)
    # Outer products as broadcast multiply-adds: a batched matmul with an inner size of 1 is slow on CPU.
    dk[:, :, live].addcmul_(ds[..., live].transpose(-1, -2), q, value=scale)
    dv[:, :, live].addcmul_(p[..., live].transpose(-1, -2), dy)
    return (ds @ k) * scale  # every key counts for the query, detached or not


def qkv_step(blk: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated q, k and v of one step: x (B, 1, d) -> each (B, H, 1, dh)."""
    a = blk.attn
    qkv = a.qkv(rms_norm(blk.norm1, x)).view(x.shape[0], 1, 3, a.h, a.dh).permute(2, 0, 3, 1, 4)  # (3, B, H, 1, dh)
    q, k = rotate(qkv[:2], cos, sin)  # both in one pass
    return q, k, qkv[2]


def memory_query(blk: Block, x: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual after self-attention, and the cross-attention query: x (B, 1, d) -> x, q (B, H, 1, dh)."""
    b = x.shape[0]
    x = x + blk.attn.out(attn_out.transpose(1, 2).reshape(b, 1, -1))
    return x, blk.xattn.q(rms_norm(blk.norm2, x)).view(b, 1, blk.xattn.h, blk.xattn.dh).transpose(1, 2)


def block_finish(blk: Block, x: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """Gated cross-attention residual and MLP: x (B, 1, d), read (B, H, 1, dh) -> (B, 1, d)."""
    x = x + torch.tanh(blk.xattn.gate) * blk.xattn.out(read.transpose(1, 2).reshape(x.shape[0], 1, -1))
    return x + blk.mlp.down(SwiGLUFn.apply(blk.mlp.up(rms_norm(blk.norm3, x))))


class StaticDecoder:
    """Generation with fixed shapes: `step` updates this object's buffers in place.

    Nothing in `step` reads a tensor value on the host or allocates a differently shaped
    tensor, so on CUDA the whole step can be captured once and replayed (see graphs.py).
    """

    def __init__(self, reasoner, memory: MemoryKV, max_steps: int):
        cfg = reasoner.cfg
        like = memory.kv[0][0]
        b = like.shape[0]
        self.reasoner, self.memory, self.max_steps = reasoner, memory, max_steps
        self.bias = memory_bias(memory)
        self.tables = reasoner.position_tables(max_steps, like.device)
        causal = causal_bias(max_steps, like)
        self.kv = [StepKV(b, cfg.n_heads, cfg.head_dim, causal) for _ in range(cfg.n_layers)]
        self.layer_states = like.new_zeros(cfg.n_layers + 1, b, 1, cfg.d_model)  # what step 0 reads: masked out
        self.pos = torch.zeros((), dtype=torch.long, device=like.device)

    def reset(self) -> None:
        """Back to step 0 (the buffers' old contents are masked out or overwritten)."""
        self.pos.zero_()
        self.layer_states.zero_()

    def step(self, tokens: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """tokens, latent: (B,) -> logits (B, V or K); advances the position by one."""
        r, pos = self.reasoner, self.pos.view(1)
        feats = self.tables.features.index_select(0, pos)  # (1, d)
        x = (torch.where(latent[:, None], r.latent_input, r.embed(tokens)) + r.position.proj(feats))[:, None]  # (B, 1, d)
        if r.feedback is not None:
            # Step 0 has no predecessor: zero states would still feed back feedback_tokens'
            # uniform distribution, so the feedback is masked there (a tensor op, no host sync).
            x = x + r.feedback(self.layer_states) * (self.pos > 0).to(x.dtype)
        cos, sin = self.tables.cos.index_select(0, pos), self.tables.sin.index_select(0, pos)
        causal = self.kv[0].causal.index_select(0, pos)  # (1, T_max): slots after this step masked
        layer_states = [x]
        for blk, kv, (mem_k, mem_v) in zip(r.blocks, self.kv, self.memory.kv):
            q, k, v = qkv_step(blk, x, cos, sin)
            kv.k.index_copy_(2, pos, k)
            kv.v.index_copy_(2, pos, v)
            x, q = memory_query(blk, x, attend(q, kv.k, kv.v, causal))
            x = block_finish(blk, x, attend(q, mem_k, mem_v, self.bias))
            layer_states.append(x)
        self.layer_states.copy_(torch.stack(layer_states))
        self.pos.add_(1)
        self.hidden = rms_norm(r.norm, x[:, 0])  # (B, d); under a graph, the captured buffer
        return r.logits(self.hidden)


class _Unroll:
    """The training recurrence over T steps: fixed-shape buffers and the `order` chain."""

    def __init__(self, reasoner, memory: MemoryKV, batch: int, steps: int):
        cfg, like = reasoner.cfg, memory.kv[0][0]
        self.r, self.memory, self.bias = reasoner, memory, memory_bias(memory)
        causal = causal_bias(steps, like)
        self.kv = [StepKV(batch, cfg.n_heads, cfg.head_dim, causal) for _ in range(cfg.n_layers)]
        n = memory.mask.shape[-1]
        self.reads = [MemoryReads(batch, cfg.n_heads, steps, n, cfg.head_dim, like) for _ in range(cfg.n_layers)]
        self.order = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=torch.is_grad_enabled())

    def step(self, x: torch.Tensor, t: int, floor: int, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 1, d): step t's input -> every layer's output [(B, 1, d)] * (L+1)."""
        layer_states = [x]
        for blk, kv, (mem_k, mem_v), reads in zip(self.r.blocks, self.kv, self.memory.kv, self.reads):
            q, k, v = qkv_step(blk, x, cos, sin)
            y, self.order = CachedAttention.apply(q, k, v, self.order, kv, t, floor)
            x, q = memory_query(blk, x, y)
            y, self.order = MemoryAttention.apply(q, mem_k, mem_v, self.order, self.bias, reads, t)
            x = block_finish(blk, x, y)
            layer_states.append(x)
        return layer_states


def static_forward(reasoner, embedded: torch.Tensor, latent: torch.Tensor, memory: MemoryKV,
                   bptt_steps: int | None = None) -> torch.Tensor:
    """Training over a whole sequence with fixed shapes: token embeddings (B, T, d) and
    latent flags (B, T) -> final hidden states (B, T, d).

    Computes what the dynamic recurrence computes (values and gradients, truncation
    included). The inputs and step positions of all T steps are done in one pass.
    """
    r = reasoner
    b, steps = latent.shape
    tables = r.position_tables(steps, latent.device)
    x_in = torch.where(latent[..., None], r.latent_input, embedded) + r.position.proj(tables.features[:steps])  # (B, T, d)
    r.probe_inputs(x_in)
    unroll = _Unroll(r, memory, b, steps)
    fed_back, hiddens, floor = None, [], 0
    for t in range(steps):
        if bptt_steps and t and t % bptt_steps == 0:
            floor = t  # truncated backprop: nothing before step t gets gradient from here on
            fed_back = None if fed_back is None else fed_back.detach()
        x = x_in[:, t : t + 1]
        if fed_back is not None:
            x = x + r.feedback(fed_back)
        layer_states = unroll.step(x, t, floor, tables.cos[t : t + 1], tables.sin[t : t + 1])
        if r.feedback is not None:
            fed_back = torch.stack(layer_states)  # (L+1, B, 1, d)
        hiddens.append(layer_states[-1])
    return rms_norm(r.norm, torch.cat(hiddens, dim=1))
