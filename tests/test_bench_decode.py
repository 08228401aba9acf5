"""The decode-step timer of `split-model bench speed`: it times the step it claims to time.

A tiny random Llama (2 layers, d=32, GQA, vocabulary 300) stands in for the memory backbone;
the 1.7B config is only counted, never built. Compiled steps use dynamo with the "eager"
backend (tracing, graph capture, the static cache) except one inductor run, the path CUDA
takes with CUDA graphs on top.
"""

from __future__ import annotations

import math

import pytest
import torch

from split_model.bench import decode

CONTEXT = 16


def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False, **overrides})


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return decode.random_lm(tiny_config(), "cpu")


@pytest.fixture(scope="module")
def context():
    return torch.randint(3, 300, (1, CONTEXT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_logits(lm, context):
    """Next-token logits after the context, by a plain full forward (no cache at all)."""
    with torch.no_grad():
        ids = torch.cat([context, context[:, -1:]], dim=1)  # the step feeds the last token again
        return lm(input_ids=ids).logits[:, -1]


def test_random_lm_is_fp32_eval_on_cpu(lm):
    assert next(lm.parameters()).dtype == torch.float32 and not lm.training
    assert decode.bench_dtype("cpu") == torch.float32
    assert decode.bench_dtype("cuda") == decode.bench_dtype(torch.device("cuda", 0)) == torch.bfloat16


def test_eager_step_keeps_context_length_and_is_timed(lm, context, reference_logits):
    step = decode.prepare_decode_step(lm, context, mode="eager")
    assert step.compile_s is None
    for _ in range(3):  # a step that forgot to rewind would see 17, then 18 tokens: other logits
        torch.testing.assert_close(step(), reference_logits)
        assert step.cache.get_seq_length() == CONTEXT
    (ms,) = decode.time_steps_ms([step], rounds=2, per_round=2)
    assert step.cache.get_seq_length() == CONTEXT
    assert 0 < ms < 1e4 and math.isfinite(ms)
    assert 0 < decode.decode_step_ms(lm, context, mode="eager", rounds=1, per_round=2) < 1e4


def test_static_cache_step_under_dynamo_matches_eager(lm, context, reference_logits):
    step = decode.prepare_decode_step(lm, context, mode="compiled", backend="eager")
    assert step.compile_s is not None and step.compile_s > 0
    assert int(step.cache.get_seq_length()) == CONTEXT  # the warm-up steps were rewound
    for _ in range(3):  # same cache position every time: same logits
        torch.testing.assert_close(step().clone(), reference_logits)
        assert int(step.cache.get_seq_length()) == CONTEXT
    eager = decode.prepare_decode_step(lm, context, mode="eager")
    static_ms, eager_ms = decode.time_steps_ms([step, eager], rounds=2, per_round=2)
    assert static_ms > 0 and eager_ms > 0
    torch.testing.assert_close(step().clone(), eager())  # timing left both caches at the context


def test_inductor_compiled_step_matches_eager(lm, context, reference_logits):
    """The CPU twin of the CUDA path (inductor; CUDA graphs are CUDA-only). ~35 s cold, ~5 s warm."""
    step = decode.prepare_decode_step(lm, context, mode="compiled")
    torch.testing.assert_close(step().clone(), reference_logits)
    assert 0 < decode.time_steps_ms([step], rounds=1, per_round=3)[0] < 1e4


def test_compile_failure_raises_compile_error(lm, context):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    with pytest.raises(decode.CompileError, match="no C\\+\\+ compiler here") as info:
        decode.prepare_decode_step(lm, context, mode="compiled", backend=broken_backend)
    assert info.value.__cause__ is not None
    with pytest.raises(ValueError, match="'graph'"):
        decode.prepare_decode_step(lm, context, mode="graph")


def test_generate_writes_exactly_new_tokens_despite_eos(lm, context):
    with torch.no_grad():
        first = int(lm(input_ids=context).logits[0, -1].argmax())
    lm.generation_config.eos_token_id = first  # greedy decoding would stop at once
    try:
        assert lm.generate(input_ids=context, do_sample=False, max_new_tokens=8).shape[1] == CONTEXT + 1
        out = decode.greedy_generate(lm, context, 64)
        assert out.shape == (1, CONTEXT + 64) and torch.equal(out[:, :CONTEXT], context)
        ms = decode.generate_ms_per_token(lm, context, new_tokens=8)
        assert 0 < ms < 1e4 and math.isfinite(ms)
    finally:
        lm.generation_config.eos_token_id = 2


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_formula_matches_a_built_model(tie):
    cfg = tiny_config(tie_word_embeddings=tie)
    built = decode.random_lm(cfg, "cpu")
    assert decode.llama_param_count(cfg) == sum(p.numel() for p in built.parameters())


def test_1p7b_config_is_smollm2_1p7b_shaped():
    cfg = decode.llama_1p7b_config()
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (2048, 24, 32, 32)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (8192, 49152, True)
    assert cfg.rope_parameters["rope_theta"] == 130000
    # By hand: embeddings 49152*2048 + 24 layers * (4*2048^2 attention + 3*2048*8192 MLP + 2*2048 norms) + 2048
    by_hand = 49152 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 8192 + 2 * 2048) + 2048
    assert decode.llama_param_count(cfg) == by_hand == 1_711_376_384
