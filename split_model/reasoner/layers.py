"""Building blocks of the reasoner, top to bottom: norm, rotary, attention, MLP, block,
feedback, embedding.

Every block takes T >= 1 new positions plus a KV cache of the past, so one code path
serves a fully parallel pass (T = all, empty cache) and a recurrent step (T = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from split_model.reasoner.config import ReasonerConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_angles(start: int, t: int, dh: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, dh/2) of the rotary angles of positions start..start+T-1."""
    inv = base ** (-torch.arange(0, dh, 2, device=device, dtype=torch.float32) / dh)  # (dh/2,)
    ang = torch.arange(start, start + t, device=device, dtype=torch.float32)[:, None] * inv  # (T, dh/2)
    return ang.cos(), ang.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x (..., T, dh) by angles with cos/sin (T, dh/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rotary(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """Rotate x (B, H, T, dh) by positions start..start+T-1."""
    return rotate_pairs(x, *rotary_angles(start, x.shape[-2], x.shape[-1], base, x.device))


def sinusoid(positions: torch.Tensor, d: int) -> torch.Tensor:
    """(...,) integer positions -> (..., d) sin/cos features at geometric frequencies."""
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
    ang = positions.float()[..., None] * inv
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class AbsolutePosition(nn.Module):
    """A learned map of sinusoidal position features, added to a stream.

    Self-attention (rotary) only sees relative positions, and latent steps all share one
    input vector, so without this a step could not tell which element of the memory (the
    i-th move of a game, say) is its to read. Starts small so it does not swamp the input.
    """

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / d)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.proj(sinusoid(positions, self.proj.in_features))


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, H, t, dh) keys of the t past positions
    v: torch.Tensor  # (B, H, t, dh)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def detach(self) -> "LayerCache":
        return LayerCache(self.k.detach(), self.v.detach())


class SelfAttention(nn.Module):
    """Causal self-attention over the reasoner's own past steps, with a KV cache."""

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.h, self.dh, self.base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: LayerCache | None) -> tuple[torch.Tensor, LayerCache]:
        b, t, _ = x.shape  # x: (B, T, d)
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # each (B, H, T, dh)
        past = 0 if cache is None else cache.length
        q, k = rotary(q, past, self.base), rotary(k, past, self.base)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, H, past+T, dh)
        if t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new position i sees all past plus new positions <= i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, self.h * self.dh)  # (B, T, d)
        return self.out(y), LayerCache(k, v)


