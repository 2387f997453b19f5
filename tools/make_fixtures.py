"""Build the tiny test checkpoints and their reference outputs with torch + transformers.

Run by hand (never in CI, never imported by tests). Nothing is downloaded: the tokenizer is
trained here on the text below and the models are randomly initialised with fixed seeds, so
the output is deterministic for given torch/transformers/tokenizers versions.

Setup (Python 3.11 venv, git-ignored):

    python3.11 -m venv .tools-venv
    . .tools-venv/bin/activate
    PIP_FIND_LINKS=/opt/wheels pip install torch==2.13.0      # CPU wheel
    pip install transformers tokenizers safetensors jinja2

Run (from the repo root):

    python tools/make_fixtures.py [--out REPO_ROOT] [--only NAME[,NAME...]]

--only rebuilds just the named fixtures (checkpoint directory and reference .json/.safetensors)
and leaves every other file alone: chat.json is then not rewritten but checked (the rebuilt
checkpoints must render the conversations exactly as it records), and the tokenizer built here
must be byte-identical to an existing checkpoint's (if it is not, e.g. under other tokenizers or
transformers versions, that checkpoint's tokenizer files are copied instead, so that token ids
stay the same across fixtures). Without --only everything is rebuilt, chat.json included; other
tools' fixtures in the same folders (the FP8 checkpoints, tiny-qwen3-chat-greedy.json) are kept.

Writes, under --out (the repo root by default):

    tests/fixtures/checkpoints/<name>/    config.json, generation_config.json, *.safetensors,
                                         tokenizer.json, tokenizer_config.json [, chat_template.jinja]
                                         (tiny-llama3, tiny-qwen2, tiny-qwen3-moe,
                                         tiny-qwen3-moe-nonorm)
    sidp_jax/assets/tiny-qwen3/          the same for tiny-qwen3, the bundled default model (stored
                                         once: the tests use the package's copy)
    tests/fixtures/reference/<name>.safetensors   logits_<i> f32 [len, vocab], prompt_<i> i32 [len],
                                                  greedy_<i> i32 [16]
    tests/fixtures/reference/<name>.json          prompts, token ids, greedy ids, top-2 gaps, versions
    tests/fixtures/reference/chat.json            chat-template renderings by transformers

for <name> in tiny-llama3 (Llama, llama3 rope scaling, f32, current config form),
tiny-qwen2 (Qwen2, QKV bias, tied embeddings, bf16, legacy config form) and
tiny-qwen3 (Qwen3, head_dim 32, q/k norm, f32, sharded, legacy config form),
tiny-qwen3-moe (Qwen3-MoE: 4 layers, 8 experts, top-2, norm_topk_prob, layer 2 a dense MLP
through mlp_only_layers [2]; f32, sharded, legacy config form as the published Qwen3-30B-A3B has
it: num_experts, rope_theta, torch_dtype) and tiny-qwen3-moe-nonorm (the same without
norm_topk_prob, mlp_only_layers [] and decoder_sparse_step 2, so layers 1 and 3 are MoE and 0 and
2 dense; f32, sharded, transformers 5's config form: num_local_experts, rope_parameters, dtype).
The MoE checkpoints are smaller per layer than tiny-qwen3 (hidden 32, expert width 24, dense
width 96) to stay well under 1 MB. Their experts are stored per expert as in the published
checkpoints, model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight ([out, in] like
nn.Linear) with the router at model.layers.{l}.mlp.gate.weight [E, H] (transformers 5 fuses
them in memory, gate_up_proj [E, 2I, H] and down_proj [E, H, I], and splits them again on save);
check_moe checks the keys, recomputes each MoE block from the files' tensors and checks that the
reloaded fused weights equal the saved ones. Their references run the experts with
experts_implementation="eager" (transformers' per-expert loop), as attention is eager.
All share one byte-level BPE tokenizer (448 ids; models have vocab 512) with Qwen2's exact
pre-tokenizer pipeline, since transformers 5 loads a qwen2 checkpoint's tokenizer as
Qwen2Tokenizer, which rebuilds that pipeline from vocab/merges and ignores tokenizer.json's.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

MAX_NEW_TOKENS = 16
WEIGHT_STD = 0.2  # std of re-drawn weight matrices: final logits std ~1.5
MIN_GAP = 1e-2  # required top-2 logit gap at every greedy step (the brief asks for > 1e-3)
MIN_ROUTER_GAP = 5e-3  # MoE: required gap between the k-th and (k+1)-th router logit at every token
VOCAB_SIZE = 512  # model vocab; the tokenizer has fewer entries (like real padded vocabs)
TOKENIZER_VOCAB = 448
BUNDLED = "tiny-qwen3"  # the package's default model: written to sidp_jax/assets, not tests/fixtures
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS = """\
The lighthouse keeper climbed the narrow stairs every evening at dusk. From the lamp room
he could see the whole bay: the fishing boats coming home, the gulls circling above the
harbour, and the long line of hills that turned blue and then grey as the light faded.
He wrote the weather in a small notebook, the wind, the clouds, the height of the waves,
and whether any ship had passed the point before the lamp was lit.

