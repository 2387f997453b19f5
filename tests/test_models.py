"""The decoder and the checkpoint loader against transformers' own outputs (fixtures from tools/)."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sidp_jax.loading.checkpoint import load_params
from sidp_jax.models.config import PRESETS
from sidp_jax.models.hf_config import config_from_hf_dict, load_config
from sidp_jax.models.registry import num_params
from sidp_jax.parallel.layouts import make_layout
from sidp_jax.models.decoder import forward
from sidp_jax.loading.safetensors_io import CheckpointError

from fixture_paths import REFERENCE as REFS, checkpoint

MODELS = ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"]


def reference(name):
    with open(os.path.join(REFS, f"{name}.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(REFS, f"{name}.safetensors"))


def prefill_inputs(cfg, ids, page_size=4):
    """(kv, batch) of a prefill of one prompt over pages 1.. of a small pool."""
    T = len(ids)
    pages = -(-T // page_size)
    kv = {k: jnp.zeros((cfg.num_layers * (pages + 1), page_size, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
          for k in ("k", "v")}
    pos = np.arange(T)
    batch = {"tokens": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(pos, jnp.int32),
             "slots": jnp.asarray(page_size + pos, jnp.int32),  # pages 1..pages, contiguous
             "token_seq": jnp.zeros(T, jnp.int32),
             "block_tables": jnp.arange(1, pages + 1, dtype=jnp.int32)[None],
             "sample_index": jnp.arange(T, dtype=jnp.int32), "num_tokens": jnp.int32(T)}
    return kv, batch


def prefill_logits(cfg, params, ids, page_size=4):
    """All positions' logits for one prompt through the paged forward."""
    logits, _ = jax.jit(lambda p, kv, b: forward(cfg, p, kv, b))(params, *prefill_inputs(cfg, ids, page_size))
    return np.asarray(logits)


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    path = checkpoint(request.param)
    cfg = load_config(path)
    layout = make_layout("dp=1", "dp", devices=jax.devices("cpu"))
    return request.param, cfg, load_params(path, cfg, jnp.float32, layout)


def test_prefill_logits_match_transformers(loaded):
    name, cfg, params = loaded
    meta, tensors = reference(name)
    for i, prompt in enumerate(meta["prompts"]):
        got = prefill_logits(cfg, params, prompt["token_ids"])
        want = tensors[f"logits_{i}"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_profiles_name_the_attention_and_ffn_blocks(loaded):
    """Every layer's attention and FFN ops sit in named scopes (what a profile groups them by)."""
    name, cfg, params = loaded
    kv, batch = prefill_inputs(cfg, list(range(3, 9)))
    text = jax.jit(lambda p, kv, b: forward(cfg, p, kv, b)).lower(params, kv, batch).as_text(debug_info=True)
    for scope in ("attention", "ffn"):  # e.g. loc("jit(<lambda>)/ffn/th,hci->tci/dot_general")
        assert re.search(rf'loc\("jit\(<lambda>\)/{scope}/[^"]*dot_general"', text), scope


def test_the_flax_module_scores_tokens_like_transformers():
    """from_pretrained gives an NNX module: called on token ids (no paged cache), transformers' logits;
    a batch of two prompts at once gives each prompt's own logits."""
    from flax import nnx

    from sidp_jax.loading.checkpoint import from_pretrained
    from sidp_jax.models.modules import Decoder

    model = from_pretrained(checkpoint("tiny-qwen3"), dtype=jnp.float32, device=jax.devices("cpu")[0])
    assert isinstance(model, Decoder) and isinstance(model.layers[0].qkv, nnx.Param)
    assert model.layers[0].ffn.gate_up.get_metadata()["logical_axes"] == ("embed", None, "ffn")
    meta, tensors = reference("tiny-qwen3")
    p0, p1 = (meta["prompts"][i]["token_ids"] for i in (0, 1))
    want0, want1 = tensors["logits_0"], tensors["logits_1"]
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want1).max())
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(p1))), want1, **tol)
    n = min(len(p0), len(p1))
    both = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray([p0[:n], p1[:n]])))
    np.testing.assert_allclose(both[0], want0[:n], **tol)
    np.testing.assert_allclose(both[1], want1[:n], **tol)


