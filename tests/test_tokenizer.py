"""sidp_jax.loading.tokenizer against the transformers-made fixtures (tools/make_fixtures.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from sidp_jax.loading.tokenizer import ChatTemplateError, Tokenizer

from fixture_paths import checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CHECKPOINTS = ("tiny-llama3", "tiny-qwen2", "tiny-qwen3")
CHAT = json.loads((FIXTURES / "reference" / "chat.json").read_text(encoding="utf-8"))
CONVERSATIONS = CHAT["conversations"]


def ckpt(name: str) -> Path:
    return Path(checkpoint(name))


def reference(name: str) -> dict:
    return json.loads((FIXTURES / "reference" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=CHECKPOINTS)
def named_tok(request) -> tuple[str, Tokenizer]:
    return request.param, Tokenizer.from_dir(ckpt(request.param))


def tokenizer_dir(tmp_path: Path, config: dict, **files: str) -> Path:
    """A directory with the fixtures' tokenizer.json, the given tokenizer_config and extra files."""
    shutil.copy(ckpt("tiny-qwen3") / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (tmp_path / name.replace("__", "/")).parent.mkdir(exist_ok=True)
        (tmp_path / name.replace("__", "/")).write_text(text)
    return tmp_path


# ----- encode / decode -----

def test_encode_decode_match_reference(named_tok):
    name, tok = named_tok
    ref = reference(name)
    tensors = load_file(str(FIXTURES / "reference" / f"{name}.safetensors"))
    for i, p in enumerate(ref["prompts"]):
        assert tok.encode(p["text"]) == p["token_ids"]
        assert tensors[f"prompt_{i}"].tolist() == p["token_ids"]
        assert tok.decode(p["token_ids"], skip_special_tokens=False) == p["text"]
        assert tok.decode(p["greedy_token_ids"]) == p["greedy_text"]


def test_special_tokens_encode_as_single_ids():
    tok = Tokenizer.from_dir(ckpt("tiny-qwen3"))
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids) == "user\nHi"  # skip_special_tokens=True by default
    assert tok.vocab_size == len(json.loads((ckpt("tiny-qwen3") / "tokenizer.json").read_text())["model"]["vocab"])


# ----- chat templates -----

@pytest.mark.parametrize("conv", CONVERSATIONS, ids=[c["name"] for c in CONVERSATIONS])
def test_chat_template_matches_transformers(named_tok, conv):
    _, tok = named_tok
    kwargs = {"tools": conv["tools"]} if "tools" in conv else {}
    msgs = conv["messages"]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, **kwargs) == conv["text_add_generation_prompt_true"]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, **kwargs) == conv["text_add_generation_prompt_false"]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kwargs)
    assert ids == conv["ids_add_generation_prompt_true"]


def test_chat_template_file_forms():
    # both storage forms occur among the fixtures, with the same template
    assert (ckpt("tiny-llama3") / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((ckpt("tiny-llama3") / "tokenizer_config.json").read_text())
    assert not (ckpt("tiny-qwen2") / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((ckpt("tiny-qwen2") / "tokenizer_config.json").read_text())
    for name in CHECKPOINTS:
        assert Tokenizer.from_dir(ckpt(name)).get_chat_template() == CHAT["chat_template"]


def test_chat_template_jinja_file_wins(tmp_path):
    d = tokenizer_dir(tmp_path, {"eos_token": "<|im_end|>", "chat_template": "WRONG"},
                      **{"chat_template.jinja": CHAT["chat_template"]})
    conv = CONVERSATIONS[0]
    assert Tokenizer.from_dir(d).apply_chat_template(conv["messages"]) == conv["text_add_generation_prompt_true"]


def test_chat_template_list_form_and_named_templates(tmp_path):
    templates = [{"name": "default", "template": CHAT["chat_template"]},
                 {"name": "tool_use", "template": "TOOLS{{ tools | length }}"},
                 {"name": "short", "template": "{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"}]
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, {"chat_template": templates}))
    conv = CONVERSATIONS[1]
    assert tok.apply_chat_template(conv["messages"]) == conv["text_add_generation_prompt_true"]
    assert tok.apply_chat_template(conv["messages"], tools=[{"a": 1}]) == "TOOLS1"
    assert tok.apply_chat_template(conv["messages"][:1], chat_template="short") == "system:" + \
        conv["messages"][0]["content"] + "|"
    # a literal template passed in wins too
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages[0].content }}!") == "x!"


def test_chat_templates_directory(tmp_path):
    d = tokenizer_dir(tmp_path, {}, **{"chat_template.jinja": "D", "chat_templates__rag.jinja": "R"})
    tok = Tokenizer.from_dir(d)
    assert tok.chat_templates == {"default": "D", "rag": "R"}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="rag") == "R"


