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


def run_child(argv: list[str], error_chars: int = 3000, echo: str = "[sidp_jax]") -> tuple[dict, str]:
    """In the parent: run `python argv...`; (its result or {"error": output tail}, its output).

    The child's lines that start with `echo` (the engine's start-up and progress lines) are printed
    as they come, so a run cut by an outer timeout still shows how far it got."""
    lines = []
    with subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            lines.append(line)
            if echo and line.startswith(echo):
                print(line, end="", flush=True)
    output = "".join(lines)
    result = next((json.loads(l[len(PREFIX):]) for l in lines if l.startswith(PREFIX)), None)
    return (result if result is not None else {"error": output[-error_chars:]}), output
