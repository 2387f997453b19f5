"""How long each layout's bf16 greedy output follows transformers' float32 greedy tokens (CPU).

Runs the tiny Qwen3 fixture's prompts through every layout x placement x mode on `--mesh`
(8 virtual CPU devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8), in bfloat16, and
reports per prompt how many leading tokens equal the stored float32 reference. In bf16 the layouts
reduce in different orders, so near-tied logits of a random tiny model can flip.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bf16_agreement.py --out r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from provenance import write_result  # noqa: E402  (benchmarks/ is on sys.path)
from sidp_jax import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"  # the reference outputs
TINY_QWEN3 = ROOT / "sidp_jax" / "assets" / "tiny-qwen3"  # the bundled model (stored once, in the package)
VARIANTS = [("dp", "striped", "auto"), ("tp", "striped", "auto"), ("sidp", "striped", "was"),
            ("sidp", "striped", "cas"), ("sidp", "owner", "was"), ("sidp", "owner", "cas")]


def agreement(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="dp=2")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    meta = json.loads((FIXTURES / "reference" / "tiny-qwen3.json").read_text())
    prompts = [p["token_ids"] for p in meta["prompts"]]
    want = [p["greedy_token_ids"][:a.tokens] for p in meta["prompts"]]
    greedy = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    rows = []
    for parallel, placement, mode in VARIANTS:
        llm = LLM(str(TINY_QWEN3), mesh=a.mesh, parallel=parallel, placement=placement,
                  ffn_mode=mode, dtype="bfloat16", max_num_batched_tokens=16, max_num_seqs=4, kv_cache_tokens=256,
                  max_model_len=256, verbose=False, devices=jax.devices("cpu"))
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        rows.append({"parallel": parallel, "placement": placement, "ffn_mode": mode,
                     "tokens_agreeing": [agreement(o.outputs[0].token_ids, w) for o, w in zip(outs, want)]})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        write_result(a.out, {"mesh": a.mesh, "tokens": a.tokens, "rows": rows})


if __name__ == "__main__":
    main()
