"""Structured output with vLLM's names: `SamplingParams(structured_outputs=StructuredOutputsParams(...))`.

One constraint per request: a JSON schema (`json`), any JSON object (`json_object`), a regular
expression (`regex`), one of several strings (`choice`) or a grammar (`grammar`: Lark or GBNF).
Each becomes an llguidance grammar (llguidance: MIT, no dependencies, reads the model's own
tokenizer.json), checked when the request is made, so a schema that does not compile is an error
that names the field and the problem, and the engine's per-token masks come from its matcher
(sidp_jax/engine/grammar_masks.py). Compile work is bounded (`LIMITS`), so a pathological schema
fails instead of running away.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar larger than this is refused before compiling
# JSON: the whitespace allowed between two tokens of the structure, unless whitespace_pattern or
# disable_any_whitespace says otherwise. Bounded, so a model that keeps choosing whitespace (a
# known failure of unbounded patterns) still has to close the structure; 16 characters fit
# pretty-printed JSON seven levels deep at two spaces an indent.
JSON_WHITESPACE = r"[ \t\n\r]{0,16}"


@functools.cache
def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover (a dependency; absent only in a hand-made environment)
        raise ImportError("structured outputs need the 'llguidance' package: pip install llguidance") from e
    return llguidance


def limits():
    """llguidance's parser limits: its defaults, which bound grammar size and per-step work."""
    return _llguidance().LLParserLimits()


@dataclasses.dataclass
class StructuredOutputsParams:
    json: dict | str | None = None  # a JSON schema (an object, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens of the structure
    whitespace_pattern: str | None = None  # JSON: a regex for the whitespace between tokens (JSON_WHITESPACE)

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(self.KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        self.kind = given[0]
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be true or false")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError("structured_outputs.whitespace_pattern must be a string (a regular expression)")
        if self.kind == "json" and isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.kind == "json" and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(self.json).__name__}")
        if self.kind in ("regex", "grammar") and not isinstance(getattr(self, self.kind), str):
            raise ValueError(f"structured_outputs.{self.kind} must be a string")
        if self.kind == "choice" and (not isinstance(self.choice, list) or not self.choice
                                      or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if self.kind == "json_object" and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true")
        if len(self.key()) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is larger than {MAX_SPEC_CHARS:,} characters")
        self.grammar_text()  # compile now: a bad schema fails where the request is made

    def key(self) -> str:
        """What identifies the compiled grammar (its cache key)."""
        value = getattr(self, self.kind)
        whitespace = "" if self.disable_any_whitespace else self.whitespace_pattern or JSON_WHITESPACE
        return json.dumps([self.kind, value, whitespace])  # keeps the schema's property order

    def grammar_text(self) -> str:
        """The llguidance grammar (checked; a ValueError names the field and the problem)."""
        return _compile(self.key())

    @classmethod
    def from_value(cls, value: Any) -> "StructuredOutputsParams | None":
        """From a StructuredOutputsParams, a dict of its fields (a job line's), or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown structured_outputs field(s): {', '.join(unknown)}")
        return cls(**value)


@functools.lru_cache(maxsize=1024)
def _compile(key: str) -> str:
    kind, value, whitespace = json.loads(key)
    llg = _llguidance()
    matcher = llg.LLMatcher
    try:
        if kind == "json" or kind == "json_object":
            schema = {"type": "object"} if kind == "json_object" else value
            options = {"whitespace_flexible": False} if whitespace == "" else {"whitespace_pattern": whitespace}
            grammar = matcher.grammar_from_json_schema(schema, overrides=options)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(value)
        elif kind == "choice":
            grammar = llg.grammar_from("choice", json.dumps(value))
        else:
            grammar = llg.grammar_from("grammar", value)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"structured_outputs.{kind} does not compile: {e}") from None
    error = matcher.validate_grammar(grammar, None, limits=limits())
    if error:
        raise ValueError(f"structured_outputs.{kind} does not compile: {error}")
    return grammar