@dataclass
class MemoryKV:
    """Cross-attention keys/values of the memory, computed once per context."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v each (B, H, N, dh)
    mask: torch.Tensor  # (B, 1, 1, N) bool: True where a memory token is real
    lookup: object | None = None  # a retrieval.Lookup: where querying steps fetch chunks (None: no retrieval)
    states: torch.Tensor | None = None  # (B, N, S*D_mem) the question's memory states (quoted, matched)
    states_mask: torch.Tensor | None = None  # (B, N) bool, with `states`


class CrossAttention(nn.Module):
    """Gated attention from the reasoner's positions into the memory states."""

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # tanh(1) ~ 0.76: open from the start, since a reasoner trained from scratch needs its memory.
        self.gate = nn.Parameter(torch.ones(()))
        # A list while someone watches where this layer reads: each call appends its attention
        # over the memory, (B, H, T, N), computed explicitly (for a loss on it; see evidence_loss).
        self.record: list[torch.Tensor] | None = None

    def memory_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = mem.shape  # mem: (B, N, d) adapted memory states
        k, v = self.kv(mem).view(b, n, 2, self.h, self.dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, dh)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                extra=None) -> torch.Tensor:
        """extra: a retrieval `Fetched` (per-position chunk tokens with an attention bias), attended
        together with the memory in one softmax."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)  # (B, H, T, dh)
        if extra is None and self.record is not None:
            p = (q @ kv[0].transpose(-1, -2) * self.dh**-0.5).masked_fill(~mask, float("-inf")).softmax(-1)
            self.record.append(p)
            y = p @ kv[1]
        elif extra is None:
            y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        else:
            y = self._with_fetched(q, kv, mask, extra)
        return torch.tanh(self.gate) * self.out(y.transpose(1, 2).reshape(b, t, -1))

    def _with_fetched(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, extra):
        """Attention over [memory (N, shared by all positions) ; position t's own M fetched tokens]."""
        b, _, t, _ = q.shape
        m = extra.states.shape[2]
        rk, rv = self.kv(extra.states).view(b, t, m, 2, self.h, self.dh).permute(3, 0, 1, 4, 2, 5)  # each (B, T, H, M, dh)
        scale = self.dh**-0.5
        s_mem = (q @ kv[0].transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # (B, H, T, N)
        s_got = torch.einsum("bhtd,bthmd->bhtm", q, rk) * scale + extra.bias[:, None]  # (B, H, T, M)
        p = torch.cat([s_mem, s_got], dim=-1).softmax(-1)
        n = s_mem.shape[-1]
        if self.record is not None:
            self.record.append(p[..., :n])
        return p[..., :n] @ kv[1] + torch.einsum("bhtm,bthmd->bhtd", p[..., n:], rv)  # (B, H, T, dh)


class MLP(nn.Module):
    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)  # gate and value halves (SwiGLU)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm: causal self-attention -> gated cross-attention into memory -> MLP."""

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn, self.xattn, self.mlp = SelfAttention(cfg), CrossAttention(cfg), MLP(cfg)

    def forward(self, x, cache: LayerCache | None, mem_kv: tuple, mem_mask: torch.Tensor, fetched=None):
        a, cache = self.attn(self.norm1(x), cache)
        x = x + a
        x = x + self.xattn(self.norm2(x), mem_kv, mem_mask, fetched)
        return x + self.mlp(self.norm3(x)), cache


class MemoryWindow(nn.Module):
    """What a memory token's neighbours hold, added to its adapted state: a projection of the
    (normed) backbone states, mixed along the tokens by a depthwise convolution over the
    `width` tokens either side. A fact "Every A is a B." can then carry A's identity at B's
    token (and B's at A's) through one learned linear map, where a frozen layer holds each
    word well at its own token and the other end of its fact poorly. Padding is zeroed
    first, so it never leaks in. The convolution starts at zero: a fresh window adds
    nothing, and its first gradient is already non-zero.
    """

    def __init__(self, in_dim: int, d_model: int, width: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model, bias=False)
        self.mix = nn.Conv1d(d_model, d_model, 2 * width + 1, padding=width, groups=d_model, bias=False)
        nn.init.zeros_(self.mix.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, in_dim) normed states, mask (B, N) real tokens or None -> (B, N, d)."""
        h = self.proj(x)
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        return self.mix(h.transpose(1, 2)).transpose(1, 2)


class MemoryEncoder(nn.Module):
    """Trainable bidirectional layers over the adapted memory, run once per context.

    A frozen backbone layer need not carry what a reasoner must match on: in "Tom is a
    terpus." the state of "terpus" may not say whose class it is. Each layer lets every
    memory token attend to the others (rotary, so relative offsets are easy to learn) and
    rewrite itself. Outputs are zero-initialised: a fresh encoder is the identity.
    """

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.h, self.dh, self.base = cfg.n_heads, cfg.head_dim, cfg.rope_base
        d = cfg.d_model
        self.attn_norms = nn.ModuleList(RMSNorm(d) for _ in range(cfg.memory_layers))
        self.mlp_norms = nn.ModuleList(RMSNorm(d) for _ in range(cfg.memory_layers))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d, bias=False) for _ in range(cfg.memory_layers))
        self.out = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(cfg.memory_layers))
        self.mlps = nn.ModuleList(MLP(cfg) for _ in range(cfg.memory_layers))
        for out, mlp in zip(self.out, self.mlps):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(mlp.down.weight)

    def forward(self, mem: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """mem (B, N, d), mask (B, N) True where a token is real (None: all) -> (B, N, d)."""
        b, n, _ = mem.shape
        attn_mask = None
        if mask is not None:
            # A context with no real token (an empty retrieval slot) attends to all of its
            # padding instead of to nothing, which some attention kernels answer with NaN; its
            # output is unused.
            mask = mask.bool() | ~mask.bool().any(-1, keepdim=True)
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, N)
        cos, sin = rotary_angles(0, n, self.dh, self.base, mem.device)
        x = mem
        for attn_norm, qkv, out, mlp_norm, mlp in zip(self.attn_norms, self.qkv, self.out, self.mlp_norms, self.mlps):
            q, k, v = qkv(attn_norm(x)).view(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)  # each (B, H, N, dh)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            x = x + out(y.transpose(1, 2).reshape(b, n, -1))
            x = x + mlp(mlp_norm(x))
        return x


class Feedback(nn.Module):
    """Turns the states of step t into an input added to step t+1.

    `all` mixes the embedding output and every block's output with softmax weights that
    start uniform; `last` takes the last block's output. Both are projected, normed and
    gated. The gate is a d x d matrix that starts at 0, so a fresh model computes exactly
    what `none` computes, yet its first gradient is the full correlation between the
    previous step's features and what the next step's input should become. (A scalar or
    per-channel gate sees only a diagonal of that correlation in a random basis, and in
    practice barely opens.)
    """

    def __init__(self, cfg: ReasonerConfig):
        super().__init__()
        self.mode = cfg.feedback
        self.mix = nn.Parameter(torch.zeros(cfg.n_layers + 1)) if cfg.feedback == "all" else None
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm = RMSNorm(cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.token_gate = None
        if cfg.feedback_tokens:  # created last: every other weight as without it
            self.token_gate = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            nn.init.zeros_(self.token_gate.weight)
        # (..., d) last block output -> (..., d) the input embedding its output distribution
        # expects; set by the Reasoner, which owns the head (a plain attribute, not a module).
        self.expected_input: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, layer_states: torch.Tensor) -> torch.Tensor:
        """layer_states: (L+1, B, T, d) of step(s) t -> (B, T, d) input for step(s) t+1."""
        if self.mix is not None:
            h = torch.einsum("l,lbtd->btd", self.mix.softmax(0), layer_states)
        else:
            h = layer_states[-1]
        out = self.gate(self.norm(self.proj(h)))
        if self.token_gate is not None:
            out = out + self.token_gate(self.expected_input(layer_states[-1]))
        return out

    def openness(self) -> torch.Tensor:
        """RMS of the gate's weights: 0 while feedback is closed."""
        return self.gate.weight.detach().pow(2).mean().sqrt()


class FactorisedEmbedding(nn.Module):
    """Token embedding (V, r) @ (r, d), tied with the output head.

    Large backbone vocabularies (49k for SmolLM2) would dominate a small reasoner; rank r
    keeps both the parameters and the per-step logits cheap. The (V, r) table has exactly
    `vocab_size` rows, one per tokenizer id. With `init_from` (the backbone's (V', D)
    embeddings) it starts from their top-r principal components: a backbone padded past the
    tokenizer (V' > V, rows rounded up to a multiple of 64) gives its first V rows, and the
    padding rows, which no token uses, take no part; ids the backbone has no row for
    (V' < V, tokens added to the tokenizer) start at the mean row plus small random offsets
    (norm ~0.1 against ~1 for the others), so that they differ from each other.

    `keep(ids)` drops every row but those of `ids` (a task's output vocabulary and the
    special tokens the reasoner reads): a reasoner that reads and writes a few dozen tokens
    then holds a few dozen rows, not 30-50k rows that no input reads and no gradient reaches.
    Ids are still token ids; `rows` maps them to rows, and every id not kept reads one shared
    row (the last), so an unexpected input is one well-defined vector, never another token's.
    """

    def __init__(self, vocab_size: int, cfg: ReasonerConfig, init_from: torch.Tensor | None = None):
        super().__init__()
        r = cfg.embed_rank
        if init_from is None:
            table = torch.randn(vocab_size, r) / r**0.5
        else:
            table = _pca_table(init_from[:vocab_size], r)
            if table.shape[0] < vocab_size:
                table = torch.cat([table, _extra_rows(table, vocab_size - table.shape[0])])
        self.vocab_size = vocab_size
        self.table = nn.Parameter(table)
        self.up = nn.Parameter(torch.randn(cfg.d_model, r) / cfg.d_model**0.5)  # (d, r)
        # (V,) token id -> row of `table` once rows are dropped (see keep); None: row = id.
        self.register_buffer("rows", None, persistent=False)

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> rows of `table`."""
        return ids if self.rows is None else self.rows[ids]

    def kept_ids(self) -> torch.Tensor | None:
        """The token ids with a row of their own (sorted), or None while every id has one."""
        if self.rows is None:
            return None
        return (self.rows < self.table.shape[0] - 1).nonzero().squeeze(1)

    def keep(self, ids) -> None:
        """Keep the rows of these token ids only, plus the shared row every other id reads.

        On a full table the shared row starts as the mean row. On a table already reduced,
        an id that had no row of its own starts from the shared row plus a small offset
        (norm ~0.1, from a private generator), as ids the backbone has no row for do.
        Values are copied, so the function over the kept ids is unchanged; the parameter is
        replaced, so keep before an optimizer is built over it."""
        ids = torch.as_tensor(ids, dtype=torch.long).unique(sorted=True)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"embedding rows to keep must be non-empty ids in 0..{self.vocab_size - 1}")
        ids = ids.to(self.table.device)
        with torch.no_grad():
            if self.rows is None:
                kept, shared = self.table[ids], self.table.mean(0, keepdim=True)
            else:
                at, shared = self.rows[ids], self.table[-1:]
                new = at == self.table.shape[0] - 1
                kept = self.table[at].clone()
                if new.any():
                    kept[new] = _extra_rows(shared, int(new.sum()))
            table = torch.cat([kept, shared]).contiguous()
        self.table = nn.Parameter(table, requires_grad=self.table.requires_grad)
        rows = torch.full((self.vocab_size,), len(ids), dtype=torch.long, device=ids.device)
        rows[ids] = torch.arange(len(ids), device=ids.device)
        self.rows = rows

    def reduce(self, table: torch.Tensor) -> torch.Tensor:
        """A full (V, r) table (a checkpoint from before rows were dropped) -> this
        embedding's rows: the kept ids' rows and their mean as the shared row."""
        ids = self.kept_ids()
        if ids is None or table.shape[0] != self.vocab_size:
            return table
        return torch.cat([table[ids.to(table.device)], table.mean(0, keepdim=True)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[self.index(ids)] @ self.up.T  # (..., r) -> (..., d)

    def head_rows(self) -> torch.Tensor:
        """(V, r): every id's row (a dropped id reads the shared row)."""
        return self.table if self.rows is None else self.table[self.rows]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.up) @ self.head_rows().T  # (..., d) -> (..., r) -> (..., V)


def _extra_rows(table: torch.Tensor, n: int) -> torch.Tensor:
    """(n, r) rows for ids without a backbone row: the mean row plus offsets of norm ~0.1.

    Drawn from a private generator, so the caller's random stream is left as it was.
    """
    r = table.shape[1]
    noise = torch.randn(n, r, generator=torch.Generator().manual_seed(0)) * (0.1 / r**0.5)
    return table.mean(0, keepdim=True) + noise.to(table.device)


def _pca_table(emb: torch.Tensor, r: int) -> torch.Tensor:
    """(V, D) backbone embeddings -> (V, r) coordinates on their top-r principal axes, rows of norm ~1."""
    emb = emb.float()
    q = min(r, emb.shape[1])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(emb, q=q, center=True)
    table = (emb - emb.mean(0)) @ v[:, :q]
    table = table / table.norm(dim=1).mean().clamp_min(1e-6)
    if table.shape[1] < r:  # backbone narrower than the rank
        table = torch.cat([table, torch.zeros(table.shape[0], r - table.shape[1])], dim=1)
    return table.contiguous()