In the town below, the baker opened her shop before sunrise. The smell of fresh bread drifted
along the street, and the first customers were always the same: the postman, two students
who studied late into the night, and an old man who bought one roll and read the newspaper
on the bench outside. She knew their names, their habits, and what they would order.

A computer program is a list of instructions that tells a machine what to do. Programs read
input, compute values, and write output. A language model is a program that predicts the
next word in a sentence. It reads a sequence of tokens, turns each token into a vector of
numbers, and passes those vectors through many layers. At the end it assigns a score to
every word in its vocabulary, and the word with the highest score is often the next one.

Questions are answered more easily when they are clear. What is the capital of France?
How many legs does a spider have? Why is the sky blue during the day and red at sunset?
Good answers are short, correct, and polite. Thank you for asking, and have a nice day!
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 also appear in text, as do dates and times.
"""

# Qwen2.5-style ChatML template (tools, tool calls and tool responses), with a default
# system message and an explicit error for unknown roles.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role != "system" %}
        {{- raise_exception('Unexpected message role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (température en °C).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. São Paulo"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS: list[dict] = [
    {"name": "single_user", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {
        "name": "system_and_user",
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in one word."},
            {"role": "user", "content": "How many legs does a spider have?"},
        ],
    },
    {
        "name": "multi_turn_no_system",
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi there. How can I help you today?"},
            {"role": "user", "content": "Why is the sky blue during the day?"},
            {"role": "assistant", "content": "Because air scatters blue light more than red light."},
            {"role": "user", "content": "And why is it red at sunset?"},
        ],
    },
    {
        "name": "unicode_multi_turn_system",
        "messages": [
            {"role": "system", "content": "Tu es un assistant poli. Réponds en français — s'il te plaît."},
            {"role": "user", "content": "Grüße aus Zürich! 你好，世界 🌍 naïve café ☕"},
            {"role": "assistant", "content": "Bonjour ! Ça va très bien, merci. 😊"},
            {"role": "user", "content": "  Leading and trailing spaces\n\nand a blank line.  "},
        ],
    },
    {
        "name": "tool_call_round_trip",
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "What's the weather like in São Paulo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "São Paulo", "unit": "celsius"}},
                    }
                ],
            },
            {"role": "tool", "content": '{"temperature": 23, "condition": "ensolarado ☀"}'},
            {"role": "tool", "content": '{"humidity": "61%"}'},
        ],
    },
    {
        "name": "assistant_last_with_system_mid",
        "messages": [
            {"role": "user", "content": "Write a haiku about the sea."},
            {"role": "system", "content": "Keep it under twenty words."},
            {
                "role": "assistant",
                "content": "Grey waves fold and break,\ngulls hang on the salted wind,\nthe lamp wakes at dusk.",
            },
        ],
    },
]

# Prompts per checkpoint: (short, medium, long); each must tokenize to 5..40 tokens.
PROMPTS: dict[str, list[str]] = {
    "tiny-llama3": [
        "The lighthouse keeper",
        "A language model predicts the next word.",
        "In the town below, the baker opened her shop before sunrise. Bread!",
    ],
    "tiny-qwen2": [
        "What is the capital of France?",
        "Grüße aus Zürich! 🌍 Good day.",
        "Programs read input, compute values, and write output. Numbers such as 42 and 2024 appear.",
    ],
    "tiny-qwen3": [
        "Hello, world!",
        "How many legs does a spider have?",
        # chat-formatted prompt (special tokens inside the text)
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    ],
}
PROMPTS["tiny-qwen3-moe"] = PROMPTS["tiny-qwen3-moe-nonorm"] = PROMPTS["tiny-qwen3"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SEED_BASE = {"tiny-qwen3-moe": 2000, "tiny-qwen3-moe-nonorm": 3000}  # the others: 1000

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    hidden_act="silu",
)

MOE_COMMON = dict(  # COMMON's heads, vocabulary and positions; smaller layers, more of them
    COMMON,
    hidden_size=32,
    intermediate_size=96,  # the dense layers' MLP
    moe_intermediate_size=24,  # each expert's
    num_hidden_layers=4,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    attention_bias=False,
)
MOE_VARIANTS = {  # layer l is MoE iff l not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0
    "tiny-qwen3-moe": dict(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2]),
    "tiny-qwen3-moe-nonorm": dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[]),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on CORPUS and wrap it as a transformers fast tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline: transformers 5 rebuilds it from vocab/merges when it loads a
    # checkpoint whose model_type maps to Qwen2Tokenizer, so anything else would diverge.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p for p in CORPUS.split("\n\n")], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def randomize_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Re-draw every parameter: matrices N(0, std), norm weights 1 + 0.2 N, biases 0.3 N."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif p.ndim == 2 or (p.ndim == 3 and ".experts." in name):  # MoE experts: fused [E, out, in]
                p.copy_(std * noise)
            else:
                raise ValueError(f"unexpected parameter {name} {tuple(p.shape)}")


def to_legacy_config(path: Path) -> None:
    """Rewrite config.json from the current form (rope_parameters, dtype) to the legacy one
    (rope_theta, rope_scaling: null, torch_dtype), as older checkpoints on the Hub have it."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        assert rope.get("rope_type", "default") == "default", rope
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if "num_local_experts" in cfg:  # transformers 5's name; the published Qwen3-MoE configs say num_experts
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg.pop("layer_types", None)  # all full attention; derived by transformers when absent
    (path / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def make_model(name: str, ids: dict[str, int]):
    """Build (model, save dtype, save kwargs, legacy?, generation config, chat template in jinja file?)."""
    special = dict(bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    if name == "tiny-llama3":
        cfg = LlamaConfig(
            **COMMON,
            **special,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = LlamaForCausalLM(cfg)
        gen = GenerationConfig(
            bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
            do_sample=True, temperature=0.6, top_p=0.9,
        )
        return model, torch.float32, {}, False, gen, True
    if name == "tiny-qwen2":
        cfg = Qwen2Config(**COMMON, **special, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0)
        model = Qwen2ForCausalLM(cfg)
        gen = GenerationConfig(
            bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT],
            do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
        )
        return model, torch.bfloat16, {}, True, gen, False
    if name == "tiny-qwen3":
        cfg = Qwen3Config(
            **COMMON, **special, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_theta=1000000.0, attention_bias=False,
        )
        model = Qwen3ForCausalLM(cfg)
        gen = GenerationConfig(eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], do_sample=True,
                               temperature=0.6, top_p=0.95, top_k=20)
        return model, torch.float32, {"max_shard_size": "300KB"}, True, gen, True
    if name in MOE_VARIANTS:
        cfg = Qwen3MoeConfig(**MOE_COMMON, **MOE_VARIANTS[name], **special)
        model = Qwen3MoeForCausalLM(cfg)
        gen = GenerationConfig(eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], do_sample=True,
                               temperature=0.6, top_p=0.95, top_k=20)
        # save_original_format: experts per expert, as published (check_moe asserts it)
        save_kw = {"max_shard_size": "200KB", "save_original_format": True}
        return model, torch.float32, save_kw, name == "tiny-qwen3-moe", gen, True
    raise KeyError(name)


