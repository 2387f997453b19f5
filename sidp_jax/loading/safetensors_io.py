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
    "F8_E4M3": ml_dtypes.float8_e4m3fn,  # FP8 checkpoints (sidp_jax/loading/fp8_checkpoint.py)
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
            for name, fname in _read_index(index).items():
                self._where[name] = _inside(model_dir, fname, index)
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
            self._headers[path] = read_header(path)
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
        info = header.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is listed in the index but absent from {os.path.basename(path)}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        b, e = info["data_offsets"]
        raw = self._maps[path][start + b:start + e]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    return weight_map


def _inside(model_dir: str, fname: str, index: str) -> str:
    """The shard's path, which must stay inside the checkpoint directory."""
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(model_dir, fname))
    if os.path.commonpath([root, path]) != root:
        raise CheckpointError(f"{index} maps tensors to {fname!r}, outside the checkpoint directory {model_dir}")
    return path


def read_header(path: str) -> tuple[int, dict]:
    """(data start, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, every entry
    checked against the file: header length within the file, known dtypes, byte counts equal to
    dtype x shape, offsets inside the data and not overlapping."""
    name_of = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name_of} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{name_of}: header length {n} exceeds the file's {size} bytes (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{name_of}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name_of}: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"tensor {name} in {name_of}"
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: header entry needs dtype, shape and two data_offsets") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (b, e)) or not 0 <= b <= e:
            raise CheckpointError(f"{where} has invalid data_offsets {[b, e]!r}")
        if e > data_len:
            raise CheckpointError(f"{where} ends at byte {e} of the data, but the file holds only {data_len} "
                                  f"(truncated?)")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if e - b != want:
            raise CheckpointError(f"{where} holds {e - b} bytes, but {dtype} x {shape} needs {want}")
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"tensors {n0} and {n1} in {name_of} overlap (bytes {b1}-{e0})")
    return 8 + n, header