def test_template_variables_filters_and_globals(tmp_path):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, {"eos_token": {"content": "<|im_end|>", "special": True},
                                                     "pad_token": "<|endoftext|>", "bos_token": None}))
    msgs = [{"role": "user", "content": "héllo", "extra": None}]
    tpl = ("{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ messages[0] | tojson }}|"
           "{{ messages[0].extra is defined }}|{{ tools is none }}|{{ greeting }}")
    out = tok.apply_chat_template(msgs, chat_template=tpl, greeting="hi")
    assert out == 'False|<|im_end|>|<|endoftext|>|{"role": "user", "content": "héllo"}|False|True|hi'
    assert tok.apply_chat_template(msgs, chat_template="{{ eos_token }}", eos_token="E") == "E"
    data = {"b": [1, 2], "ü": "ß"}
    assert tok.apply_chat_template(msgs, chat_template="{{ d | tojson(indent=2) }}", d=data) == \
        json.dumps(data, indent=2, ensure_ascii=False)
    # trim_blocks / lstrip_blocks, loop controls, {% generation %} blocks, strftime_now
    tpl = "  {% for m in [1, 2, 3] %}\n{% if m == 2 %}{% continue %}{% endif %}{{ m }}{% endfor %}\n"
    assert tok.apply_chat_template(msgs, chat_template=tpl) == "13"
    assert tok.apply_chat_template(msgs, chat_template="{% generation %}A{% endgeneration %}B") == "AB"
    assert len(tok.apply_chat_template(msgs, chat_template="{{ strftime_now('%Y') }}")) == 4


# ----- eos and generation defaults -----

def test_eos_ids_and_generation_defaults():
    llama, qwen2, qwen3 = (Tokenizer.from_dir(ckpt(n)) for n in CHECKPOINTS)
    im_end, endoftext = llama.token_to_id("<|im_end|>"), llama.token_to_id("<|endoftext|>")
    assert llama.eos_token_ids == [im_end, endoftext]  # list form in generation_config.json
    assert qwen3.eos_token_ids == [im_end]  # int form, same as tokenizer_config's eos
    assert llama.generation_defaults == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert qwen2.generation_defaults == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                         "repetition_penalty": 1.05}


def test_eos_union_with_tokenizer_config(tmp_path):
    d = tokenizer_dir(tmp_path, {"eos_token": "<|im_end|>"}, **{"generation_config.json": '{"eos_token_id": 0}'})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == [0, tok.token_to_id("<|im_end|>")]
    assert tok.generation_defaults == {}
    (d / "generation_config.json").unlink()
    (d / "config.json").write_text('{"eos_token_id": [0, 1]}')
    assert Tokenizer.from_dir(d).eos_token_ids == [0, 1, tok.token_to_id("<|im_end|>")]


# ----- errors -----

def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, {"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}") == "hi"


def test_template_raise_exception_and_empty_conversation():
    tok = Tokenizer.from_dir(ckpt("tiny-qwen3"))
    with pytest.raises(ChatTemplateError, match="Unexpected message role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="Unexpected message role"):  # ChatTemplateError is a ValueError
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])


# ----- packaging -----

def test_bundled_asset_is_the_tiny_qwen3_fixture():
    # One copy: the tests run the package's bundled default model, so they test what ships.
    from sidp_jax.llm import BUNDLED_MODEL

    asset = Path(BUNDLED_MODEL)
    assert asset.resolve() == ckpt("tiny-qwen3").resolve() == (ROOT / "sidp_jax" / "assets" / "tiny-qwen3").resolve()
    assert not (FIXTURES / "checkpoints" / "tiny-qwen3").exists()
    files = sorted(p.name for p in asset.iterdir())
    assert all((asset / f).is_file() for f in files)  # what package-data's "assets/*/*" installs
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(files)


def test_runtime_imports_neither_torch_nor_transformers():
    code = ("import sys, sidp_jax.loading.tokenizer; bad = {'torch', 'transformers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("tpl,why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),
    ("{% for i in range(100000) %}{% for j in range(1000) %}{{ 'xxxxxxxxxx' }}{% endfor %}{% endfor %}",
     "output passed|took more than"),
    ("{{ 'x' * 1000000000 }}", "builds a sequence"),
    ("{{ 10 ** 100000000 }}", "power"),
])
def test_a_chat_template_cannot_hang_or_flood_the_job(tmp_path, monkeypatch, tpl, why):
    import time

    from sidp_jax.loading import bounded_jinja

    monkeypatch.setattr(bounded_jinja, "RENDER_SECONDS", 0.5)
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, {}))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=why):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=tpl)
    assert time.monotonic() - t0 < 5
    # the same tokenizer renders a normal template afterwards
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}") == "hi"
