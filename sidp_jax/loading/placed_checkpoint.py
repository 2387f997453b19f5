"""Placed weights saved once with orbax-checkpoint and restored straight into the mesh.

A placed checkpoint is a directory holding `params/` (orbax, arrays in the layout's storage
order), `sidp_layout.json` (what placement the arrays are stored for) and the source
checkpoint's config and tokenizer files, so `LLM(model=that_dir)` works like a HF directory.
Each device reads only its own shards on restore: no host or device holds the whole FFN.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from sidp_jax.models.config import ModelConfig

LAYOUT_FILE = "sidp_layout.json"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "chat_template.jinja", "special_tokens_map.json")


def is_placed_checkpoint(path) -> bool:
    return isinstance(path, str) and os.path.isfile(os.path.join(path, LAYOUT_FILE))


# v3: each layer's FFN a group under "ffn", FP8 weights as Quantized(values, scale); v2: the same
# leaves flat in the layer, FP8 scales as "<name>_scale"; v1: layers stacked on one axis
FORMAT = "per-layer-v3"


def _storage(cfg: ModelConfig, layout) -> list | None:
    return layout.ffn_storage(cfg)


def _layout_record(cfg: ModelConfig, layout) -> dict:
    return {"format": FORMAT, "parallel": layout.parallel, "placement": layout.placement, "dp": layout.num_replicas,
            "tp": layout.tp, "ffn_groups": _storage(cfg, layout), "quantization": cfg.quantization}


def placed_quantization(path: str) -> str | None:
    """How the placed weights are stored: "fp8" (e4m3 projections and scales) or None."""
    with open(os.path.join(path, LAYOUT_FILE)) as f:
        return json.load(f).get("quantization")


def save_placed(path: str, params: dict, cfg: ModelConfig, layout, source_dir: str | None = None) -> None:
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "params")):
        raise FileExistsError(f"{path} already holds a placed checkpoint")
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params)
        ckptr.wait_until_finished()
    for name in _COPIED:
        if source_dir and os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), path)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump(_layout_record(cfg, layout), f)


def restore_placed(path: str, cfg: ModelConfig, layout, dtype) -> dict:
    with open(os.path.join(path, LAYOUT_FILE)) as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT:
        raise ValueError(
            f"{path} holds placed weights in an older form ({saved.get('format', 'stacked')!r}; this version "
            f"reads {FORMAT!r}): re-save it from the Hugging Face checkpoint with "
            f"LLM(<checkpoint dir>, mesh=..., parallel={saved.get('parallel')!r}, placement="
            f"{saved.get('placement')!r}).save_placed(<new dir>)")
    # Only the FFN storage matters for shapes; any mesh with the same storage can restore.
    if saved["ffn_groups"] != _storage(cfg, layout):
        raise ValueError(
            f"{path} stores the FFN for parallel={saved['parallel']} placement={saved['placement']} "
            f"dp={saved['dp']}; this engine uses parallel={layout.parallel} placement={layout.placement} "
            f"dp={layout.num_replicas}: re-place it from the Hugging Face checkpoint")
    if saved.get("quantization") != cfg.quantization:
        raise ValueError(f"{path} holds weights stored with quantization={saved.get('quantization')!r}, not "
                         f"{cfg.quantization!r}: re-place it from the Hugging Face checkpoint")
    specs = layout.stored_specs(cfg)
    shardings = layout.param_shardings(cfg)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.stored_dtype(dtype), sharding=sh), specs, shardings,
                          is_leaf=lambda x: hasattr(x, "axes"))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(os.path.abspath(path), "params"), target)
