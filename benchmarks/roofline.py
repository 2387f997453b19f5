"""A large-batch decode step against its roofline floor, on one GPU.

floor = max((bytes of weights read + KV bytes read) / measured HBM bandwidth,
            FLOPs / measured bf16 matmul rate)
measured on the same GPU in the same process, before the models and again after them (each rate
the better of the two; a GPU's clocks can still be ramping up at the first probe: on 2026-12-03 the
first probes read 2.5 TB/s while the step's own GEMMs moved 3.5):
  HBM bandwidth  a jitted scale pass (read + write) and a sum (read) over a 4 GiB bf16 array
  matmul rate    a jitted 8192^3 bf16 matmul with bf16 and with float32 outputs
  decode step    the engine's own compiled step (ModelRunner, dp=1, the model's preset shape with
                 random weights) on a decode-only batch: S sequences, each with `context` cached
                 tokens on distinct pages, decode attention kernel where the engine uses it, greedy
                 sampling included. Median of --reps steps (the KV cache is carried through).
Beside it, every layer's GEMMs at M = S timed alone in one program: how much of the step the
projections and FFN take by themselves, and the weight bytes per second they move.
Weights read per step: every parameter except the embedding table (rows are gathered; a tied
table is read whole as the LM head). FLOPs: 2 x (matmul parameters) x S + attention 4 x S x context
x Nq x D per layer.

  python benchmarks/roofline.py --model qwen3-32b --batch 128,256 --context 1024,512 --out roofline.json
  python benchmarks/roofline.py --model qwen3-32b --batch 64,256 --context 1024,1024 --quantization none,fp8
FP8 (--quantization fp8): weight bytes at one byte per projection weight, the e4m3 GEMMs' FLOPs at
the measured e4m3 matmul rate.
  python benchmarks/roofline.py --model tiny --batch 8 --context 64 --reps 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sidp_jax.engine.sampler import SamplerFlags  # noqa: E402
from sidp_jax.engine.step_inputs import StepShape  # noqa: E402
from sidp_jax.engine.timing import median_seconds  # noqa: E402
from sidp_jax.models.fp8 import E4M3, linear  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def hbm_bandwidth(gib: float, reps: int) -> float:
    """The best of a scale pass (read + write) and a sum (read only) over `gib` GiB of bf16."""
    n = int(gib * 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    scale = jax.jit(lambda a: a * jnp.bfloat16(1.5))
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    best = max(2 * n * 2 / median_seconds(scale, x, reps=reps), n * 2 / median_seconds(total, x, reps=reps))
    del x
    return best


def device_rates(a, when: str) -> dict:
    """HBM bandwidth and matmul rates (bf16; e4m3 when FP8 is asked for), each after a second of
    the same work to bring the clocks up."""
    warm = jax.jit(lambda m: m @ m)
    m = jnp.ones((a.matmul_n, a.matmul_n), jnp.bfloat16)
    t = time.perf_counter()
    while time.perf_counter() - t < 1.0:
        jax.block_until_ready(warm(m))
    del m
    r = dict(hbm_bytes_per_s=hbm_bandwidth(a.hbm_gib, a.reps), matmul_flops_per_s=matmul_rate(a.matmul_n, a.reps),
             e4m3_matmul_flops_per_s=matmul_rate(a.matmul_n, a.reps, E4M3) if "fp8" in a.quantization else None)
    print(f"  {when}: HBM {r['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {r['matmul_flops_per_s'] / 1e12:.0f} "
          "TFLOP/s" + (f", e4m3 matmul {r['e4m3_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"
                       if r["e4m3_matmul_flops_per_s"] else ""), flush=True)
    return dict(r, when=when)


def matmul_rate(n: int, reps: int, dtype=jnp.bfloat16) -> float:
    """The best rate of n^3 matmuls of `dtype` operands (bf16, or e4m3 as the FP8 GEMMs run them:
    the second operand [N, K]) with bf16 and with float32 outputs."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16).astype(dtype)
    dims = (((1,), (1,)), ((), ())) if dtype == E4M3 else (((1,), (0,)), ((), ()))
    rates = []
    for out in (jnp.bfloat16, jnp.float32):
        f = jax.jit(lambda a, b, out=out: jax.lax.dot_general(a, b, dims, preferred_element_type=out))
        rates.append(2 * n**3 / median_seconds(f, a, b, reps=reps))
    return max(rates)


