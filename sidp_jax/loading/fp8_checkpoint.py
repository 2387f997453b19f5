"""Pre-quantized FP8 Hugging Face checkpoints, read by dequantizing each weight at load time.

The two common forms, from config.json's `quantization_config`:
- `{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size":
  [128, 128]}` (Qwen's own -FP8 releases): each `*.weight` is F8_E4M3 beside a float
  `*.weight_scale_inv` of one scale per block of the weight [out, in];
- compressed-tensors, `"format": "float-quantized"` (e.g. RedHatAI's Llama-3.x FP8): each quantized
  `*.weight` beside a `*.weight_scale`, per output channel [out, 1] or per tensor (one value);
  with static activation scales an `*.input_scale` too (not needed here: activations are scaled
  per token on the fly); with a `kv_cache_scheme`, `self_attn.k_scale` / `v_scale` (static FP8
  KV cache scales, per tensor or per kv head), which the model reads as parameters
  (models/modules.py) rather than this module.

In both the real weight is the FP8 value times its scale. This module turns such a checkpoint
into the float weights the engine loads, which an FP8 model then requantizes per output channel
for W8A8 (models/fp8.py: block scales cost more than they save without a fused kernel,
benchmarks/RESULTS.md, "FP8 GEMMs"); the weight scale tensors are consumed here, so the loader's
"nothing unexpected" check still holds.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes
import numpy as np

from sidp_jax.loading.safetensors_io import CheckpointError, SafetensorsCheckpoint

FP8_DTYPE = ml_dtypes.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class FP8Scheme:
    scale_suffix: str  # "weight_scale_inv" (block form) or "weight_scale" (compressed-tensors)
    block: tuple[int, int] | None  # block form: (rows, cols) per scale


def fp8_scheme(model_dir: str) -> FP8Scheme | None:
    """The checkpoint's FP8 form from config.json's quantization_config (None: not quantized)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        q = json.load(f).get("quantization_config")
    if q is None:
        return None
    where = f"{os.path.join(model_dir, 'config.json')}: quantization_config"
    method = q.get("quant_method")
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{where}.fmt {q.get('fmt')!r} is not supported (only e4m3)")
        block = q.get("weight_block_size")
        if block is not None and (not isinstance(block, list) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}.weight_block_size must be two positive integers, got {block!r}")
        return FP8Scheme("weight_scale_inv", tuple(block) if block else None)
    if method == "compressed-tensors":
        if q.get("format") != "float-quantized":
            raise CheckpointError(f"{where}.format {q.get('format')!r} is not supported (only float-quantized)")
        return FP8Scheme("weight_scale", None)
    raise CheckpointError(f"{where}.quant_method {method!r} is not supported (fp8 or compressed-tensors)")


def dequantize(q: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """float32 weights [out, in] from FP8 values and their scales: one per block (block form),
    per output channel ([out, 1]) or per tensor (one value)."""
    w = q.astype(np.float32)
    scale = np.asarray(scale, np.float32)
    if block is None:
        return w * (scale.reshape(-1, 1) if scale.size == w.shape[0] and scale.size > 1 else scale.reshape(()))
    rows, cols = block
    want = (-(-w.shape[0] // rows), -(-w.shape[1] // cols))
    if scale.shape != want:
        raise CheckpointError(f"a block scale of shape {list(scale.shape)} does not fit a weight {list(w.shape)} "
                              f"in blocks of {list(block)} (expected {list(want)})")
    full = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[:w.shape[0], :w.shape[1]]
    return w * full


class DequantizedCheckpoint:
    """A SafetensorsCheckpoint whose FP8 weights read as float32 and whose scales are hidden."""

    def __init__(self, ckpt: SafetensorsCheckpoint, scheme: FP8Scheme):
        self.ckpt, self.scheme, self.model_dir = ckpt, scheme, ckpt.model_dir
        names = ckpt.names()
        self._scale_of = {n[:-len(scheme.scale_suffix)] + "weight": n for n in names
                          if n.endswith("." + scheme.scale_suffix)}
        self._hidden = set(self._scale_of.values()) | {n for n in names if n.endswith(".input_scale")}
        for weight in self._scale_of:
            if weight not in names:
                raise CheckpointError(f"{self._scale_of[weight]} in {ckpt.file_of(self._scale_of[weight])} "
                                      f"scales a tensor {weight} that is not in the checkpoint")

    def names(self) -> set[str]:
        return self.ckpt.names() - self._hidden

    def file_of(self, name: str) -> str:
        return self.ckpt.file_of(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def get(self, name: str) -> np.ndarray:
        raw = self.ckpt.get(name)
        if raw.dtype != FP8_DTYPE:
            return raw
        if name not in self._scale_of:
            raise CheckpointError(f"FP8 tensor {name} in {self.ckpt.file_of(name)} has no "
                                  f"{name[:-len('weight')] + self.scheme.scale_suffix}")
        return dequantize(raw, self.ckpt.get(self._scale_of[name]), self.scheme.block)


def open_checkpoint(model_dir: str) -> SafetensorsCheckpoint | DequantizedCheckpoint:
    """The checkpoint's tensors as the loader reads them: FP8 forms dequantized."""
    ckpt = SafetensorsCheckpoint(model_dir)
    scheme = fp8_scheme(model_dir)
    return ckpt if scheme is None else DequantizedCheckpoint(ckpt, scheme)
