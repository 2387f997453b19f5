#!/usr/bin/env python
"""Offline batch inference, vLLM-style: `python run_offline.py --model M --input in.jsonl --output out.jsonl`.

With no arguments, runs the bundled tiny model on the bundled example prompts and writes
out/results.jsonl. Formats, resume and error records: see sidp_jax/jobs/offline_job.py.
"""

import os
import sys

# Must be set before anything imports jax: XLA preallocates this fraction of accelerator memory
# and the engine sizes its KV cache inside it (--gpu-memory-utilization).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from sidp_jax.jobs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
