"""How well Weight-as-a-Service hides the fetch of the next FFN layer behind the current one.

For L FFN layers of a model's shape, T tokens per replica and D replicas (one per GPU), times:
  compute   every replica runs the L layers on full local weights (no communication)
  fetch     the striped all-gather of the L layers only (no compute)
  was:*     both, by each mechanism below
  cas       striped CaS (all-gather activations, local slice, reduce-scatter)
Overlap efficiency = (fetch + compute - was) / min(fetch, compute); 1.0 is perfect hiding.
Mechanisms:
  scan            lax.scan, the layer's all_gather inside the layer (what the engine runs)
  scan_prefetch   lax.scan carrying the next layer's gathered weights (double buffer)
  unrolled        Python-unrolled layers, next layer's all_gather issued before this layer's GEMMs
  device_put      per-replica jitted layer calls; the next layer copied by async cross-device
                  device_put (copy engines) from its owner (owner placement, l mod D)

  python benchmarks/was_overlap.py --layers 12 --tokens 512,2048,4096 --out results.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sidp_jax.models.config import PRESETS  # noqa: E402
from sidp_jax.models.ffn import DenseFfn, local_ffn  # noqa: E402
from sidp_jax.pool.ffn import make_striped_ffns  # noqa: E402

dense_ffn = functools.partial(local_ffn, cfg=None, group=DenseFfn)  # a dense group needs no config
striped_cas = make_striped_ffns({"gate_up": 2, "down": 0}, dense_ffn)["cas"]  # bf16 leaves: the intermediate axis
from sidp_jax.engine.timing import median_seconds  # noqa: E402
from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)


def gather(w):
    return {"gate_up": jax.lax.all_gather(w["gate_up"], "dp", axis=2, tiled=True),
            "down": jax.lax.all_gather(w["down"], "dp", axis=0, tiled=True)}


def layer_slice(w, l):
    return jax.tree.map(lambda a: a[l], w)


def build(mesh, L):
    spec_x = P("dp")
    spec_striped = {"gate_up": P(None, None, None, "dp"), "down": P(None, "dp", None)}
    spec_full = {"gate_up": P(), "down": P()}
    sm = lambda f, w_spec: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(spec_x, w_spec), out_specs=spec_x,
                                                 check_vma=False))

    def compute(x, w):
        return jax.lax.scan(lambda h, wl: (h + dense_ffn(h, 0, wl), None), x, w)[0]

    def fetch(x, w):  # gather every layer, touch one element so nothing is optimised away
        def body(acc, wl):
            g = gather(wl)
            return acc + g["down"][0, 0].astype(acc.dtype) + g["gate_up"][0, 0, 0].astype(acc.dtype), None
        return jax.lax.scan(body, x, w)[0]

    def was_scan(x, w):
        return jax.lax.scan(lambda h, wl: (h + dense_ffn(h, 0, gather(wl)), None), x, w)[0]

    def was_scan_prefetch(x, w):
        first = gather(layer_slice(w, 0))
        nxt = jax.tree.map(lambda a: jnp.concatenate([a[1:], a[:1]]), w)  # layer l+1 beside layer l

        def body(carry, wl_next):
            h, cur = carry
            fetched = gather(wl_next)
            return (h + dense_ffn(h, 0, cur), fetched), None
        return jax.lax.scan(body, (x, first), nxt)[0][0]

    def was_unrolled(x, w):
        cur = gather(layer_slice(w, 0))
        for l in range(L):
            nxt = gather(layer_slice(w, l + 1)) if l + 1 < L else None
            x = x + dense_ffn(x, 0, cur)
            cur = nxt
        return x

    def cas(x, w):
        return jax.lax.scan(lambda h, wl: (h + striped_cas(h, 0, wl), None), x, w)[0]

    return {"compute": sm(compute, spec_full), "fetch": sm(fetch, spec_striped), "was:scan": sm(was_scan, spec_striped),
            "was:scan_prefetch": sm(was_scan_prefetch, spec_striped), "was:unrolled": sm(was_unrolled, spec_striped),
            "cas": sm(cas, spec_striped)}


def device_put_was(devices, L, H, I, T, dtype):
    """Per-replica programs; layer l lives on devices[l % D]; next layer prefetched by device_put."""
    D = len(devices)
    key = jax.random.key(1)
    owned = {l: jax.device_put({"gate_up": (0.01 * jax.random.normal(jax.random.fold_in(key, l), (H, 2, I))).astype(dtype),
                                "down": (0.01 * jax.random.normal(jax.random.fold_in(key, 100 + l), (I, H))).astype(dtype)},
                               devices[l % D]) for l in range(L)}
    xs = [jax.device_put(jnp.ones((T, H), dtype), d) for d in devices]
    step = jax.jit(lambda x, w: x + dense_ffn(x, 0, w))

    def run_all(fetch_remote: bool, do_compute: bool):
        hs = list(xs)
        bufs = [owned[0] if 0 % D == r else jax.device_put(owned[0], devices[r]) for r in range(D)]
        fetched = []  # every copy, so the timer waits for all of them (not only the last layer's)
        for l in range(L):
            nxt = []
            for r, dev in enumerate(devices):
                if l + 1 < L:
                    src = owned[l + 1]
                    nxt.append(src if (l + 1) % D == r or not fetch_remote else jax.device_put(src, dev))
                if do_compute:
                    hs[r] = step(hs[r], bufs[r] if fetch_remote else owned[l] if l % D == r else owned_local[r])
            bufs = nxt
            fetched.append(nxt)
        return hs, fetched

    owned_local = [jax.device_put(owned[0], d) for d in devices]  # compute-only: a local stand-in

    return {"compute": median_seconds(run_all, False, True), "fetch": median_seconds(run_all, True, False),
            "was": median_seconds(run_all, True, True)}


def efficiency(fetch, compute, both):
    return (fetch + compute - both) / min(fetch, compute)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-32b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--dp", type=int, default=len(jax.devices()))
    ap.add_argument("--out", default=None)
    ap.add_argument("--shrink", type=int, default=1, help="divide hidden/intermediate (CPU smoke runs)")
    args = ap.parse_args()
    cfg = PRESETS[args.model]
    H, I, L, D = cfg.hidden_size // args.shrink, cfg.intermediate_size // args.shrink, args.layers, args.dp
    devices = jax.devices()[:D]
    mesh = Mesh(devices, ("dp",))
    dtype = jnp.bfloat16
    key = jax.random.key(0)
    full_sh = NamedSharding(mesh, P())
    striped_sh = {"gate_up": NamedSharding(mesh, P(None, None, None, "dp")), "down": NamedSharding(mesh, P(None, "dp", None))}
    mk = lambda k, shape, sh: jax.jit(lambda: (0.01 * jax.random.normal(k, shape)).astype(dtype), out_shardings=sh)()
    w_striped = {"gate_up": mk(key, (L, H, 2, I), striped_sh["gate_up"]), "down": mk(key, (L, I, H), striped_sh["down"])}
    w_full = {"gate_up": mk(key, (L, H, 2, I), full_sh), "down": mk(key, (L, I, H), full_sh)}
    fns = build(mesh, L)
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        x = jax.device_put(jnp.ones((D * T, H), dtype), NamedSharding(mesh, P("dp")))
        r = {"tokens_per_replica": T, "compute": median_seconds(fns["compute"], x, w_full), "fetch": median_seconds(fns["fetch"], x, w_striped)}
        for name in ("was:scan", "was:scan_prefetch", "was:unrolled", "cas"):
            r[name] = median_seconds(fns[name], x, w_striped)
        dput = device_put_was(devices, L, H, I, T, dtype)
        r.update({"device_put:compute": dput["compute"], "device_put:fetch": dput["fetch"], "was:device_put": dput["was"]})
        for name in ("was:scan", "was:scan_prefetch", "was:unrolled"):
            r[f"eff:{name}"] = efficiency(r["fetch"], r["compute"], r[name])
        r["eff:was:device_put"] = efficiency(dput["fetch"], dput["compute"], dput["was"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    result = {"model": args.model, "layers": L, "dp": D, "device": devices[0].device_kind, "jax": jax.__version__,
              "rows": rows}
    if args.out:
        write_result(args.out, result)
    print(f"\n{'T':>6} {'compute':>8} {'fetch':>7} | " + " ".join(f"{m:>22}" for m in
          ("was:scan", "was:scan_prefetch", "was:unrolled", "was:device_put")) + f" | {'cas':>7}  (ms; eff)")
    for r in rows:
        cells = " ".join(f"{1e3 * r[m]:>14.2f} ({r['eff:' + m]:+.2f})" for m in
                         ("was:scan", "was:scan_prefetch", "was:unrolled", "was:device_put"))
        print(f"{r['tokens_per_replica']:>6} {1e3 * r['compute']:>8.2f} {1e3 * r['fetch']:>7.2f} | {cells} | {1e3 * r['cas']:>7.2f}")


if __name__ == "__main__":
    main()
