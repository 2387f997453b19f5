"""Where the tests' checkpoints and reference outputs live (all written by tools/make_fixtures.py).

tiny-qwen3 is kept once, as the package's bundled default model (sidp_jax/assets/tiny-qwen3):
the tests run that copy. The other tiny checkpoints, and the transformers reference outputs of
every model (tiny-qwen3's included), are under tests/fixtures/.
"""

import os

import sidp_jax

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REFERENCE = os.path.join(FIXTURES, "reference")
BUNDLED = "tiny-qwen3"


def checkpoint(name: str) -> str:
    """The directory of the tiny checkpoint `name` (tiny-llama3, tiny-qwen2, tiny-qwen3)."""
    if name == BUNDLED:
        return os.path.join(os.path.dirname(os.path.abspath(sidp_jax.__file__)), "assets", name)
    return os.path.join(FIXTURES, "checkpoints", name)


TINY_QWEN3 = checkpoint(BUNDLED)
