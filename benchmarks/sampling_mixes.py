"""The sampling mixes the benchmarks run, by name: what users send, each alone, and all mixed.

`default` is the model's own: the checkpoint's generation_config.json, or for a preset the one its
released checkpoint ships (models/config.py::PRESET_GENERATION_DEFAULTS; Qwen3: temperature 0.6,
top_k 20, top_p 0.95). Every sampled mix is seeded per request, so reruns draw the same tokens.
"""

from __future__ import annotations

MIXES: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "temperature_1": {"temperature": 1.0},
    "top_p_0.9": {"temperature": 1.0, "top_p": 0.9},
    "top_k_50": {"temperature": 1.0, "top_k": 50},
    "min_p_0.05": {"temperature": 1.0, "min_p": 0.05},
    "logprobs_5": {"temperature": 1.0, "logprobs": 5},
    "penalties": {"temperature": 1.0, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    "logit_bias": {"temperature": 1.0, "logit_bias": {11: 5.0, 22: -5.0, 33: 2.0, 44: -100.0}},
}
# Structured output (issue: JSON schema at batch speed): the model's default sampling, constrained
# by a schema with nested objects and enums. Not part of "mixed"; its rows carry "structured": true.
STRUCTURED_SCHEMA = {"type": "object", "additionalProperties": False,
                     "required": ["name", "kind", "scores", "owner"],
                     "properties": {"name": {"type": "string", "maxLength": 24},
                                    "kind": {"enum": ["tool", "dataset", "model", "paper"]},
                                    "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 100}, "maxItems": 8},
                                    "owner": {"type": "object", "additionalProperties": False,
                                              "required": ["org", "verified"],
                                              "properties": {"org": {"type": "string", "maxLength": 16},
                                                             "verified": {"type": "boolean"}}}}}
STRUCTURED = {"structured_json": {"structured_outputs": {"json": STRUCTURED_SCHEMA}}}
NAMES = ["greedy", "default", *[m for m in MIXES if m != "greedy"], "mixed", *STRUCTURED]


def mix_fields(name: str, defaults: dict, index: int) -> dict:
    """SamplingParams fields of request `index` under mix `name` (mixed: the requests cycle
    through every other mix, the model's default included)."""
    if name == "mixed":
        cycle = [n for n in NAMES if n != "mixed" and n not in STRUCTURED]
        return mix_fields(cycle[index % len(cycle)], defaults, index)
    if name in STRUCTURED:  # the model's default sampling, constrained
        fields = {**defaults, **STRUCTURED[name]}
    else:
        fields = dict(defaults) if name == "default" else dict(MIXES[name])
    if fields.get("temperature", 1.0) > 0:
        fields["seed"] = index
    return fields


def parse(names: str) -> list[str]:
    out = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in out if n not in NAMES]
    if bad:
        raise SystemExit(f"unknown sampling mix(es) {bad}; known: {', '.join(NAMES)}")
    return out
