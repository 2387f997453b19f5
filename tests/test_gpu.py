"""GPU runs of the engine: layout parity (>= 2 GPUs), the kernels' engine path, bf16 and host
overlap on one GPU (pytest -m gpu)."""

import jax
import pytest

from test_layouts import CKPT, PROMPTS, SIDP_VARIANTS, WANT, run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    # float32 dots default to TF32 on Hopper; the transformers fixtures need true float32.
    with jax.default_matmul_precision("highest"):
        yield


def gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@pytest.mark.skipif(len(gpus()) < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel,placement,ffn_mode", [("dp", "striped", "auto"), ("tp", "striped", "auto")]
                         + SIDP_VARIANTS)
def test_layouts_match_transformers_on_two_gpus(parallel, placement, ffn_mode):
    got, stats = run(CKPT, "dp=2", parallel, placement, ffn_mode, devices=gpus()[:2])
    assert got == WANT


@pytest.mark.skipif(len(gpus()) < 1, reason="needs a GPU")
def test_engine_with_the_decode_kernel_matches_transformers():
    from sidp_jax import LLM, SamplingParams

    llm = LLM(CKPT, dtype="float32", devices=gpus()[:1], verbose=False, kv_cache_tokens=512,
              max_num_batched_tokens=16)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == WANT
    steps = llm.stats()["steps_per_attention"]
    assert steps.get("decode", 0) > 0 and steps.get("mixed", 0) > 0, steps



@pytest.mark.skipif(len(gpus()) < 1, reason="needs a GPU")
def test_bf16_on_one_gpu_within_the_stated_tolerance():
    # the default dtype on the GPU path (Pallas kernels, TF32-free bf16 GEMMs), against float32 transformers
    from test_bf16 import assert_bf16_agrees, next_token_errors

    with jax.default_matmul_precision("default"):
        errors, firsts = next_token_errors("dp", "striped", "auto", mesh="dp=1", devices=gpus()[:1])
    assert_bf16_agrees(errors, firsts)


@pytest.mark.skipif(len(gpus()) < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel,placement,mode", [("tp", "striped", "auto"), ("sidp", "striped", "cas"),
                                                     ("sidp", "owner", "was")])
def test_bf16_layouts_on_two_gpus(parallel, placement, mode):
    from test_bf16 import assert_bf16_agrees, next_token_errors

    with jax.default_matmul_precision("default"):
        errors, firsts = next_token_errors(parallel, placement, mode, mesh="dp=2", devices=gpus()[:2])
    assert_bf16_agrees(errors, firsts)


@pytest.mark.skipif(len(gpus()) < 1, reason="needs a GPU")
def test_host_overlap_on_and_off_agree_on_gpu():
    from test_host_overlap import PROMPTS as P, WANT as W, assert_same, outputs
    from sidp_jax import LLM, SamplingParams

    def make(async_scheduling):
        return LLM(CKPT, dtype="float32", devices=gpus()[:1], verbose=False, kv_cache_tokens=64, kv_block_size=4,
                   max_num_batched_tokens=8, max_num_seqs=6, async_scheduling=async_scheduling)

    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=12, logprobs=2)]
    prompts = [p for p in P for _ in params]
    sync, ahead = make(False), make(True)
    got_sync, got_ahead = outputs(sync, prompts, params * len(P)), outputs(ahead, prompts, params * len(P))
    assert_same(got_ahead, got_sync)
    assert [o[0][0] for o in got_ahead[::2]] == W
    stats = ahead.stats()
    assert stats["num_preemptions"] > 0 and stats["device_fed_tokens"] > 0
    assert stats["steps_per_attention"].get("decode", 0) > 0


@pytest.mark.skipif(len(gpus()) < 1, reason="needs a GPU")
def test_fp8_gemms_lower_to_cublaslt_fp8_without_weight_transposes():
    """Stored [out, in], the e4m3 weight feeds cuBLASLt's FP8 GEMM as it lies: the optimized HLO
    has the FP8 custom call and no transpose or copy of the weight."""
    import re

    import jax.numpy as jnp
    import numpy as np

    from sidp_jax.models.fp8 import Quantized, linear, quantize

    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 1024)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 1024)) / 32, jnp.float32)
    q, s = quantize(w, 1)
    x, q, s = jax.device_put((x, q, s), gpus()[0])
    fn = jax.jit(lambda x, q, s: linear(x, Quantized(q, s)))
    hlo = fn.lower(x, q, s).compile().as_text()
    assert re.search(r'custom_call_target="__cublas\$lt\$matmul\$f8"', hlo), hlo[-3000:]
    assert not re.search(r"f8e4m3fn\[(?:2048,1024|1024,2048)\][^=]*? (?:transpose|copy)\(", hlo), hlo[-3000:]
    ref = linear(x.astype(jnp.float32), w.T, out_dtype=jnp.float32)
    got = fn(x, q, s).astype(jnp.float32)
    assert float(jnp.sqrt(jnp.mean((got - ref) ** 2) / jnp.mean(ref ** 2))) < 0.09


@pytest.mark.skipif(len(gpus()) < 1, reason="needs a GPU")
def test_fp8_kv_cache_in_the_gpu_decode_kernel_matches_the_reference():
    """The Triton decode kernel reads an e4m3 cache as the reference attention does, as closely
    as it matches it on a float32 cache. Greedy parity of whole runs is not asserted here: on the
    tiny random model an FP8 cache's outputs differ between the kernels and the reference at a
    near-tie, which float-level differences decide."""
    import jax.numpy as jnp
    import numpy as np

    from sidp_jax.kernels.paged_attention import paged_attention_reference
    from sidp_jax.kernels.paged_decode_pallas import paged_decode_attention

    rng = np.random.default_rng(int.from_bytes(__import__("os").urandom(4), "little"))
    S, Nq, Nkv, D, P, MB, pages = 4, 16, 2, 64, 16, 4, 20
    q = jnp.asarray(rng.standard_normal((S, Nq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((pages, P, Nkv, D)), jnp.float32) for _ in range(2))
    bt = jnp.asarray(1 + rng.permutation(pages - 1)[:S * MB].reshape(S, MB), jnp.int32)
    lengths = jnp.asarray([1, 9, 17, MB * P], jnp.int32)
    diffs = {}
    for dtype in (jnp.float32, jnp.float8_e4m3fn):
        args = jax.device_put((q, k.astype(dtype), v.astype(dtype), bt, lengths), gpus()[0])
        got = paged_decode_attention(args[0], args[1], args[2], jnp.int32(0), args[3], args[4], scale=D ** -0.5)
        want = paged_attention_reference(args[0], args[1], args[2], jnp.int32(0), args[3], jnp.arange(S),
                                         args[4] - 1, scale=D ** -0.5)
        diffs[dtype] = float(jnp.abs(got - want).max())
    assert diffs[jnp.float8_e4m3fn] <= max(2 * diffs[jnp.float32], 2e-3), diffs
