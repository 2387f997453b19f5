#!/usr/bin/env python
"""Offline batch inference, vLLM-style: `python run_offline.py --model M --input in.jsonl --output out.jsonl`.

With no arguments, runs the bundled tiny model on the bundled example prompts and writes
out/results.jsonl. Formats, resume and error records: see sidp_jax/jobs/offline_job.py.
"""

import sys

# XLA_PYTHON_CLIENT_MEM_FRACTION must be set before anything imports jax: XLA preallocates that
# fraction of accelerator memory and the engine sizes its KV cache inside it
# (--gpu-memory-utilization). `import sidp_jax` (which imports no jax) sets it to
# sidp_jax.XLA_MEM_FRACTION (0.95) unless the user chose, before the cli pulls in jax.
import sidp_jax  # noqa: F401

from sidp_jax.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