def layer_gemms_ms(params: dict, S: int, reps: int) -> float:
    """Every layer's projections and FFN GEMMs (fused QKV, o, gate_up, down) at M = S rows in ONE
    program (a Python loop over the per-layer weights, as the step walks them), nothing else.
    None for a mixture-of-experts model (benchmarks/moe_gemm.py times its expert GEMMs)."""
    from sidp_jax.engine.compilation import step_compiler_options

    if any("gate_up" not in w["ffn"] for w in params["layers"]):
        return None
    x = jnp.ones((S, params["embed"].shape[1]), params["embed"].dtype)
    proj = lambda x, w, k, out=None: linear(x, w[k], out_dtype=out)  # bf16, or W8A8 where w[k] is Quantized

    def gemms(x, layers):
        for w in layers:
            qkv = proj(x, w, "qkv")
            g = qkv.shape[2] - 2
            q = qkv[:, :, :g].reshape(S, -1, qkv.shape[-1])
            o = proj(q, w, "o", jnp.float32).astype(x.dtype)
            gu = proj(o, w, "gate_up")
            x = proj(gu[:, 0] * gu[:, 1], w, "down", jnp.float32).astype(o.dtype)
        return x

    layers = [{"qkv": w["qkv"], "o": w["o"], **w["ffn"]} for w in params["layers"]]
    fn = jax.jit(gemms, compiler_options=step_compiler_options(jax.default_backend()))
    return median_seconds(fn, x, layers, reps=reps) * 1e3


def gemm_weight_bytes(params: dict) -> int:
    w = params["layers"][0]
    return sum(a.nbytes for a in jax.tree.leaves((w["qkv"], w["o"], w["ffn"])))


def hlo_gemm_census(compiled_text: str, num_layers: int) -> dict:
    """How the optimized step reaches its weights: GEMM library calls (cuBLAS / cuBLASLt custom
    calls) and copies or dynamic slices of weight-sized buffers (which a scan over stacked
    weights produced). Per layer we expect 4 GEMMs (fused QKV, o, gate_up, down) and no copies."""
    import re

    gemms = len(re.findall(r'custom_call_target="__cublas(?:lt)?\$(?:lt\$)?(?:matmul|gemm)', compiled_text))
    fp8_gemms = len(re.findall(r'custom_call_target="__cublas\$lt\$matmul\$f8"', compiled_text))
    weight_copies = len(re.findall(r"= (?:bf16|f8e4m3fn)\[(?:\d{4,},?){2,}[^\]]*\][^=]*? "
                                   r"(?:copy|transpose|dynamic-slice)\(", compiled_text))
    triton = len(re.findall(r'"kind":"__triton_gemm"', compiled_text))
    return {"gemm_calls": gemms, "gemm_calls_per_layer": gemms / num_layers, "fp8_gemm_calls": fp8_gemms,
            "triton_gemm_fusions": triton, "weight_sized_copies": weight_copies}