def load_reference(path: Path, **kwargs):
    """The checkpoint as transformers loads it for the references: f32, eager attention and experts."""
    if json.loads((path / "config.json").read_text())["model_type"] == "qwen3_moe":
        kwargs["experts_implementation"] = "eager"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs)


def is_moe_layer(cfg, layer: int) -> bool:
    return layer not in cfg.mlp_only_layers and cfg.num_experts > 0 and (layer + 1) % cfg.decoder_sparse_step == 0


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safetensors.safe_open(str(shard), "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def router_margin(model, seqs: list[list[int]]) -> tuple[float, dict[int, list[int]]]:
    """Smallest gap between the k-th and (k+1)-th router logit over every token of seqs, and how
    often each expert is picked per MoE layer (routing must be neither tied nor trivial)."""
    cfg, k, margins, counts, hooks = model.config, model.config.num_experts_per_tok, [], {}, []
    for l, layer in enumerate(model.model.layers):
        if is_moe_layer(cfg, l):
            counts[l] = [0] * cfg.num_experts

            def hook(module, args, out, l=l):
                top = torch.topk(out[0].float(), k + 1, dim=-1)
                margins.append(float((top.values[:, k - 1] - top.values[:, k]).min()))
                for e in top.indices[:, :k].flatten().tolist():
                    counts[l][e] += 1

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        for seq in seqs:
            forward_logits(model, seq)
    finally:
        for h in hooks:
            h.remove()
    return min(margins), counts


def check_moe(name: str, path: Path, saved: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """The checkpoint's experts are stored per expert ([out, in] like nn.Linear, as in the published
    Qwen3-MoE checkpoints), reload into exactly the fused weights that were saved, and one MoE block
    recomputed by hand from the files' tensors gives transformers' output."""
    cfg, files = loaded.config, read_checkpoint(path)
    H, I, Id, E, k = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.num_experts,
                      cfg.num_experts_per_tok)
    kinds = []
    for l in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{l}.mlp."
        got = {key: list(t.shape) for key, t in files.items() if key.startswith(prefix)}
        if is_moe_layer(cfg, l):
            want = {prefix + "gate.weight": [E, H]}
            for e in range(E):
                want |= {f"{prefix}experts.{e}.gate_proj.weight": [I, H], f"{prefix}experts.{e}.up_proj.weight": [I, H],
                         f"{prefix}experts.{e}.down_proj.weight": [H, I]}
        else:
            want = {prefix + "gate_proj.weight": [Id, H], prefix + "up_proj.weight": [Id, H],
                    prefix + "down_proj.weight": [H, Id]}
        assert got == want, (name, l, sorted(set(got) ^ set(want)))
        kinds.append("moe" if is_moe_layer(cfg, l) else "dense")
    assert "moe" in kinds and "dense" in kinds, kinds
    assert {n for n, p in saved.named_parameters() if p.ndim == 3} == {
        n for n, p in loaded.named_parameters() if p.ndim == 3} != set(), "experts are not fused in memory"
    loaded_sd = loaded.state_dict()
    for key, value in saved.state_dict().items():  # the per-expert round trip, fused again on load
        assert torch.equal(value, loaded_sd[key]), (name, key)

    gen = torch.Generator().manual_seed(0)
    for l, kind in enumerate(kinds):
        if kind != "moe":
            continue
        prefix = f"model.layers.{l}.mlp."
        x = torch.randn(1, 24, H, generator=gen)
        with torch.no_grad():
            want = loaded.model.layers[l].mlp(x)[0]
        # Qwen3-MoE's router: softmax in f32 over all experts, top-k, renormalised iff norm_topk_prob
        probs = torch.softmax((x[0] @ files[prefix + "gate.weight"].T).float(), dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        if cfg.norm_topk_prob:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        got = torch.zeros_like(x[0])
        for t in range(x.shape[1]):
            for w, e in zip(top_p[t].tolist(), top_i[t].tolist()):
                ex = lambda proj: files[f"{prefix}experts.{e}.{proj}_proj.weight"]  # noqa: E731
                h = torch.nn.functional.silu(ex("gate") @ x[0, t]) * (ex("up") @ x[0, t])
                got[t] += w * (ex("down") @ h)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, l, float((got - want).abs().max()))
    print(f"  {name}: layers {kinds}, per-expert keys, round trip and by-hand MoE blocks match")


def forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def reference_for(model, prompt_ids: list[int]) -> dict:
    """Prefill logits, transformers' greedy continuation, and its top-2 gaps (checked by a no-cache loop)."""
    model.generation_config = GenerationConfig()  # no eos, no sampling defaults from the checkpoint
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0,
        )
    greedy = out[0, len(prompt_ids):].tolist()
    assert len(greedy) == MAX_NEW_TOKENS, greedy
    seq, gaps = list(prompt_ids), []
    for tok in greedy:
        last = forward_logits(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        gaps.append(float(top2[0] - top2[1]))
        assert int(last.argmax()) == tok, "no-cache greedy disagrees with generate()"
        seq.append(tok)
    return {"logits": forward_logits(model, prompt_ids), "greedy": greedy, "gaps": gaps}


def save_tokenizer(tok: PreTrainedTokenizerFast, path: Path, jinja_file: bool, source: Path | None = None) -> None:
    """Save tok, or copy the tokenizer files of the checkpoint at source (see main)."""
    if source is None:
        tok.save_pretrained(path, save_jinja_files=jinja_file)
    else:
        for f in TOKENIZER_FILES:
            if (source / f).exists():
                shutil.copyfile(source / f, path / f)
    assert (path / "chat_template.jinja").exists() == jinja_file
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert ("chat_template" in cfg) == (not jinja_file)


def build_checkpoint(name: str, ckpt_dir: Path, ref_dir: Path, tok: PreTrainedTokenizerFast, ids: dict,
                     tok_source: Path | None = None) -> dict:
    prompt_ids = [tok.encode(t, add_special_tokens=False) for t in PROMPTS[name]]
    for p in prompt_ids:
        assert 5 <= len(p) <= 40, (name, len(p))
    base = SEED_BASE.get(name, 1000)
    for seed in range(base, base + 100):
        torch.manual_seed(seed)
        model, save_dtype, save_kw, legacy, gen_cfg, jinja_file = make_model(name, ids)
        randomize_(model, seed, std=WEIGHT_STD)
        model = model.to(save_dtype)
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        model.generation_config = gen_cfg
        model.save_pretrained(ckpt_dir, **save_kw)
        save_tokenizer(tok, ckpt_dir, jinja_file, source=tok_source)

        raw = tokenizers.Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
        for loaded in (AutoTokenizer.from_pretrained(ckpt_dir), raw):  # AutoTokenizer may pick Qwen2Tokenizer
            got = [loaded.encode(t, add_special_tokens=False) for t in PROMPTS[name]]
            assert [getattr(g, "ids", g) for g in got] == prompt_ids, (name, type(loaded))

        ref_model = load_reference(ckpt_dir)
        ref_model.eval()
        refs = [reference_for(ref_model, p) for p in prompt_ids]
        min_gap = min(min(r["gaps"]) for r in refs)
        if name in MOE_VARIANTS:
            margin, counts = router_margin(ref_model, [p + r["greedy"] for p, r in zip(prompt_ids, refs)])
            if margin <= MIN_ROUTER_GAP:
                print(f"  {name}: seed {seed} has a router top-k margin of {margin:.2e}; retrying")
                continue
        if min_gap > MIN_GAP:
            break
        print(f"  {name}: seed {seed} has min top-2 gap {min_gap:.2e}; retrying")
    else:
        raise RuntimeError(f"no seed gives a top-2 gap > {MIN_GAP} for {name}")

    if legacy:
        to_legacy_config(ckpt_dir)
        reloaded = load_reference(ckpt_dir)
        for p, r in zip(prompt_ids, refs):
            assert torch.equal(forward_logits(reloaded, p), r["logits"]), f"{name}: legacy config changes logits"

    if name == "tiny-llama3":  # the llama3 rope scaling must matter at these prompt lengths
        cfg = AutoConfig.from_pretrained(ckpt_dir)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
        plain = AutoModelForCausalLM.from_pretrained(
            ckpt_dir, config=cfg, dtype=torch.float32, attn_implementation="eager")
        diff = (forward_logits(plain, prompt_ids[-1]) - refs[-1]["logits"]).abs().max()
        assert diff > 0.1, f"llama3 rope scaling changes logits by only {diff}"
    check_checkpoint_files(name, ckpt_dir)
    if name in MOE_VARIANTS:
        check_moe(name, ckpt_dir, model, load_reference(ckpt_dir))
        print(f"  {name}: router top-k margin {margin:.4f}, experts picked per MoE layer {counts}")
    tensors: dict[str, torch.Tensor] = {}
    for i, (p, r) in enumerate(zip(prompt_ids, refs)):
        tensors[f"logits_{i}"] = r["logits"].contiguous()
        tensors[f"prompt_{i}"] = torch.tensor(p, dtype=torch.int32)
        tensors[f"greedy_{i}"] = torch.tensor(r["greedy"], dtype=torch.int32)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"format": "pt"})
    logits_std = [float(r["logits"].std()) for r in refs]
    meta = {
        "name": name,
        "checkpoint": checkpoint_path(name),
        "model_class": type(ref_model).__name__,
        "seed": seed,
        "checkpoint_dtype": str(save_dtype).removeprefix("torch."),
        "reference_dtype": "float32",
        "attn_implementation": "eager",
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": [
            {
                "text": t,
                "token_ids": p,
                "greedy_token_ids": r["greedy"],
                "greedy_text": tok.decode(r["greedy"], skip_special_tokens=True),
                "top2_gaps": [round(g, 6) for g in r["gaps"]],
                "min_top2_gap": min(r["gaps"]),
                "logits_std": s,
            }
            for t, p, r, s in zip(PROMPTS[name], prompt_ids, refs, logits_std)
        ],
        "min_top2_gap": min_gap,
        "versions": versions(),
    }
    (ref_dir / f"{name}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"{name}: seed {seed}, min top-2 gap {min_gap:.4f}, logits std {[round(s, 2) for s in logits_std]}")
    return meta


def checkpoint_path(name: str) -> str:
    """Where checkpoint `name` goes, relative to the repo root: tiny-qwen3, the bundled default
    model, straight into the package (the tests read it there), the others under tests/fixtures."""
    return f"sidp_jax/assets/{name}" if name == BUNDLED else f"tests/fixtures/checkpoints/{name}"


def check_checkpoint_files(name: str, path: Path) -> None:
    files = sorted(p.name for p in path.iterdir())
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files), files
    shards = [f for f in files if f.endswith(".safetensors")]
    keys: set[str] = set()
    for s in shards:
        with safetensors.safe_open(str(path / s), "pt") as f:
            keys |= set(f.keys())
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            assert dtypes == ({"BF16"} if name == "tiny-qwen2" else {"F32"}), (name, dtypes)
    if name == "tiny-qwen3":
        assert len(shards) >= 3 and "model.safetensors.index.json" in files, files
    if name in MOE_VARIANTS:
        assert len(shards) >= 2 and "model.safetensors.index.json" in files, files
    if name == "tiny-qwen2":
        assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.bias" in keys
    print(f"  {name}: {files}")


