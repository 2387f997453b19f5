"""FP8 GEMMs at decode sizes, alone: what each way of running a projection costs on one GPU.

For every projection of a preset (fused qkv, o, gate_up, down) at M = --tokens rows, timed in
one process, each compiled with XLA's Triton GEMM emitter off (the engine's default, cuBLAS /
cuBLASLt only) and on (XLA autotunes between Triton and the library):
  bf16         the float GEMM, weight [K, N] (the engine's bf16 layout)
  fp8          the engine's W8A8 (models/fp8.py): per-token activation quantization, an e4m3 x
               e4m3 GEMM with the weight [N, K], per-channel rescale
  fp8-gemm     the same GEMM on activations quantized beforehand: the GEMM's own cost
  fp8-swap     fp8 with its operands swapped (swapped_linear): w x^T, transposed in the rescale
  fp8-block    128 x 128 weight blocks and 1 x 128 activation blocks (Qwen's FP8 checkpoints'
               scheme, DeepSeek-V3 style), emulated as one batched e4m3 GEMM over the K blocks
               with a scaled sum: what keeping block scales would cost without a fused kernel
fp8, fp8-swap and fp8-block are first checked against the float GEMM (relative RMS within e4m3's
sqrt(2) x 2^-4). Each variant runs over L distinct weights (L layers, at least --min-gib of bf16
weights, 4 to 32 of them) in ONE jitted program, as the engine's step runs its layers: a single
call per GEMM would time Python dispatch (~0.1 ms) and, for weights that fit in L2, cache hits.
The time per GEMM is the program's median over L. Weight bytes per second are each variant's
weight bytes over that time (HBM's ~4.8 TB/s on an H200 is the ceiling for the skinny M of decode).

  python benchmarks/fp8_gemms.py --model qwen3-32b --tokens 64,256 --out fp8_gemms.json
  python benchmarks/fp8_gemms.py --model tiny --tokens 8 --reps 2      # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sidp_jax.engine.timing import median_seconds
from sidp_jax.models.config import PRESETS
from sidp_jax.models.hf_config import load_config
from sidp_jax.models.fp8 import E4M3, E4M3_MAX, Quantized, linear, quantize, quantize_tokens
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)

BLOCK = 128
VARIANTS = ("bf16", "fp8", "fp8-swap", "fp8-gemm", "fp8-block")  # the table's column order
W8A8 = ("fp8", "fp8-swap", "fp8-block")  # the forms checked against the float GEMM, on per-layer inputs


def projections(cfg) -> dict[str, tuple[int, int]]:
    """(K, N) of each projection as one 2-D GEMM."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {"qkv": (H, (cfg.num_heads + 2 * cfg.num_kv_heads) * D), "o": (cfg.num_heads * D, H),
            "gate_up": (H, 2 * I), "down": (I, H)}


