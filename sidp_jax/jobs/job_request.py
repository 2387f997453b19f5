"""What every input format of the offline job turns a line into: a JobRequest to run, or the
LineError that becomes its error record; and the checks the formats share (ids, sampling fields).
Formats: sidp_jax/jobs/formats.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from sidp_jax.sampling_params import SamplingParams

Key = Any  # a record's resume key: its id, or ("line", N) for an error without a usable id


class MalformedLine:
    """Stands in for a line's object when the reader could not decode it."""

    def __init__(self, why: str):
        self.why = why


@dataclasses.dataclass
class JobRequest:
    line: int
    id: str | int  # the simple format's "id", the batch format's "custom_id"
    prompt: str | None
    messages: list[dict] | None  # contents are strings (text parts joined)
    params: SamplingParams
    prompt_ids: list[int] | None = None  # filled in by tokenize_into() (a one-prompt line)
    fmt: str = "simple"  # the name of its line's format (sidp_jax/jobs/formats.py), and so of its record
    chat_template_kwargs: dict | None = None  # more apply_chat_template arguments (messages only)
    endpoint: str | None = None  # batch format: "chat" or "completions"
    model: str | None = None  # batch format: the body's "model" (only echoed in the response)
    given: frozenset = frozenset()  # SamplingParams fields the command line or the line set
    # batch format /v1/completions with a list of prompts: each a string or token ids; the line's
    # one record answers them all (choices index = prompt * n + sample, as OpenAI numbers them)
    prompt_list: list | None = None
    prompt_ids_list: list[list[int]] | None = None  # filled in by tokenize_into()

    @property
    def prompts_ids(self) -> list[list[int]]:
        """The token ids of every prompt the line runs (one, or each of its prompt list)."""
        return self.prompt_ids_list if self.prompt_ids_list is not None else [self.prompt_ids]

    def with_defaults(self, defaults: dict) -> None:
        """Fill the fields nobody set from the checkpoint's generation_config.json (LLM.generation_defaults)."""
        unset = {k: v for k, v in defaults.items() if k not in self.given}
        if unset:
            self.params = self.params.replace(**unset)

    @property
    def key(self) -> Key:
        return self.id


@dataclasses.dataclass
class LineError:
    line: int
    error: str
    id: str | int | None = None  # the line's own id, when it had a usable one
    fmt: str = "simple"  # the name of the record's format
    code: str = "invalid_request"  # the batch format's error code

    @property
    def key(self) -> Key:
        return self.id if self.id is not None else ("line", self.line)


def is_valid_id(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    return isinstance(rid, int) or (isinstance(rid, str) and rid != "")


def make_sampling_params(base: dict, overrides: dict) -> SamplingParams:
    """SamplingParams from the CLI's fields updated by a line's; errors are ValueErrors naming a field."""
    merged = {**base, **overrides}
    try:
        return SamplingParams.from_dict(merged)
    except (TypeError, OverflowError):  # "temperature": "hot" fails a comparison, a 400-digit integer the
        # conversion to float: find the field to blame
        for name, value in overrides.items():
            try:
                SamplingParams.from_dict({**base, name: value})
            except OverflowError:
                raise ValueError(f"SamplingParams.{name} is out of range, got {value!r}") from None
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.{name} has an invalid type, got {value!r}") from None
        raise ValueError(f"invalid sampling fields {sorted(merged)}") from None
