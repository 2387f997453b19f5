"""RMSNorm (+ residual add) on one GPU: XLA's jitted reference vs the fused Pallas kernel.

For activations x [T, H] (T tokens of a step, H = 5120 Qwen3-32B / 8192 Llama-70B, bf16) times,
in two modes:
  norm  y = rms_norm(x, w, eps)                               (first layer, final norm)
  add   h = x + r; y = rms_norm(h, w, eps); returns (y, h)   (the decoder's attn/ffn norms)
  norm8 / add8  the same, y then quantized per token to e4m3 as the FP8 GEMMs take it
                (models/fp8.py::quantize_tokens after the norm under jit, against the kernel's
                quantize=True: the row's amax in the same pass); err / y_diff on the dequantized y
each as
  reference      benchmarks/rms_norm_pallas.py::rms_norm_reference under jax.jit (XLA fuses it)
  pallas         benchmarks/rms_norm_pallas.py::fused_rms_norm, default block_rows / num_warps
  pallas_r{R}_w{W}  the kernel at block_rows=R, num_warps=W (defaults: 1/4, 1/8, 2/16; --sweep:
                 block_rows 1, 2, 4 x num_warps 4, 8, 16, 32)
and checks each against the reference run op by op, without jit (every intermediate rounded to
its dtype, as written; the jitted reference may differ from it: XLA's default
--xla_allow_excess_precision lets its fusion normalise the float32 x + r rather than the rounded
h): "err" = max |y - y_ref| / max |y_ref| (bf16: a one-ulp rounding flip is up to 2**-7 = 7.8e-3
of a value), "y_diff" = elements of y not bit-equal to it, "h_diff" = elements of h that differ
from x + r (must be 0).
The check (the kernel's correctness test since it left the package; each row of x and r has its
own magnitude, 10**U(-1, 1), so a wrong reduction axis or rows mixed between programs fail it):
h bit-exact; every element of y within 2 ulps of its dtype of the op-by-op reference (float32:
1e-5 relative; the compiled kernel lands 2 ulps away in a handful of 10M outputs on an H200),
"y_over" counting those that are not; for the kernel rows in 2-byte dtypes, under 2% of y not
bit-equal; with e4m3 (norm8 / add8) the dequantized y within one e4m3 step plus two bf16 ulps of
scale. And the op-by-op reference is models/decoder.py::rms_norm (after h = x + r) bit for bit.
A row out of bounds prints CHECK FAILED; after writing the JSON the script exits 1 if any row
(or a run of the reference or the default kernel) failed. On CPU, --interpret runs the check
(below: masked rows and columns, H not a power of 2).
Times: median of --reps calls after warm-up, each followed by jax.block_until_ready ("us"), and
the median per call of --burst back-to-back calls then one block ("us_burst": hides the Python
dispatch gap, but at T=256 the kernels take a few us and both columns are launch/dispatch-bound).
--chain K adds "us_chain": one jitted program of K dependent calls (optimisation barriers between
them, so XLA cannot fuse across calls), per call: device time without dispatch gaps.
GB/s = bytes read + written (x, w, y; add: also r, h) / us_burst. At T=256 the inputs fit in the
H200's L2, so small-T GB/s can exceed HBM bandwidth.

  python benchmarks/norm_kernels.py                       # defaults: T 256,2048,8192 x H 5120,8192
  python benchmarks/norm_kernels.py --tokens 8192 --hidden 5120 --modes add --chain 10
  python benchmarks/norm_kernels.py --tokens 2048 --modes add --sweep      # tune block_rows / num_warps
  python benchmarks/norm_kernels.py --tokens 64,256 --hidden 5120 --modes add,add8 --chain 20  # FP8 decode
  python benchmarks/norm_kernels.py --interpret --tokens 8,13 --hidden 80,128 --reps 2 --burst 2 \\
      --modes norm,add,norm8,add8 --out /tmp/norm.json    # CPU check of the kernel and the script
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from sidp_jax.engine.timing import single_and_burst_us  # noqa: E402
from sidp_jax.models.decoder import rms_norm as decoder_rms_norm  # noqa: E402
from sidp_jax.models.fp8 import quantize_tokens  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from rms_norm_pallas import (  # noqa: E402  (the kernel, beside this script)
    default_block_rows, default_num_warps, fused_rms_norm, rms_norm_reference)

EPS = 1e-6


def chained(step, k: int, add: bool, quant: bool = False):
    """One jitted program of k dependent applications of `step` (the next call's input is this
    call's output; an optimisation barrier keeps XLA from fusing one call into the next). quant:
    the next call reads the same inputs, passed through a barrier with this call's outputs (an
    e4m3 y is no bf16 input; a convert would add a kernel to every call)."""
    def run(x, w, r):
        for _ in range(k):
            if quant:
                x, r, _ = lax.optimization_barrier((x, r, step(x, w, r)))
            elif add:
                y, h = lax.optimization_barrier(step(x, w, r))
                x, r = y.astype(x.dtype), h
            else:
                x = lax.optimization_barrier(step(x, w, r)).astype(x.dtype)
        return (x, r) if add else x
    return jax.jit(run)


def pallas_variants(H: int, sweep: bool):
    """(name, block_rows, num_warps): the defaults, then a few settings around them (--sweep: a
    grid of block_rows x num_warps)."""
    yield "pallas", None, None
    grid = itertools.product((1, 2, 4), (4, 8, 16, 32)) if sweep else ((1, 4), (1, 8), (2, 16))
    for br, nw in grid:
        if br * pl_next_pow2(H) <= 65536:
            yield f"pallas_r{br}_w{nw}", br, nw


def pl_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@jax.jit
def dequantized(y):
    """(e4m3 values [T, H], scale [T]) -> float32 [T, H]."""
    q, scale = y
    return q.astype(jnp.float32) * scale[:, None]


def y_tolerance(dtype, quant: bool) -> tuple[float, float]:
    """(rtol, atol as a fraction of max |y_ref|) each element of y is held to: 2 ulps of the dtype
    (float32: 1e-5); e4m3 (dequantized): one e4m3 step, 2**-3 relative, plus 2 bf16 ulps of the
    scale, and near 0 one step of e4m3's subnormals (2**-9 of a scale, scale = row amax / 448)."""
    if quant:
        return 2.0 ** -3 + 2 * 2.0 ** -7, 2.0 ** -9 / 448
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return 1e-5, 1e-6
    return 2 * (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10), 1e-6