def block_quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [N, K] -> e4m3 [N, K] and one scale per 128 x 128 block [N/128, K/128]."""
    N, K = w.shape
    blocks = w.reshape(N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(1, 3)), 1e-12) / E4M3_MAX
    q = jnp.clip(blocks / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(N, K), scale


def block_linear(x: jax.Array, wq: jax.Array, w_scale: jax.Array) -> jax.Array:
    """x [T, K] times a block-scaled weight: per (token, K block) activation scales, one batched
    GEMM over the K blocks, each block's partial product scaled, then summed over the blocks."""
    T, K = x.shape
    N = wq.shape[0]
    nb = K // BLOCK
    xb = x.astype(jnp.float32).reshape(T, nb, BLOCK)
    x_scale = jnp.maximum(jnp.max(jnp.abs(xb), axis=2), 1e-12) / E4M3_MAX  # [T, nb]
    xq = jnp.clip(xb / x_scale[:, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    part = jax.lax.dot_general(xq, wq.reshape(N, nb, BLOCK), (((2,), (2,)), ((1,), (1,))),
                               preferred_element_type=jnp.float32)  # [nb, T, N]
    w_full = jnp.repeat(w_scale, BLOCK, axis=0)  # [N, nb]
    y = jnp.einsum("btn,tb,nb->tn", part, x_scale, w_full)
    return y.astype(x.dtype)


def rel_rms(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


def swapped_linear(x, q, s):
    """The W8A8 GEMM with its operands swapped, y^T = w x^T (as vLLM's CUTLASS path does for small
    M): the weight's long output axis on the GEMM's M. Measured here only; the engine does not use it."""
    xq, x_scale = quantize_tokens(x)
    y_t = jax.lax.dot_general(q, xq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y_t.T * x_scale[:, None] * s).astype(x.dtype)


def variants(x, layers):
    """{name: (fn(first, *weights), first, [weights of each layer], weight bytes per layer)}; layers
    holds (w_bf16 [K, N], q, s, bq, bs) per layer (bq None where the shape is not in 128-blocks)."""
    xq, _ = quantize_tokens(x)
    out = {
        "bf16": (lambda x, w: linear(x, w), x, [(w,) for w, *_ in layers]),
        "fp8": (lambda x, q, s: linear(x, Quantized(q, s)), x, [(q, s) for _, q, s, _, _ in layers]),
        "fp8-gemm": (lambda xq, q: jax.lax.dot_general(xq, q, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.bfloat16),
                     xq, [(q,) for _, q, _, _, _ in layers]),
        "fp8-swap": (swapped_linear, x, [(q, s) for _, q, s, _, _ in layers]),
    }
    if layers[0][3] is not None:
        out["fp8-block"] = (block_linear, x, [(bq, bs) for *_, bq, bs in layers])
    return {k: (fn, first, ws, sum(a.nbytes for a in ws[0])) for k, (fn, first, ws) in out.items()}


def over_layers(fn, options, distinct_inputs: bool):
    """One program that runs fn on every layer's weights, as a step does. distinct_inputs scales
    the input a little per layer, so that XLA cannot quantize one shared activation once for all
    layers (in a step each layer's input differs); the scale fuses into the quantization."""
    def run(first, ws):
        return [fn(first * (1 + i * 2.0 ** -8) if distinct_inputs and i else first, *w) for i, w in enumerate(ws)]
    return jax.jit(run, compiler_options=options)


def make_layers(key, K: int, N: int, L: int):
    """L distinct random weights [N, K] (made on the device) in every stored form, and the first
    layer's float32 weight, the reference the W8A8 forms are checked against."""
    layers = []
    for i, k in enumerate(jax.random.split(key, L)):
        w = jax.random.normal(k, (N, K), jnp.float32) / np.sqrt(K)
        q, s = quantize(w, 1)
        bq, bs = block_quantize(w) if not (K % BLOCK or N % BLOCK) else (None, None)
        layers.append((w.T.astype(jnp.bfloat16), q, s, bq, bs))
        if i == 0:
            w0 = w
    return layers, w0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-32b", help="a preset name, or 'tiny' (the bundled model)")
    ap.add_argument("--tokens", default="64,256", help="rows M of each GEMM (decode batch sizes)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--min-gib", type=float, default=2.0, help="bf16 weight GiB per program (sets L)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.model == "tiny":  # the bundled model's family at sizes that split into 128-blocks
        from sidp_jax.llm import BUNDLED_MODEL

        cfg = dataclasses.replace(load_config(BUNDLED_MODEL), hidden_size=256, intermediate_size=512, head_dim=64)
    else:
        cfg = PRESETS[a.model]
    backend = jax.default_backend()
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  model {a.model}", flush=True)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    rows = []
    for name, (K, N) in projections(cfg).items():
        if K % BLOCK or N % BLOCK:
            print(f"  {name}: {K}x{N} is not in 128-blocks; fp8-block skipped")
        L = int(np.clip(np.ceil(a.min_gib * 2**30 / (2 * K * N)), 4, 32))
        key, sub = jax.random.split(key)
        layers, w0 = make_layers(sub, K, N, L)
        for T in (int(t) for t in a.tokens.split(",")):
            x = jnp.asarray(rng.standard_normal((T, K), np.float32), jnp.bfloat16)
            want = linear(x.astype(jnp.float32), w0.T)
            for triton in ((False, True) if backend == "gpu" else (False,)):
                options = {"xla_gpu_enable_triton_gemm": triton} if backend == "gpu" else None
                for kind, (fn, first, ws, nbytes) in variants(x, layers).items():
                    f = over_layers(fn, options, distinct_inputs=kind in W8A8)
                    if kind in W8A8:  # each W8A8 form against the float GEMM first
                        err = rel_rms(f(first, ws)[0], want)  # layer 0's input is unscaled
                        assert err <= np.sqrt(2) * 2.0 ** -4, (name, kind, err)
                    dt = median_seconds(f, first, ws, reps=a.reps) / L
                    rows.append(dict(projection=name, K=K, N=N, tokens=T, variant=kind, triton_gemm=triton,
                                     layers=L, us=dt * 1e6, weight_TB_per_s=nbytes / dt / 1e12))
                    print(f"  {name:>7} M={T:<4} triton={'on ' if triton else 'off'} {kind:>9}: {dt * 1e6:9.1f} us "
                          f"{nbytes / dt / 1e12:6.2f} TB/s  (per GEMM, {L} layers in one program)", flush=True)
        del layers, w0
    print("\n| projection | M | triton GEMM | " + " | ".join(VARIANTS) + " (us) |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    keys = sorted({(r["projection"], r["tokens"], r["triton_gemm"]) for r in rows}, key=str)
    for p, T, tr in keys:
        us = {r["variant"]: r["us"] for r in rows if (r["projection"], r["tokens"], r["triton_gemm"]) == (p, T, tr)}
        cells = " | ".join(f"{us[v]:.1f}" if v in us else "-" for v in VARIANTS)
        print(f"| {p} | {T} | {'on' if tr else 'off'} | {cells} |")
    if a.out:
        meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, model=a.model, argv=sys.argv[1:])
        write_result(a.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
