"""Run one benchmark configuration in a fresh Python process (so the last one's device memory is
gone) and get back the dict it reports on a `RESULT {json}` line."""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def report(result: dict) -> None:
    """In the child: hand the result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(argv: list[str], error_chars: int = 3000) -> tuple[dict, str]:
    """In the parent: run `python argv...`; (its result or {"error": stderr tail}, its stdout)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(PREFIX)), None)
    result = json.loads(line[len(PREFIX):]) if line else {"error": proc.stderr[-error_chars:]}
    return result, proc.stdout
