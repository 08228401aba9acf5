"""Hand-written backward passes for the elementwise chains of a reasoner step.

A step of a small reasoner is dozens of tiny elementwise ops, and autograd records each
with its own node and its own backward; for RMSNorm, rotary and the SwiGLU gate, that
bookkeeping costs more than the arithmetic. Each function here is one autograd node with
a closed-form backward. The fixed-shape path (static.py) uses them; the modules in
layers.py compute the same values and stay the reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from split_model.reasoner.layers import rotate_pairs


class RMSNormFn(torch.autograd.Function):
    """x (..., d), weight (d,) -> x / rms(x) * weight."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xhat, rstd, weight = ctx.saved_tensors
        g = dy * weight
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx, (dy * xhat).flatten(0, -2).sum(0), None


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """What the RMSNorm module `norm` computes, as one node."""
    return RMSNormFn.apply(x, norm.weight, norm.eps)


class SwiGLUFn(torch.autograd.Function):
    """h (..., 2m) -> silu(a) * b for the halves a, b of h."""

    @staticmethod
    def forward(ctx, h):
        a, b = h.chunk(2, dim=-1)
        s = torch.sigmoid(a)
        ctx.save_for_backward(a, b, s)
        return a * s * b

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, b, s = ctx.saved_tensors
        da = dy * b * (s * (1 + a * (1 - s)))  # d silu(a) / da = s (1 + a (1 - s))
        return torch.cat([da, dy * a * s], dim=-1)


class RotaryFn(torch.autograd.Function):
    """Rotary on interleaved pairs: x (..., T, dh), cos/sin (T, dh/2). Backward rotates the
    gradient back by the same angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_pairs(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate_pairs(dy, cos, -sin), None, None