def chat_fixture(tok_dirs: dict[str, Path]) -> dict:
    """Render every conversation with each checkpoint's saved tokenizer; they must all agree."""
    entries = []
    loaded = {n: AutoTokenizer.from_pretrained(d) for n, d in tok_dirs.items()}
    for conv in CONVERSATIONS:
        kwargs = {"tools": conv["tools"]} if "tools" in conv else {}
        results = []
        for t in loaded.values():
            results.append({
                "text_add_generation_prompt_true": t.apply_chat_template(
                    conv["messages"], add_generation_prompt=True, tokenize=False, **kwargs),
                "text_add_generation_prompt_false": t.apply_chat_template(
                    conv["messages"], add_generation_prompt=False, tokenize=False, **kwargs),
                "ids_add_generation_prompt_true": list(t.apply_chat_template(
                    conv["messages"], add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)),
            })
        assert all(r == results[0] for r in results), conv["name"]
        text = results[0]["text_add_generation_prompt_true"]
        direct = next(iter(loaded.values())).encode(text, add_special_tokens=False)
        assert results[0]["ids_add_generation_prompt_true"] == direct, conv["name"]
        entries.append({**conv, **results[0]})
    return {
        "note": "All checkpoints share one tokenizer and chat template, so each conversation is rendered once "
                "(checked identical across checkpoints). Rendered with transformers' apply_chat_template; "
                "messages' null fields are dropped by transformers before rendering.",
        "checkpoints": sorted(tok_dirs),
        "chat_template": CHAT_TEMPLATE,
        "conversations": entries,
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent, help="repo root")
    parser.add_argument("--only", metavar="NAME[,NAME...]",
                        help=f"rebuild only these fixtures, leaving all other files alone; of {', '.join(PROMPTS)}")
    args = parser.parse_args()
    names = list(PROMPTS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROMPTS]
    if unknown or not names:
        parser.error(f"--only: unknown fixture(s) {unknown}; known: {', '.join(PROMPTS)}")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    ckpt_root = args.out / "tests" / "fixtures" / "checkpoints"
    ref_dir = args.out / "tests" / "fixtures" / "reference"
    ckpt_dirs = {name: args.out / checkpoint_path(name) for name in PROMPTS}
    for d in (ckpt_root, ref_dir):  # build_checkpoint replaces each checkpoint's directory
        d.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    # Kept checkpoints (--only) fix the tokenizer: this one must be byte-identical to theirs, or
    # theirs is copied (and used to tokenize) so that token ids agree across all fixtures.
    kept = sorted((n for n in PROMPTS if n not in names and (ckpt_dirs[n] / "tokenizer.json").exists()),
                  key=lambda n: n != BUNDLED)
    tok_source = None
    if kept:
        ref_tok = ckpt_dirs[kept[0]]
        with tempfile.TemporaryDirectory() as tmp:
            save_tokenizer(tok, Path(tmp), jinja_file=(ref_tok / "chat_template.jinja").exists())
            differ = [f for f in TOKENIZER_FILES if (Path(tmp) / f).exists() != (ref_tok / f).exists()
                      or ((ref_tok / f).exists() and not filecmp.cmp(Path(tmp) / f, ref_tok / f, shallow=False))]
        if differ:
            print(f"tokenizer: {differ} differ from {kept[0]}'s; copying {kept[0]}'s tokenizer files instead")
            tok_source = ref_tok
            tok = PreTrainedTokenizerFast(tokenizer_file=str(ref_tok / "tokenizer.json"), eos_token=IM_END,
                                          pad_token=ENDOFTEXT, additional_special_tokens=[IM_START, IM_END])
        else:
            print(f"tokenizer: byte-identical to {kept[0]}'s")
    ids = {t: tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)}
    print(f"tokenizer: {len(tok)} entries, special ids {ids}")
    sample = "Grüße 你好 🌍 — the lighthouse keeper."
    assert tok.decode(tok.encode(sample)) == sample

    metas = {name: build_checkpoint(name, ckpt_dirs[name], ref_dir, tok, ids, tok_source) for name in names}
    if args.only is None:
        chat = chat_fixture(ckpt_dirs)
        (ref_dir / "chat.json").write_text(json.dumps(chat, indent=2, ensure_ascii=False) + "\n")
    elif (ref_dir / "chat.json").exists():  # not rewritten: the rebuilt checkpoints must render as it records
        recorded = json.loads((ref_dir / "chat.json").read_text())["conversations"]
        rendered = chat_fixture({n: ckpt_dirs[n] for n in names})["conversations"]
        assert rendered == recorded, "the rebuilt checkpoints render the conversations unlike chat.json"
        print(f"chat.json: {', '.join(names)} render its {len(recorded)} conversations identically")

    print(f"min top-2 gap over all fixtures: {min(m['min_top2_gap'] for m in metas.values()):.4f}")


if __name__ == "__main__":
    main()