@functools.partial(jax.jit, static_argnames=("rtol", "atol"))
def err_stats(y, h, ry, rh, rtol: float, atol: float):
    yf, ryf = y.astype(jnp.float32), ry.astype(jnp.float32)
    ref_max = jnp.max(jnp.abs(ryf))
    err = jnp.max(jnp.abs(yf - ryf)) / ref_max
    y_diff = jnp.sum(y != ry)
    y_over = jnp.sum(~(jnp.abs(yf - ryf) <= rtol * jnp.abs(ryf) + atol * ref_max))  # NaN counts
    h_diff = jnp.sum(h != rh) if h is not None else jnp.int32(0)
    return err, y_diff, y_over, h_diff


def check_row(row, name: str, dtype, quant: bool, size: int) -> str | None:
    """Why this row fails the check (None: it passes)."""
    why = []
    if row["h_diff"]:
        why.append(f"h differs from x + r in {row['h_diff']} elements")
    if row["y_over"]:
        why.append(f"{row['y_over']} elements of y beyond tolerance (max rel err {row['err']:.1e})")
    if name != "reference" and not quant and jnp.dtype(dtype).itemsize == 2 and row["y_diff"] >= 0.02 * size:
        why.append(f"{row['y_diff'] / size:.1%} of y not bit-equal to the reference (bound 2%)")
    return "; ".join(why) or None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="256,2048,8192")
    ap.add_argument("--hidden", default="5120,8192")
    ap.add_argument("--modes", default="norm,add")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--chain", type=int, default=0, help="also time K dependent calls in one program (us_chain)")
    ap.add_argument("--sweep", action="store_true", help="time a grid of block_rows x num_warps")
    ap.add_argument("--only", default=None, help="regex: keep the kernel variants whose name matches (the reference always runs)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test of this script)")
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/<date>-norm-kernels.json)")
    a = ap.parse_args()
    t_start = time.perf_counter()

    dtype = jnp.dtype(a.dtype)
    device = jax.devices()[0].device_kind
    modes = [m for m in a.modes.split(",") if m]
    if not modes:
        raise SystemExit("--modes: give norm, add or both")
    for m in modes:
        if m not in ("norm", "add", "norm8", "add8"):
            raise SystemExit(f"unknown mode {m!r} (norm, add, norm8, add8)")
    print(f"device: {device}  jax {jax.__version__}  {dtype.name}  eps={EPS}", flush=True)
    rows = []
    for T, H in itertools.product([int(t) for t in a.tokens.split(",")], [int(h) for h in a.hidden.split(",")]):
        kx, kr, kw, ks = jax.random.split(jax.random.key(T * 100003 + H), 4)
        row_scale = 10.0 ** jax.random.uniform(ks, (T, 1), jnp.float32, -1.0, 1.0)  # each row its own size
        x = (row_scale * jax.random.normal(kx, (T, H), jnp.float32)).astype(dtype)
        r = (2.0 * row_scale * jax.random.normal(kr, (T, H), jnp.float32)).astype(dtype)
        w = (1.0 + 0.1 * jax.random.normal(kw, (H,), jnp.float32)).astype(dtype)
        for mode in modes:
            add, quant = mode.startswith("add"), mode.endswith("8")
            y_bytes = T * H + 4 * T if quant else T * H * dtype.itemsize  # e4m3 values + a scale per row
            nbytes = (3 if add else 1) * T * H * dtype.itemsize + y_bytes + H * dtype.itemsize

            def ref_step(x, w, r, add=add, quant=quant):
                return rms_norm_reference(x, w, EPS, r if add else None, quantize=quant)

            # Ground truth: the reference run op by op (every intermediate rounded to its dtype, as
            # written). Under jit XLA may keep excess precision inside its fusion (add mode: the norm
            # of the float32 sum instead of the bf16-rounded h), which the "reference" row's
            # err / y_diff then show.
            ref = jax.block_until_ready(ref_step(x, w, r))
            ry, rh = ref if add else (ref, None)
            # ... which is the decoder's norm (models/decoder.py, after its h = x + r) bit for bit
            dec = decoder_rms_norm(x + r if add else x, w, EPS)
            dec = quantize_tokens(dec) if quant else dec
            ref_vs_decoder = [int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(ry))]
            if add:
                ref_vs_decoder.append(int(jnp.sum(rh != x + r)))
            ry = dequantized(ry) if quant else ry
            rtol, atol = y_tolerance(dtype, quant)
            cands = [("reference", ref_step)]
            for name, br, nw in pallas_variants(H, a.sweep):
                def step(x, w, r, br=br, nw=nw, add=add, quant=quant):
                    return fused_rms_norm(x, w, EPS, r if add else None, quantize=quant, block_rows=br,
                                          num_warps=nw, interpret=a.interpret)
                cands.append((name, step))
            for name, step in cands:
                if a.only and name != "reference" and not re.search(a.only, name):
                    continue
                br, nw = None, None
                if name.startswith("pallas"):
                    m = re.match(r"pallas_r(\d+)_w(\d+)", name)
                    br = int(m.group(1)) if m else default_block_rows(H)
                    nw = int(m.group(2)) if m else default_num_warps(br * pl_next_pow2(H))
                row = dict(mode=mode, T=T, H=H, impl=name, block_rows=br, num_warps=nw, bytes=nbytes)
                if name == "reference":
                    row["ref_vs_decoder_diff"] = sum(ref_vs_decoder)
                try:
                    fn = jax.jit(step)
                    out = jax.block_until_ready(fn(x, w, r))
                    y, h = out if add else (out, None)
                    y = dequantized(y) if quant else y
                    e, yd, yo, hd = (v.item() for v in err_stats(y, h, ry, rh, rtol=rtol, atol=atol))
                    row.update(err=e, y_diff=int(yd), y_over=int(yo), h_diff=int(hd))
                    why = check_row(row, name, dtype, quant, T * H)
                    if row.get("ref_vs_decoder_diff"):
                        why = "; ".join(filter(None, [why, f"the op-by-op reference differs from models/decoder.py's "
                                                          f"rms_norm in {row['ref_vs_decoder_diff']} elements"]))
                    if why:
                        row["check_failed"] = why
                    row["us"], row["us_burst"] = single_and_burst_us(fn, x, w, r, reps=a.reps, burst=a.burst)
                    row["GB_s"] = nbytes / (row["us_burst"] * 1e-6) / 1e9
                    if a.chain:
                        cfn = chained(step, a.chain, add, quant)
                        jax.block_until_ready(cfn(x, w, r))
                        us_c, _ = single_and_burst_us(cfn, x, w, r, reps=max(3, a.reps // 2), burst=1)
                        row["us_chain"] = us_c / a.chain
                        row["GB_s_chain"] = nbytes / (row["us_chain"] * 1e-6) / 1e9
                except Exception as ex:  # noqa: BLE001
                    row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:300] if str(ex) else ''}"
                rows.append(row)
                if "error" in row and name in ("reference", "pallas"):
                    row["check_failed"] = f"did not run: {row['error']}"
                if "error" in row:
                    print(f"  {mode:4s} T={T:5d} H={H:5d} {name:16s} FAILED {row['error']}", flush=True)
                else:
                    chain = f"  {row['us_chain']:8.1f} us_chain" if a.chain else ""
                    print(f"  {mode:4s} T={T:5d} H={H:5d} {name:16s} {row['us']:8.1f} us {row['us_burst']:8.1f} "
                          f"us_burst{chain} {row['GB_s']:7.0f} GB/s  err {row['err']:.1e} y_diff {row['y_diff']} "
                          f"y_over {row['y_over']} h_diff {row['h_diff']}", flush=True)
                if "check_failed" in row:
                    print(f"  {mode:4s} T={T:5d} H={H:5d} {name:16s} CHECK FAILED: {row['check_failed']}", flush=True)
        del x, r, w, ref, ry, rh, dec

    elapsed = time.perf_counter() - t_start
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"{datetime.date.today().isoformat()}-norm-kernels.json")
    meta = dict(device=device, jax=jax.__version__, dtype=dtype.name, eps=EPS, reps=a.reps, burst=a.burst,
                chain=a.chain, interpret=a.interpret, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                elapsed_s=round(elapsed, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_result(out, dict(meta=meta, rows=rows))
    print(f"wrote {out} ({elapsed:.1f} s)")

    chain_h = " us/call (chain) |" if a.chain else ""
    print(f"\n| mode | T | H | impl | us/call | us/call (burst) |{chain_h} GB/s | vs ref | max rel err | y diff | h diff |")
    print("|---|---|---|---|---|---|" + ("---|" if a.chain else "") + "---|---|---|---|---|")
    ref_us = {}
    for row in rows:
        if row["impl"] == "reference" and "error" not in row:
            ref_us[(row["mode"], row["T"], row["H"])] = row["us_burst"]
    for row in rows:
        head = f"| {row['mode']} | {row['T']} | {row['H']} | {row['impl']} |"
        if "error" in row:
            print(f"{head} failed | |" + (" |" if a.chain else "") + f" | | {row['error'][:80]} | | |")
            continue
        base = ref_us.get((row["mode"], row["T"], row["H"]))
        speed = f"{base / row['us_burst']:.2f}x" if base else "-"
        chain = f" {row['us_chain']:.1f} |" if a.chain else ""
        print(f"{head} {row['us']:.1f} | {row['us_burst']:.1f} |{chain} {row['GB_s']:.0f} | {speed} | "
              f"{row['err']:.1e} | {row['y_diff']} | {row['h_diff']} |")
    failed = [row for row in rows if "check_failed" in row]
    for row in failed:
        print(f"CHECK FAILED: {row['mode']} T={row['T']} H={row['H']} {row['impl']}: {row['check_failed']}")
    if failed:
        raise SystemExit(1)
    print(f"check passed: {len(rows)} rows")


if __name__ == "__main__":
    main()
