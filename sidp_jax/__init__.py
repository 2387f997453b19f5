"""sidp-jax: offline LLM inference in JAX with SiDP (memory-efficient data parallelism)."""

import os as _os

# Let JAX preallocate most of each GPU; `gpu_memory_utilization` then decides our share.
# Only effective when sidp_jax is imported before JAX initialises its backends (so this module
# imports no jax). sidp_jax.engine.memory reads the same constant to recover the device's size.
XLA_MEM_FRACTION = "0.95"
_os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", XLA_MEM_FRACTION)

from sidp_jax.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from sidp_jax.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):  # LLM pulls in jax and the models: import it lazily
    if name == "LLM":
        from sidp_jax.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
