"""GPU runs of the layout parity (pytest -m gpu on a host with >= 2 GPUs)."""

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

