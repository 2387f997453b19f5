"""Read Hugging Face safetensors checkpoints (single file or sharded) lazily through mmap.

Our own small reader rather than `safetensors.safe_open(framework="numpy")`, because numpy
has no bfloat16 (we view the bytes through ml_dtypes) and because we want zero-copy slices:
a tensor's bytes are only touched when a device shard actually needs them.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


class CheckpointError(ValueError):
    pass


class SafetensorsCheckpoint:
    """Maps tensor name -> (file, lazily mmapped array) for a checkpoint directory."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._where: dict[str, str] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        self._maps: dict[str, np.memmap] = {}
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for name, fname in weight_map.items():
                self._where[name] = os.path.join(model_dir, fname)
        elif os.path.isfile(single):
            files = [single]
            for path in files:
                for name in self._header(path)[1]:
                    self._where[name] = path
        else:
            found = [os.path.basename(p) for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(model_dir, pat))]
            if found:
                raise CheckpointError(
                    f"{model_dir} holds only pickle weights ({', '.join(sorted(found)[:3])}); sidp-jax loads "
                    "safetensors only, since unpickling a checkpoint can execute arbitrary code. Convert it "
                    "with transformers: model.save_pretrained(dir, safe_serialization=True).")
            raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
        for path in set(self._where.values()):
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint index names {os.path.basename(path)}, which is missing in {model_dir}")

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self._headers[path] = (8 + n, header)
        return self._headers[path]

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> str:
        return os.path.basename(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._where[name]
        info = self._header(path)[1].get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is listed in the index but absent from {os.path.basename(path)}")
        return tuple(info["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only zero-copy numpy view (bf16 as ml_dtypes.bfloat16)."""
        path = self._where[name]
        start, header = self._header(path)
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {os.path.basename(path)} has unsupported dtype {info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        b, e = info["data_offsets"]
        raw = self._maps[path][start + b:start + e]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
