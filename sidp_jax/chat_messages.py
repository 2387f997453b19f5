"""Chat messages as the chat template gets them, checked once for the offline job, the OpenAI
batch format and LLM.chat alike: roles and contents validated, OpenAI's content forms reduced to
text, and the template variables a request may add."""

from __future__ import annotations

from typing import Any


def normalize_messages(messages: Any, where: str = "'messages'") -> list[dict]:
    """Checked chat messages, each "content" a string: a list of text parts (as OpenAI allows,
    [{"type": "text", "text": ...}]) is joined with newlines and null is empty, as vLLM does.
    `where` names the messages in errors."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise ValueError(f"{where}[{i}] must be an object with a string 'role' and a 'content' "
                             f"(a string, a list of text parts, or null)")
        content = m["content"]
        if isinstance(content, list):
            content = _join_text_parts(content, f"{where}[{i}]['content']")
        elif content is None:  # OpenAI's assistant turn that only called tools; vLLM reads it as empty
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}]['content'] must be a string, a list of text parts or null, "
                             f"got {type(content).__name__}")
        out.append({**m, "content": content})
    return out


def _join_text_parts(parts: list, where: str) -> str:
    if not parts:
        raise ValueError(f"{where} is an empty list of parts")
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"a part of type {kind!r}" if isinstance(kind, str) else "not a {\"type\": \"text\", \"text\": ...} part"
            raise ValueError(f"{where}[{j}] is {what}: only text content is supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}] is a text part without a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


# apply_chat_template's own arguments: a line cannot set them through chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "add_generation_prompt", "tokenize",
                                      "chat_template", "tools", "documents"})


def check_chat_template_kwargs(value: Any, where: str = "'chat_template_kwargs'") -> dict:
    """More variables for the chat template, e.g. {"enable_thinking": false} for Qwen3."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where} must be an object, e.g. {{\"enable_thinking\": false}}")
    reserved = sorted(set(value) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ValueError(f"{where} cannot set {', '.join(reserved)}")
    return dict(value)
