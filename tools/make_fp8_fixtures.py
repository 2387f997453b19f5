"""Tiny FP8 checkpoints in the two published Hugging Face forms, from the bundled tiny-qwen3.

  python tools/make_fp8_fixtures.py

writes tests/fixtures/checkpoints/tiny-qwen3-fp8-block (Qwen's -FP8 form: quant_method "fp8",
e4m3, weight_block_size [128, 128], F8_E4M3 weights with a float32 `weight_scale_inv` per
block) and tiny-qwen3-fp8-channel (compressed-tensors "float-quantized": F8_E4M3 weights with
a per-output-channel float32 `weight_scale`, dynamic per-token activations); tiny-qwen3-fp8-channel-kv is that one plus compressed-tensors'
static FP8 KV cache scales per kv head (`kv_cache_scheme` "attn_head", `self_attn.k_scale` and
`v_scale` [Nkv] per layer; see kv_scales for how they are set). Every linear layer
of the decoder is quantized (q/k/v/o, gate/up/down); embeddings, norms and lm_head stay as they
are, as in the published checkpoints. The safetensors files are written by hand (header + raw
bytes) so that F8_E4M3 is spelled exactly as the format defines it. Needs numpy and ml_dtypes only.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sidp_jax.loading.safetensors_io import SafetensorsCheckpoint  # noqa: E402

SOURCE = ROOT / "sidp_jax" / "assets" / "tiny-qwen3"
OUT = ROOT / "tests" / "fixtures" / "checkpoints"
E4M3_MAX = 448.0
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
               np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


def to_e4m3(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_blocks(w: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = block
    nb = (-(-w.shape[0] // rows), -(-w.shape[1] // cols))
    scale = np.zeros(nb, np.float32)
    for i in range(nb[0]):
        for j in range(nb[1]):
            amax = np.abs(w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]).max()
            scale[i, j] = max(amax, 1e-12) / E4M3_MAX
    full = np.repeat(np.repeat(scale, rows, 0), cols, 1)[:w.shape[0], :w.shape[1]]
    return to_e4m3(w / full), scale


def quantize_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / E4M3_MAX).astype(np.float32)
    return to_e4m3(w / scale), scale


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))  # keeps a 0-d shape
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for b in blobs:
            f.write(b)


def kv_scales(src: SafetensorsCheckpoint, config: dict) -> dict[str, np.ndarray]:
    """Per-kv-head static scales (float32 [Nkv]) for every layer's K and V, as compressed-tensors'
    kv_cache_scheme "attn_head" stores them: a head's amax over 448. No calibration data here, so
    the amax is the bound the weights guarantee: k is RMS-normed (qwen3's k_norm) and rotated,
    so |k_i| <= sqrt(D) max|k_norm|; v_j = x_n . Wv[j] with |x_n| <= sqrt(H) max|input_layernorm|."""
    H, D = config["hidden_size"], config["head_dim"]
    nkv = config["num_key_value_heads"]
    out = {}
    for l in range(config["num_hidden_layers"]):
        at = lambda n: np.asarray(src.get(f"model.layers.{l}.{n}"), np.float32)
        k_amax = np.full(nkv, np.sqrt(D) * np.abs(at("self_attn.k_norm.weight")).max())
        wv = at("self_attn.v_proj.weight").reshape(nkv, D, H)
        v_amax = np.sqrt(H) * np.abs(at("input_layernorm.weight")).max() * np.linalg.norm(wv, axis=2).max(axis=1)
        out[f"model.layers.{l}.self_attn.k_scale"] = (k_amax / E4M3_MAX).astype(np.float32)
        out[f"model.layers.{l}.self_attn.v_scale"] = (v_amax / E4M3_MAX).astype(np.float32)
    return out


def make(form: str) -> Path:
    src = SafetensorsCheckpoint(str(SOURCE))
    out = OUT / f"tiny-qwen3-fp8-{form}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = {}
    for name in sorted(src.names()):
        w = np.array(src.get(name))
        if any(f".{p}." in name for p in LINEAR) and name.endswith(".weight"):
            if form == "block":
                tensors[name], tensors[name[:-len("weight")] + "weight_scale_inv"] = quantize_blocks(w)
            else:
                tensors[name], tensors[name[:-len("weight")] + "weight_scale"] = quantize_channels(w)
        else:
            tensors[name] = w
    config = json.loads((SOURCE / "config.json").read_text())
    if form == "channel-kv":
        tensors.update(kv_scales(src, config))
    write_safetensors(out / "model.safetensors", tensors)
    if form == "block":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}}}
        if form == "channel-kv":
            config["quantization_config"]["kv_cache_scheme"] = {
                "num_bits": 8, "type": "float", "strategy": "attn_head", "symmetric": True, "dynamic": False}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        shutil.copy(SOURCE / f, out / f)
    return out


if __name__ == "__main__":
    for form in ("block", "channel", "channel-kv"):
        print("wrote", make(form))