def test_checkpoint_names_derive_from_the_module_declarations():
    from sidp_jax.models.modules import model_specs
    from sidp_jax.models.params import expected_hf_shapes

    cfg = load_config(checkpoint("tiny-qwen2"))  # qkv bias, tied embeddings
    shapes = expected_hf_shapes(model_specs(cfg))
    q = cfg.num_heads * cfg.head_dim
    assert shapes["model.layers.1.self_attn.q_proj.bias"] == (q,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (cfg.hidden_size, cfg.intermediate_size)
    assert "lm_head.weight" not in shapes
    per_layer = [n for n in shapes if n.startswith("model.layers.0.")]
    assert len(per_layer) == 12 and len(shapes) == 12 * cfg.num_layers + 2


def test_configs_of_both_generations():
    llama = load_config(checkpoint("tiny-llama3"))  # current form: rope_parameters, dtype
    qwen2 = load_config(checkpoint("tiny-qwen2"))  # legacy form: rope_theta, torch_dtype
    assert llama.rope_scaling is not None and dict(llama.rope_scaling)["factor"] == 8.0
    assert llama.rope_theta == 500000.0 and llama.checkpoint_dtype == "float32"
    assert qwen2.rope_scaling is None and qwen2.checkpoint_dtype == "bfloat16"
    assert qwen2.tie_word_embeddings and qwen2.qkv_bias
    qwen3 = load_config(checkpoint("tiny-qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim != qwen3.hidden_size // qwen3.num_heads
    legacy = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5, "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    current = {k: v for k, v in legacy.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    current |= {"dtype": "bfloat16", "rope_parameters": {**legacy["rope_scaling"], "rope_theta": 5e5}}
    assert config_from_hf_dict(legacy) == config_from_hf_dict(current)


def test_presets_have_the_real_shapes():
    q = PRESETS["qwen3-32b"]
    assert q.kv_bytes_per_token() == 256 * 1024
    assert abs(num_params(q) / 1e9 - 32.8) < 0.3
    assert abs(3 * q.hidden_size * q.intermediate_size * q.num_layers / num_params(q) - 0.77) < 0.01
    assert PRESETS["llama3.1-70b"].kv_bytes_per_token() == 320 * 1024


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="MistralForCausalLM.*supported: LlamaForCausalLM"):
        config_from_hf_dict({"architectures": ["MistralForCausalLM"]})


def _copy(tmp_path, name="tiny-llama3"):
    dst = tmp_path / name
    shutil.copytree(checkpoint(name), dst)
    return str(dst)


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = dict(load_file(f))
    fn(tensors)
    save_file(tensors, f)


def _load(path):
    cfg = load_config(path)
    return load_params(path, cfg, jnp.float32, make_layout("dp=1", "dp", devices=jax.devices("cpu")))


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        _load(path)


def test_unexpected_tensor_is_named_with_file(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.extra.weight in model.safetensors"):
        _load(path)


def test_misshaped_tensor_is_named_with_file(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.norm.weight", np.ones(63, np.float32)))
    with pytest.raises(CheckpointError, match=r"model.norm.weight in model.safetensors has shape \[63\], expected \[64\]"):
        _load(path)


def test_missing_shard_file_is_named(tmp_path):
    path = _copy(tmp_path, "tiny-qwen3")
    victim = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match=victim):
        _load(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    path = _copy(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    (tmp_path / "tiny-llama3" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle.*safetensors only"):
        _load(path)


def test_bf16_checkpoint_loads_as_bf16():
    path = checkpoint("tiny-qwen2")
    cfg = load_config(path)
    params = load_params(path, cfg, jnp.bfloat16, make_layout("dp=1", "dp", devices=jax.devices("cpu")))
    assert params["embed"].dtype == jnp.bfloat16 and "lm_head" not in params


def _one_tensor_file(path, header: dict, data: bytes, header_len: int | None = None):
    import struct

    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize("header,data,header_len,why", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "tensor w .* only 8"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}, b"\0" * 16, None, "tensor w .* ends at byte 64"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},  # aliases: the same bytes twice
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 2**62, "header length"),
    ({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "holds 16 bytes.*needs 8"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "invalid shape"),
])
def test_safetensors_headers_are_checked_against_the_file(tmp_path, header, data, header_len, why):
    from sidp_jax.loading.safetensors_io import SafetensorsCheckpoint

    _one_tensor_file(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=why) as e:
        SafetensorsCheckpoint(str(tmp_path))
    assert "model.safetensors" in str(e.value)


def test_an_index_pointing_outside_the_checkpoint_is_refused(tmp_path):
    from sidp_jax.loading.safetensors_io import SafetensorsCheckpoint

    (tmp_path / "ckpt").mkdir()
    _one_tensor_file(tmp_path / "elsewhere.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     b"\0" * 4)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        SafetensorsCheckpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("change,why", [
    (lambda c: c.pop("hidden_size"), "'hidden_size' is missing"),
    (lambda c: c.update(num_attention_heads=0), "'num_attention_heads' must be a positive integer"),
    (lambda c: c.update(max_position_embeddings=-1), "'max_position_embeddings' must be a positive integer"),
    (lambda c: c.update(architectures="LlamaForCausalLM"), "'architectures' must be a list"),
    (lambda c: c.update(vocab_size="512"), "'vocab_size' must be a positive integer"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
])
def test_bad_config_fields_are_named_at_load_time(tmp_path, change, why):
    path = _copy(tmp_path)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        raw = json.load(f)
    change(raw)
    with open(cfg_file, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=why) as e:
        load_config(path)
    assert "config.json" in str(e.value)


def test_a_corrupt_tokenizer_is_an_error_at_load_time(tmp_path):
    from sidp_jax.loading.tokenizer import Tokenizer

    path = _copy(tmp_path, "tiny-qwen3")
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"model": {"type": "nonsense"}')
    with pytest.raises(ValueError, match="tokenizer.json could not be loaded"):
        Tokenizer.from_dir(path)


def test_config_values_beyond_any_real_model_are_refused_naming_the_field():
    from sidp_jax.models.hf_config import config_from_hf_dict

    base = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "intermediate_size": 128,
            "num_hidden_layers": 2, "rms_norm_eps": 1e-6}
    config_from_hf_dict(base)
    for field, value in (("num_hidden_layers", 10**9), ("vocab_size", 10**12), ("hidden_size", 1 << 20)):
        with pytest.raises(ValueError, match=f"{field}.*beyond any real model"):
            config_from_hf_dict({**base, field: value})


def test_a_weight_whose_header_claims_an_integer_dtype_is_refused(tmp_path):
    """Same byte count, other meaning: a float32 tensor relabelled I32 in the header must not load."""
    path = _copy(tmp_path)
    f = os.path.join(path, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header["model.norm.weight"]["dtype"] == "F32"
    at = data.index(b'"model.norm.weight"', 8, 8 + n)
    fixed = data[at:8 + n].replace(b'"dtype":"F32"', b'"dtype":"I32"', 1)
    assert fixed != data[at:8 + n]
    data[at:8 + n] = fixed
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="model.norm.weight in model.safetensors is stored as int32"):
        _load(path)


def test_a_new_family_is_one_declaration_and_a_registry_line(monkeypatch):
    """The seam for new models: a Family (models/family.py) registered by its architecture runs
    with no other change: config.json parsing, the declared layer (here qkv bias and q/k norms
    together, which no shipped family has) and the engine."""
    from sidp_jax import LLM, SamplingParams
    from sidp_jax.models import registry
    from sidp_jax.models.family import Family
    from sidp_jax.models.ffn import DenseFfn
    from sidp_jax.models.modules import model_specs

    toy = Family(name="toy", architectures=("ToyForCausalLM",), ffn=DenseFfn, qk_norm=True, qkv_bias=True)
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, toy))
    monkeypatch.setitem(registry.BY_ARCHITECTURE, "ToyForCausalLM", toy)
    monkeypatch.setitem(registry.BY_NAME, "toy", toy)
    cfg = config_from_hf_dict({"architectures": ["ToyForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                               "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 128})
    assert cfg.family == "toy" and cfg.qk_norm and cfg.qkv_bias
    layer = model_specs(cfg)["layers"][0]
    assert {"q_norm", "k_norm", "qkv_bias"} <= set(layer) and set(layer["ffn"]) == {"gate_up", "down"}
    llm = LLM(cfg, verbose=False, dtype="float32", devices=jax.devices("cpu")[:1], kv_cache_tokens=128)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="unsupported architecture"):
        config_from_hf_dict({"architectures": ["NopeForCausalLM"], "vocab_size": 64})
