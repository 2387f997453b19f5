"""Tokenizer and chat template of a Hugging Face-format checkpoint directory.

Reads ``tokenizer.json`` (with the ``tokenizers`` library), ``tokenizer_config.json``,
``chat_template.jinja`` / ``chat_templates/*.jinja`` and ``generation_config.json``, and renders
chat templates the way transformers does (same jinja2 environment), without torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers

from sidp_jax.loading.bounded_jinja import BoundedSandbox, render

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERATION_DEFAULT_KEYS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "max_length",
)


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """Raised by a chat template through ``raise_exception(message)``."""


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` block and renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Unlike jinja's own filter: no HTML escaping, non-ASCII kept (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken dict."""
    return value.get("content") if isinstance(value, Mapping) else value


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Text <-> token ids, chat templates, eos ids and sampling defaults of one checkpoint."""

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str] | None = None,
                 chat_templates: Mapping[str, str] | None = None, generation_config: Mapping[str, Any] | None = None,
                 clean_up_tokenization_spaces: bool = False, source: str = "<memory>") -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = dict(chat_templates or {})  # name -> template; a single one is "default"
        self._generation_config = dict(generation_config or {})
        # transformers 5 skips this clean-up for BPE models (it corrupts their output)
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory; chat_template.jinja (and chat_templates/) win over tokenizer_config."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            what = "directory does not exist" if not path.is_dir() else "no tokenizer.json in it"
            raise FileNotFoundError(f"cannot load a tokenizer from {path}: {what} "
                                    "(a Hugging Face `tokenizers` tokenizer.json is required)")
        config = _read_json(path / "tokenizer_config.json")
        special = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _token_str(config.get(k))) is not None}

        templates: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if (path / "chat_templates").is_dir():
            for f in sorted((path / "chat_templates").glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if not templates:
            entry = config.get("chat_template")
            if isinstance(entry, str):
                templates["default"] = entry
            elif isinstance(entry, list):
                templates = {t["name"]: t["template"] for t in entry}

        generation = _read_json(path / "generation_config.json")
        if not (path / "generation_config.json").is_file():  # transformers derives it from config.json
            generation = {k: v for k, v in _read_json(path / "config.json").items() if k == "eos_token_id"}
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises plain Exceptions on a corrupt file
            raise ValueError(f"{tokenizer_file} could not be loaded as a Hugging Face tokenizer: {e}") from None
        return cls(backend, special_tokens=special,
                   chat_templates=templates, generation_config=generation,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                   source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (a model's vocab may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config's eos ids (in order), then tokenizer_config's eos token if not among them."""
        ids = _as_id_list(self._generation_config.get("eos_token_id"))
        eos = self.special_tokens.get("eos_token")
        eos_id = self.backend.token_to_id(eos) if eos is not None else None
        return ids + [eos_id] if eos_id is not None and eos_id not in ids else ids

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json (temperature, top_p, top_k, ...), as given there."""
        return {k: self._generation_config[k] for k in GENERATION_DEFAULT_KEYS if k in self._generation_config}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template to use: ``chat_template`` (a template or a template's name) or the checkpoint's default."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise ValueError(f"{self.source} has several chat templates and no default one "
                             f"({sorted(self.chat_templates)}); pass chat_template=<name or template>")
        raise ValueError(f"{self.source} has no chat template (no chat_template.jinja, no 'chat_template' in "
                         "tokenizer_config.json); pass chat_template=<jinja template> to supply one")

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], *, chat_template: str | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **template_kwargs: Any) -> str | list[int]:
        """Render a conversation (list of {"role", "content", ...}) as transformers does; ids if tokenize."""
        if len(conversation) == 0:
            raise ValueError("cannot apply a chat template to an empty conversation")
        template = _compile(self.get_chat_template(chat_template, tools))
        # as transformers: keys whose value is None are dropped from each message
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in conversation]
        variables = {**self.special_tokens, **template_kwargs}  # explicit kwargs override special tokens
        text = render(template, messages=messages, tools=tools, documents=documents,
                      add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text) if tokenize else text
