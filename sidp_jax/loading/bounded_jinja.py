"""Chat templates come with checkpoints: render them in a sandbox with bounded time and output.

jinja2's sandbox stops attribute tricks but not work: nested `range` loops can run for hours and
`"x" * 10**9` builds a gigabyte. Here a render has a deadline and an output budget: `range`
yields through a counter that checks the clock, `*` and `**` refuse results past the budget
before building them, and the output is collected chunk by chunk and measured as it grows.
Exceeding a limit raises TemplateLimitError (a ValueError): one line's error, not a hung job.
"""

from __future__ import annotations

import threading
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_SECONDS = 5.0
RENDER_MAX_CHARS = 4_000_000
_state = threading.local()


class TemplateLimitError(jinja2.TemplateError, ValueError):
    pass


def _check_clock() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"chat template rendering took more than {_state.seconds:g} s: stopped")


def _bounded_range(*args):
    for i, v in enumerate(range(*args)):
        if i % 1024 == 0:
            _check_clock()
        yield v


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self.globals["range"] = _bounded_range

    def call_binop(self, context, operator, left, right):
        limit = getattr(_state, "max_chars", RENDER_MAX_CHARS)
        if operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > limit:
                raise TemplateLimitError(f"chat template builds a sequence of {len(seq) * times} items "
                                         f"(limit {limit})")
        if operator == "**" and isinstance(right, int) and abs(right) > 4096:
            raise TemplateLimitError(f"chat template raises to the power {right}: refused")
        return super().call_binop(context, operator, left, right)


def render(template: jinja2.Template, seconds: float | None = None, max_chars: int | None = None,
           **variables) -> str:
    """template.render(**variables) within `seconds` and `max_chars` of output (default: the
    module's RENDER_SECONDS and RENDER_MAX_CHARS)."""
    seconds = RENDER_SECONDS if seconds is None else seconds
    max_chars = RENDER_MAX_CHARS if max_chars is None else max_chars
    _state.deadline, _state.seconds, _state.max_chars = time.monotonic() + seconds, seconds, max_chars
    try:
        parts, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimitError(f"chat template output passed {max_chars} characters: stopped")
            _check_clock()
            parts.append(chunk)
        return "".join(parts)
    finally:
        _state.deadline = None
