"""Loading placed weights: orbax restore straight into the mesh vs re-reading safetensors.

Writes a synthetic Hugging Face checkpoint of a preset's shape (first --layers layers, random
bf16, sharded safetensors), loads it into the sidp layout from safetensors, saves the placed
arrays with orbax, then restores them; reports seconds and GB/s for both and checks equality.

  python benchmarks/restore.py --model qwen3-32b --layers 8 --mesh dp=2 --dir /tmp/ckpt --out r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from sidp_jax.loading.checkpoint import load_params
from sidp_jax.models.config import PRESETS
from sidp_jax.parallel.layouts import make_layout
from sidp_jax.models.modules import model_specs
from sidp_jax.models.params import expected_hf_shapes
from sidp_jax.loading.placed_checkpoint import restore_placed, save_placed
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def write_hf_checkpoint(cfg, path: str, shard_bytes: int = 4 << 30) -> int:
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name))
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in expected_hf_shapes(model_specs(cfg)).items():
        arr = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-32b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mesh", default="dp=2")
    ap.add_argument("--placement", default="striped")
    ap.add_argument("--dir", default="/tmp/sidp_restore_bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = dataclasses.replace(PRESETS[args.model], num_layers=args.layers)
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, placed = os.path.join(args.dir, "hf"), os.path.join(args.dir, "placed")
    total = write_hf_checkpoint(cfg, hf)
    layout = make_layout(args.mesh, "sidp", args.placement)
    os.system("sync")

    t = time.perf_counter()
    params = jax.block_until_ready(load_params(hf, cfg, jnp.bfloat16, layout))
    t_safetensors = time.perf_counter() - t
    save_placed(placed, params, cfg, layout)
    t = time.perf_counter()
    restored = jax.block_until_ready(restore_placed(placed, cfg, layout, jnp.bfloat16))
    t_orbax = time.perf_counter() - t
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)))
    res = {"model": args.model, "layers": args.layers, "mesh": args.mesh, "placement": args.placement,
           "checkpoint_gb": total / 1e9, "safetensors_s": t_safetensors, "orbax_s": t_orbax, "equal": same,
           "note": "files were just written, so both reads are likely served from the page cache"}
    print(json.dumps(res))
    if args.out:
        write_result(args.out, res)
    print(f"{total / 1e9:.1f} GB: safetensors {t_safetensors:.2f} s ({total / 1e9 / t_safetensors:.1f} GB/s), "
          f"orbax restore {t_orbax:.2f} s ({total / 1e9 / t_orbax:.1f} GB/s), equal={same}")


if __name__ == "__main__":
    main()