def decode_batch(S: int, context: int, page_size: int, vocab: int, seed: int):
    """A decode-only step as sidp_jax.engine.step_inputs lays it out: token i in row i, one replica."""
    rng = np.random.default_rng(seed)
    MB = -(-(context + 1) // page_size)
    shape = StepShape(1, S, S, MB, decode_only=True)
    batch, samp = shape.arrays(shape.batch_fields()), shape.arrays(shape.sampling_fields())  # greedy rows
    pages = (1 + np.arange(S * MB, dtype=np.int32)).reshape(S, MB)
    pos = np.full(S, context, np.int32)  # `context` cached tokens before this one
    batch.update(tokens=rng.integers(100, vocab - 100, (1, S)).astype(np.int32), positions=pos[None],
                 slots=(pages[np.arange(S), pos // page_size] * page_size + pos % page_size)[None],
                 token_seq=np.arange(S, dtype=np.int32)[None], block_tables=pages[None],
                 sample_index=np.arange(S, dtype=np.int32)[None], num_tokens=np.array([S], np.int32),
                 prev_tokens=np.zeros((1, S), np.int32))  # no token comes from a previous step
    return batch, samp, S * MB


def engine_decode_step(runner, S: int, context: int, page_size: int, vocab: int):
    """The engine's compiled decode-only step on decode_batch(S, context): (step, fn, batch,
    sampling), where step() runs it once and carries the KV cache in runner.kv."""
    batch, samp, _ = decode_batch(S, context, page_size, vocab, seed=S + context)
    fn = runner.step_fn("local", SamplerFlags(), decode_only=True)
    b, s = jax.device_put((batch, samp), runner.batch_sharding)

    def step():
        out, runner.kv, runner.counts = fn(runner.params, runner.kv, runner.counts, b, s)
        return out

    return step, fn, b, s


def step_cost(cfg, params: dict, S: int, context: int, kv_bytes: int) -> tuple[float, float, float, float]:
    """(weight bytes read, KV bytes read, FLOPs of the e4m3 GEMMs, other FLOPs) of one decode step
    of S sequences; kv_bytes: per cached element."""
    leaves = {"/".join(str(getattr(k, "key", k)) for k in path): a
              for path, a in jax.tree_util.tree_leaves_with_path(params)}
    embed = leaves["embed"]
    experts = {k: a for k, a in leaves.items() if "/experts_" in k}  # a MoE layer's stacked experts
    # a step of S tokens reaches E(1 - (1 - k/E)^S) of a layer's E experts on average (random routing);
    # each token multiplies k of them
    active = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** S if experts else 0.0
    used = cfg.num_experts_per_tok / cfg.num_experts if experts else 0.0
    read = sum(a.nbytes for a in leaves.values()) - (0 if cfg.tie_word_embeddings else embed.nbytes) \
        - (1 - active) * sum(a.nbytes for a in experts.values())
    fp8 = sum(a.size for a in leaves.values() if a.dtype == E4M3)
    other = sum(a.size for a in leaves.values() if a.dtype != E4M3) - embed.size \
        + (embed.size if cfg.tie_word_embeddings else 0) \
        - (1 - used) * sum(a.size for a in experts.values())  # the LM head; norms/biases/scales: negligible
    kv_read = 2 * cfg.num_layers * S * (context + 1) * cfg.num_kv_heads * cfg.head_dim * kv_bytes
    attn_flops = 4 * S * (context + 1) * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return read, kv_read, 2 * fp8 * S, 2 * other * S + attn_flops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-32b", help="a preset name, or 'tiny' (the bundled model)")
    ap.add_argument("--batch", default="128,256")
    ap.add_argument("--context", default="1024,512", help="one per --batch entry")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hbm-gib", type=float, default=4.0)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--quantization", default="none", help="comma list of none and fp8: each runs in turn")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sidp_jax import LLM

    dev = jax.devices()[:1]
    print(f"device: {dev[0].device_kind}  jax {jax.__version__}", flush=True)
    probes = [device_rates(a, "before the models")]
    cases = list(zip([int(b) for b in a.batch.split(",")], [int(c) for c in a.context.split(",")]))
    P = 16
    max_pages = max(S * -(-(c + 1) // P) for S, c in cases) + 1
    rows, census = [], {}
    for quant in a.quantization.split(","):
        llm = LLM(None if a.model == "tiny" else a.model, mesh="dp=1", devices=dev, kv_cache_tokens=max_pages * P,
                  max_num_seqs=max(S for S, _ in cases), max_num_batched_tokens=max(S for S, _ in cases),
                  kv_block_size=P, verbose=False, quantization=None if quant == "none" else quant,
                  kv_cache_dtype=a.kv_cache_dtype, precompile=False)
        runner = llm.engine.runner
        for S, ctx in cases:
            step, fn, b, s = engine_decode_step(runner, S, ctx, P, llm.cfg.vocab_size)
            if quant not in census:
                census[quant] = hlo_gemm_census(fn.lower(runner.params, runner.kv, runner.counts, b, s).compile().as_text(),
                                                llm.cfg.num_layers)
                print(f"  {quant}: optimized HLO: {census[quant]}", flush=True)
            t0 = time.perf_counter()
            jax.block_until_ready(step())
            first_s = time.perf_counter() - t0  # compile (or cache load) + one step
            dt = median_seconds(step, reps=a.reps)
            w_bytes, kv_bytes, fp8_flops, flops = step_cost(llm.cfg, runner.params, S, ctx,
                                                            jnp.dtype(llm.kv_dtype).itemsize)
            gemm_ms = layer_gemms_ms(runner.params, S, a.reps)
            gemm_tbps = gemm_weight_bytes(runner.params) * llm.cfg.num_layers / (gemm_ms / 1e3) / 1e12 \
                if gemm_ms else None
            rows.append(dict(quantization=quant, kv_cache_dtype=a.kv_cache_dtype, batch=S, context=ctx,
                             step_ms=dt * 1e3, layer_gemms_alone_ms=gemm_ms, layer_gemms_weight_TB_per_s=gemm_tbps,
                             weight_GB=w_bytes / 1e9, kv_GB=kv_bytes / 1e9, TFLOP=(flops + fp8_flops) / 1e12,
                             bf16_TFLOP=flops / 1e12, e4m3_TFLOP=fp8_flops / 1e12,
                             attention=runner.attention_kind(True), first_call_s=first_s,
                             startup_s=llm.startup_seconds))
            print(f"  {quant} S={S} ctx={ctx}: step {dt * 1e3:.2f} ms" + (
                f"; the layers' GEMMs alone {gemm_ms:.2f} ms ({gemm_tbps:.2f} TB/s of weights)" if gemm_ms else ""),
                flush=True)
        llm = runner = fn = step = None  # free this model's weights before the next one loads
        gc.collect()
    probes.append(device_rates(a, "after the models"))
    best = {k: max((p[k] for p in probes if p[k]), default=None) for k in probes[0] if k != "when"}
    for r in rows:
        mem_floor = (r["weight_GB"] + r["kv_GB"]) * 1e9 / best["hbm_bytes_per_s"]
        compute_floor = r["bf16_TFLOP"] * 1e12 / best["matmul_flops_per_s"] + (
            r["e4m3_TFLOP"] * 1e12 / best["e4m3_matmul_flops_per_s"] if r["e4m3_TFLOP"] else 0)
        r.update(floor_ms=max(mem_floor, compute_floor) * 1e3, memory_floor_ms=mem_floor * 1e3,
                 compute_floor_ms=compute_floor * 1e3)
        r["ratio"] = r["step_ms"] / r["floor_ms"]

    base = {(r["batch"], r["context"]): r["step_ms"] for r in rows if r["quantization"] == rows[0]["quantization"]}
    print("\n| weights | batch | context | step ms | floor ms (memory / compute) | step / floor | "
          "step / first's | layers' GEMMs alone ms (TB/s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["step_vs_first_quantization"] = r["step_ms"] / base[(r["batch"], r["context"])]
        print(f"| {r['quantization']} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} "
              f"({r['memory_floor_ms']:.2f} / {r['compute_floor_ms']:.2f}) | {r['ratio']:.2f}x | "
              f"{r['step_vs_first_quantization']:.2f}x | "
              + (f"{r['layer_gemms_alone_ms']:.2f} ({r['layer_gemms_weight_TB_per_s']:.2f}) |"
                 if r["layer_gemms_alone_ms"] else "- |"))
    if a.out:
        meta = dict(device=dev[0].device_kind, jax=jax.__version__, model=a.model, **best, probes=probes,
                    argv=sys.argv[1:], hlo=census)
        write_result(a.out, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
