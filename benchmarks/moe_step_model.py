"""A model of a Qwen3-MoE decode step on D GPUs: dp, tp and sidp (CaS, WaS) per GPU, computed.

No multi-GPU kind has been lent, so this predicts; the runs that would check it are one command
each (benchmarks/moe_multi_gpu.sh). Per MoE layer, per step, T decode tokens per replica:
  experts a step of n tokens reaches   a(n) = E (1 - (1 - k/E)^n)   (random routing)
  expert GEMMs on one GPU              max(bytes of the experts reached / W, FLOPs / M)
                                       (W: the grouped GEMM's weight-read rate, M: its matmul rate)
  dp      each GPU: its replica's T tokens over every expert it holds.
  tp      one replica of D GPUs runs D*T tokens; each GPU 1/D of every expert (intermediate split),
          plus two all-reduces of the D*T activations per layer (attention and FFN).
  sidp    CaS: all_gather the D replicas' tokens, each owner runs the ~T*k pairs routed to its E/D
          experts (a(D*T)/D of them reached), reduce-scatter the float32 partial sums back.
          WaS: fetch the layer's (D-1)/D remote experts (device_put) while computing as dp.
Each layout's KV capacity (sidp_jax/parallel/layouts.py kv_tokens_per_gpu, at --util on a
--memory-GB GPU, --workspace-GB of temporaries) caps the batch: T = min(--max-seqs, KV tokens /
--context) sequences per replica. Attention reads the KV cache at the HBM rate, and the
non-expert weights are read once per step. Output: step ms and output tokens/s per GPU.

  python benchmarks/moe_step_model.py --out benchmarks/results/<date>-model-moe-step.json
Defaults are H200 figures: HBM 3.6 TB/s and bf16 matmul 620 TFLOP/s (roofline probes, RESULTS.md),
grouped GEMM at 75% of HBM and 70% of matmul (assumed until benchmarks/moe_gemm.py measures
them), NVLink all_gather 200 GB/s, device_put 329 GB/s, 20 us per collective (2x H200).
"""

from __future__ import annotations

import argparse

from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from sidp_jax.models.config import PRESETS
from sidp_jax.parallel.capacity import weight_bytes
from sidp_jax.parallel.layouts import kv_tokens_per_gpu


def reached(n: float, E: int, k: int) -> float:
    return E * (1 - (1 - k / E) ** n)


def step_ms(cfg, layout: str, D: int, T: int, context: int, a) -> dict:
    """One decode step of T sequences per replica (tp: D*T per replica of D GPUs), per GPU."""
    H, I, E, k, L = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.num_layers
    f = 3 * H * I * 2  # one expert's bf16 bytes
    W, M, B = a.gemm_weight_TBps * 1e12, a.gemm_TFLOPs * 1e12, a.hbm_TBps * 1e12
    gemm = lambda bytes_, pairs: max(bytes_ / W, 2 * pairs * 3 * H * I / M)
    w = weight_bytes(cfg)
    other = (w.replicated - cfg.vocab_size * H * 2 + w.attention) / L  # per layer: attention, norms, head share
    kv = cfg.kv_bytes_per_token() / L
    lat = a.collective_us * 1e-6
    tokens = D * T if layout == "tp" else T
    attn = (other / (D if layout == "tp" else 1) + tokens * context * kv / (D if layout == "tp" else 1)) / B
    if layout == "dp":
        ffn = gemm(reached(T, E, k) * f, T * k)
    elif layout == "tp":
        ffn = gemm(reached(D * T, E, k) * f / D, D * T * k / D) \
            + 2 * (2 * (D - 1) / D * D * T * H * 2 / (a.allgather_GBps * 1e9) + lat)
    elif layout == "sidp-cas":
        ffn = gemm(reached(D * T, E, k) / D * f, T * k) \
            + (D - 1) * T * H * 2 / (a.allgather_GBps * 1e9) + (D - 1) * T * H * 4 / (a.allgather_GBps * 1e9) + 2 * lat
    else:  # sidp-was: the remote experts arrive while the local ones compute (overlap efficiency 0.93 measured)
        compute = gemm(reached(T, E, k) * f, T * k)
        fetch = (D - 1) / D * E * f / (a.device_put_GBps * 1e9)
        ffn = max(compute, fetch / 0.93)
    ms = L * (attn + ffn) * 1e3
    return {"step_ms": ms, "tokens_per_step_per_gpu": tokens / (D if layout == "tp" else 1),
            "output_tokens_per_s_per_gpu": tokens / (D if layout == "tp" else 1) / (ms / 1e3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,qwen3-235b-a22b")
    ap.add_argument("--replicas", default="1,2,4,8")
    ap.add_argument("--memory-GB", type=float, default=141.0)
    ap.add_argument("--util", type=float, default=0.9)
    ap.add_argument("--workspace-GB", type=float, default=4.0)
    ap.add_argument("--context", type=int, default=2048, help="mean cached tokens per sequence")
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--hbm-TBps", type=float, default=3.6)
    ap.add_argument("--gemm-weight-TBps", type=float, default=0.75 * 3.6)
    ap.add_argument("--gemm-TFLOPs", type=float, default=0.7 * 620)
    ap.add_argument("--allgather-GBps", type=float, default=200.0)
    ap.add_argument("--device-put-GBps", type=float, default=329.0)
    ap.add_argument("--collective-us", type=float, default=20.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    print("| model | D | layout | KV tokens/GPU | seqs/replica | step ms | out tok/s/GPU | vs dp |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        cfg = PRESETS[name]
        for D in map(int, a.replicas.split(",")):
            base = None
            for layout in ("dp", "tp", "sidp-cas", "sidp-was"):
                parallel = layout.split("-")[0]
                if D == 1 and layout != "dp":
                    continue
                if parallel == "tp":  # one replica over the D GPUs: the group's tokens
                    per_replica = kv_tokens_per_gpu(cfg, "tp", 1, a.memory_GB * 1e9, a.util, a.workspace_GB * 1e9,
                                                    tp=D)
                    kv, T = per_replica // D, min(a.max_seqs * D, per_replica // a.context) // D
                else:
                    kv = per_replica = kv_tokens_per_gpu(cfg, parallel, D, a.memory_GB * 1e9, a.util,
                                                         a.workspace_GB * 1e9)
                    T = min(a.max_seqs, per_replica // a.context)
                if T < 1:
                    continue
                r = {"model": name, "D": D, "layout": layout, "kv_tokens_per_gpu": kv, "seqs_per_replica":
                     T * (D if parallel == "tp" else 1), **step_ms(cfg, layout, D, T, a.context, a)}
                base = base or (r["output_tokens_per_s_per_gpu"] if layout == "dp" else None)
                r["vs_dp"] = r["output_tokens_per_s_per_gpu"] / base if base else None
                rows.append(r)
                print(f"| {name} | {D} | {layout} | {kv:,} | {r['seqs_per_replica']} | {r['step_ms']:.1f} | "
                      f"{r['output_tokens_per_s_per_gpu']:,.0f} | " + (f"{r['vs_dp']:.2f}x |" if r["vs_dp"] else "- |"))
    if a.out:
        write_result(a.out, {"args": vars(a), "rows": rows, "kind": "computed model, not a measurement"})


if __name__ == "__main__":
    main()
