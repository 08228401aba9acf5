"""Speed: is the split worth it?

In one process on one thread:
- one step of the quickstart reasoner (KV cache of past steps, cross-attention over a
  512-token memory, logits over the full SmolLM2 vocabulary) vs one decode step of
  SmolLM2-135M itself with its KV cache at the same 512-token context;
- memory prefill of 512 tokens through HFMemory vs the bare transformers forward of the
  same weights (the wrapper should add nothing).
Timings alternate between the compared sides and report medians, so drift on a shared
machine hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from split_model.bench import log

CONTEXT = 512
PAST_STEPS = 16  # reasoner steps already in its KV cache


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _interleaved(a, b, rounds: int, per_round: int) -> tuple[float, float]:
    """Median ms of a and of b, measured in alternating rounds."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(_median_ms(a, per_round))
        tb.append(_median_ms(b, per_round))
    return statistics.median(ta), statistics.median(tb)


def quickstart_reasoner_config():
    from omegaconf import OmegaConf

    from split_model.reasoner import ReasonerConfig

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    return ReasonerConfig(**OmegaConf.to_container(cfg.model.reasoner))


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    from split_model.memory import HFMemory
    from split_model.reasoner import Reasoner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds, per_round = (3, 2) if args.quick else (7, 5)
    log("loading SmolLM2-135M (wrapper and bare copies)")
    wrapper = HFMemory(name="smollm2-135m", max_length=CONTEXT)
    lm = AutoModelForCausalLM.from_pretrained(wrapper.path, dtype=torch.float32).eval()  # the same converted files
    ids = torch.randint(100, wrapper.tokenizer.vocab_size, (1, CONTEXT))
    mask = torch.ones_like(ids)

    with torch.no_grad():
        log("prefill: wrapper vs bare")
        wrapped_ms, bare_ms = _interleaved(
            lambda: wrapper.encode(ids, mask), lambda: lm.model(input_ids=ids, attention_mask=mask, use_cache=False),
            rounds, 1)

        log("decode step of SmolLM2 with a 512-token KV cache")
        cache = DynamicCache()
        lm(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = torch.tensor([[42]])

        def decode():
            lm(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: every timed step sees the same 512-token context

        log("reasoner step with cross-attention over 512 memory states")
        cfg = quickstart_reasoner_config()
        reasoner = Reasoner(cfg, vocab_size=wrapper.tokenizer.vocab_size, memory_dim=wrapper.hidden_size,
                            num_states=wrapper.num_states).eval()
        states = wrapper.encode(ids, mask)
        memory = reasoner.encode_memory(states.states, states.mask)
        state = reasoner.start(memory)
        tok = torch.tensor([7])
        for t in range(PAST_STEPS):
            _, state = reasoner.step(state, tok, torch.tensor([t < PAST_STEPS // 2]))
        no_latent = torch.tensor([False])
        decode_ms, step_ms = _interleaved(decode, lambda: reasoner.step(state, tok, no_latent), rounds, per_round)

    n_reasoner = sum(p.numel() for p in reasoner.parameters())
    return {
        "decode_over_reasoner_step": round(decode_ms / step_ms, 2),
        "prefill_wrapper_over_bare": round(wrapped_ms / bare_ms, 3),
        "smollm2_decode_step_ms": round(decode_ms, 3),
        "reasoner_step_ms": round(step_ms, 3),
        "prefill_wrapper_ms": round(wrapped_ms, 1),
        "prefill_bare_ms": round(bare_ms, 1),
        "context_tokens": CONTEXT,
        "reasoner_past_steps": PAST_STEPS,
        "reasoner": {**cfg.__dict__, "params": n_reasoner, "vocab_size": wrapper.tokenizer.vocab_size},
        "memory_params": sum(p.numel() for p in wrapper.parameters()),
        "threads": torch.get_num_threads(),
    }
