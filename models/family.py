"""What a model family declares: which Hugging Face architectures it reads, its attention
variant, and its FFN group. A family is one module under models/families/ and one line in
models/registry.py; the decoder (models/modules.py, models/decoder.py) builds every family's
layer from this declaration, so families differ by what they declare, not by branches."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    architectures: tuple[str, ...]  # config.json "architectures" this family reads
    ffn: type  # the layer's FFN group (models/ffn.py), what SiDP pools
    moe_ffn: type | None = None  # the FFN group of the config's `moe_layers` (a mixture of experts)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    qkv_bias: bool | None = None  # a bias on q, k and v; None: config.json's "attention_bias" says
    # config.json fields the family does not support, each with the value it must have
    unsupported: tuple[tuple[str, object], ...] = (("mlp_bias", False), ("use_sliding_window", False))

    def attention_bias(self, raw: dict) -> bool:
        return self.qkv_bias if self.qkv_bias is not None else bool(raw.get("attention_bias", False))

    def ffn_group(self, cfg, layer: int) -> type:
        """The FFN group class of layer `layer`: the experts in the config's MoE layers, else dense."""
        return self.moe_ffn if self.moe_ffn is not None and layer in cfg.moe_layers else self.ffn
