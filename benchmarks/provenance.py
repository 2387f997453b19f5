"""Every benchmark's JSON carries its own provenance, written by the benchmark itself: the command
line, the machine (host, CPUs, GPUs by `nvidia-smi -L`), jax's version, the UTC time, the git
commit (and whether the tree had changes) and a digest of the source tree, which identifies the
code where no .git travels (the device machine gets a copy of the tree).

Nothing here imports or starts jax: a parent process that runs its configurations in children
must not take the GPUs' memory.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("sidp_jax", "models", "kernels", "benchmarks")


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest() -> str:
    """sha256 over the engine's and benchmarks' Python files (paths and bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def provenance() -> dict:
    gpus = _run("nvidia-smi", "-L")
    status = _run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "gpus": gpus.splitlines() if gpus else [], "platform": platform.platform()},
        "python": platform.python_version(),
        "jax": _version("jax"), "jaxlib": _version("jaxlib"), "flax": _version("flax"),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "SIDP_JAX_CACHE")
                if k in os.environ},
        "git_commit": _run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "source_digest": source_digest(),
    }


def write_result(path: str | os.PathLike, payload: dict) -> None:
    """Write {"provenance": ..., **payload} as JSON to `path`."""
    with open(path, "w") as f:
        json.dump({"provenance": provenance(), **payload}, f, indent=1)
    print(f"wrote {path}")
