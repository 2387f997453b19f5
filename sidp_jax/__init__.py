"""sidp-jax: offline LLM inference in JAX with SiDP (memory-efficient data parallelism)."""

import os as _os

from sidp_jax.engine_config import XLA_MEM_FRACTION

# Only effective when sidp_jax is imported before JAX initialises its backends (so this module
# imports no jax).
_os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", XLA_MEM_FRACTION)

from sidp_jax.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from sidp_jax.sampling_params import SamplingParams  # noqa: E402
from sidp_jax.structured_outputs import StructuredOutputsParams  # noqa: E402


def __getattr__(name):  # LLM pulls in jax and the models: import it lazily
    if name == "LLM":
        from sidp_jax.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
