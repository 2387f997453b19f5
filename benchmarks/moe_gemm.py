"""The experts' grouped GEMM alone, against its floors, at Qwen3-MoE shapes and T tokens per step.

For each model shape and T: route T random tokens (random router, so about
E(1 - (1 - k/E)^T) experts are active), build the row plan (models/expert_routing.py), and time
the two expert GEMMs of one layer (gate_up [H, 2I] and down [I, H]) with
  pallas      kernels/grouped_matmul_pallas.py (what the engine runs on NVIDIA GPUs)
  ragged_dot  jax.lax.ragged_dot on the same sorted rows (XLA's own lowering; only at small T,
              since off TPU it expands to a dense dot over every expert)
and a dense bf16 GEMM of the same FLOPs ([rows, H] x [H, 2I]) for the matmul rate. Reported: ms,
expert-weight bytes read per second (active experts' weights / time: the decode floor's rate) and
TFLOP/s of the routed rows (the prefill floor's rate), beside the dense GEMM's.

  python benchmarks/moe_gemm.py --models qwen3-30b-a3b,qwen3-235b-a22b --tokens 64,256,2048,8192 \
      --out benchmarks/results/<date>-<gpu>-moe-gemm.json
  python benchmarks/moe_gemm.py --models qwen3-30b-a3b --tokens 8 --shrink 16 --reps 1 --out /tmp/m.json  # CPU
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from sidp_jax.engine.timing import median_seconds
from sidp_jax.kernels.grouped_matmul import grouped_matmul
from sidp_jax.models import expert_routing
from sidp_jax.models.config import PRESETS


def one_case(cfg, T: int, reps: int, shrink: int, with_ragged: bool) -> dict:
    H, I, E, k = cfg.hidden_size // shrink, cfg.moe_intermediate_size // shrink, cfg.num_experts, cfg.num_experts_per_tok
    key = jax.random.key(T)
    kx, kr, kg, kd = jax.random.split(key, 4)
    x = jax.random.normal(kx, (T, H), jnp.bfloat16)
    router = (jax.random.normal(kr, (H, E), jnp.float32) * H ** -0.5).astype(jnp.bfloat16)
    gate_up = (jax.random.normal(kg, (E, H, 2 * I), jnp.float32) * H ** -0.5).astype(jnp.bfloat16)
    down = (jax.random.normal(kd, (E, I, H), jnp.float32) * I ** -0.5).astype(jnp.bfloat16)
    B = expert_routing.block_rows_for(T, k, E)
    weights, experts = expert_routing.route(x, router, k, True)
    plan = expert_routing.plan_rows(weights, experts, E, B)
    rows = expert_routing.gather_rows(x, plan)
    h = jnp.zeros((rows.shape[0], I), jnp.bfloat16) + 0.01
    active = int(jnp.sum(jnp.bincount(experts.reshape(-1), length=E) > 0))
    expert_bytes = active * 3 * H * I * 2
    flops = 2 * T * k * 3 * H * I
    out = {"tokens": T, "hidden": H, "moe_intermediate": I, "experts": E, "top_k": k, "block_rows": B,
           "rows": int(rows.shape[0]), "rows_used": int(plan.rows_used), "active_experts": active,
           "expert_bytes_read": expert_bytes, "flops": flops}

    pallas = jax.jit(lambda r, hh, be, used: (grouped_matmul(r, gate_up, be, B, rows_used=used),
                                              grouped_matmul(hh, down, be, B, rows_used=used)))
    s = median_seconds(pallas, rows, h, plan.block_expert, plan.rows_used, reps=reps)
    out["pallas_ms"] = s * 1e3
    out["pallas_TBps"] = expert_bytes / s / 1e12
    out["pallas_TFLOPs"] = flops / s / 1e12

    if with_ragged:  # group sizes of the padded rows: every block's rows go to its expert
        sizes = jnp.bincount(jnp.repeat(plan.block_expert, B), length=E).astype(jnp.int32)
        ragged = jax.jit(lambda r, hh, gs: (jax.lax.ragged_dot(r, gate_up, gs), jax.lax.ragged_dot(hh, down, gs)))
        try:
            s = median_seconds(ragged, rows, h, sizes, reps=reps)
            out["ragged_dot_ms"] = s * 1e3
            out["ragged_dot_TBps"] = expert_bytes / s / 1e12
        except Exception as e:  # noqa: BLE001  (out of memory at large T: its dense expansion)
            out["ragged_dot_error"] = repr(e)[:200]

    a = jnp.ones((T * k, H), jnp.bfloat16)
    b = jnp.ones((H, 3 * I), jnp.bfloat16)
    dense = jax.jit(lambda a, b: a @ b)
    s = median_seconds(dense, a, b, reps=reps)
    out["dense_gemm_ms"] = s * 1e3
    out["dense_gemm_TFLOPs"] = 2 * T * k * H * 3 * I / s / 1e12
    out["pallas_vs_dense_rate"] = out["pallas_TFLOPs"] / out["dense_gemm_TFLOPs"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-30b-a3b,qwen3-235b-a22b")
    ap.add_argument("--tokens", default="64,128,256,1024,2048,8192")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shrink", type=int, default=1, help="divide H and I (CPU smoke runs)")
    ap.add_argument("--ragged-max-tokens", type=int, default=256, help="ragged_dot only up to this T")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        for T in map(int, args.tokens.split(",")):
            r = {"model": name, **one_case(PRESETS[name], T, args.reps, args.shrink, T <= args.ragged_max_tokens)}
            rows.append(r)
            print(f"{name:>16} T={T:>5} B={r['block_rows']:>2} active {r['active_experts']:>3}: pallas "
                  f"{r['pallas_ms']:7.3f} ms {r['pallas_TBps']:5.2f} TB/s {r['pallas_TFLOPs']:6.1f} TFLOP/s | "
                  f"ragged_dot {r.get('ragged_dot_ms', float('nan')):8.3f} ms | dense {r['dense_gemm_TFLOPs']:6.1f} "
                  f"TFLOP/s ({r['pallas_vs_dense_rate']:.2f}x)", flush=True)
            write_result(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
