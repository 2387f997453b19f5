"""GPU runs of the layout parity (pytest -m gpu on a host with >= 2 GPUs)."""

import jax
import pytest

from test_layouts import CKPT, SIDP_VARIANTS, WANT, run

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
