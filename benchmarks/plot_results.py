"""Plots for benchmarks/RESULTS.md from the committed JSON results (needs matplotlib).

  python benchmarks/plot_results.py   # writes benchmarks/results/*.png
"""

from __future__ import annotations

import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "results")


def load(pattern: str) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, pattern)))]


def plot_crossover() -> None:
    spmd = load("*-crossover.json")[0]["seconds_per_layer"]
    replicas = load("*-crossover-replicas.json")[0]["seconds_per_layer"]
    tokens = sorted(int(t) for t in spmd)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tokens, [1e3 * spmd[str(t)]["was"] for t in tokens], "o-", label="WaS, in the SPMD step")
    ax.plot(tokens, [1e3 * replicas[str(t)]["was"] for t in tokens], "s-", label="WaS, per-replica + device_put")
    ax.plot(tokens, [1e3 * spmd[str(t)]["cas"] for t in tokens], "^-", label="CaS striped")
    ax.set(xscale="log", yscale="log", xlabel="tokens per replica in the step", ylabel="ms per FFN layer",
           title="WaS vs CaS, Qwen3-32B FFN layer, dp=2, 2x H200")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "crossover.png"), dpi=110)


def plot_kv_capacity() -> None:
    rows = [r for f in load("*-kv_capacity-qwen3-32b-*.json") for r in f["rows"] if "error" not in r]
    utils = sorted({r["util"] for r in rows})
    layouts = ["dp", "sidp", "sidp/was", "tp"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.2
    for i, lay in enumerate(layouts):
        vals = [next((r["kv_tokens_per_gpu"] / 1e3 for r in rows if r["parallel"] == lay and r["util"] == u), 0)
                for u in utils]
        ax.bar([j + i * width for j in range(len(utils))], vals, width, label=lay)
    ax.set_xticks([j + 1.5 * width for j in range(len(utils))], [f"util {u}" for u in utils])
    ax.set(ylabel="KV tokens per GPU (thousands)", title="KV capacity, Qwen3-32B, 2x H200 (dp=2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "kv_capacity.png"), dpi=110)


def plot_throughput() -> None:
    """Output tokens/s per layout of each run on the attention kernels (one run per group)."""
    runs = load("*-kernels-throughput-*.json")
    layouts = ["dp", "tp", "sidp"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels, seen = [], set()
    for j, run in enumerate(runs):
        a = run["args"]
        by = {r["parallel"]: r["output_tokens_per_s"] for r in run["rows"] if "error" not in r}
        model = a["model"].replace("llama3.1-70b", "Llama-70B").replace("qwen3-32b", "Qwen3-32B")
        guard = " (guard)" if "guard" in run.get("note", "") else ""
        labels.append(f"{model}{guard}\n{a['input_len']}/{a['output_len']}, util {a['gpu_memory_utilization']}")
        for i, lay in enumerate(layouts):
            if lay in by:
                ax.bar(j + (i - 1) * 0.27, by[lay], 0.27, color=f"C{i}", label=None if lay in seen else lay)
                seen.add(lay)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set(ylabel="output tokens/s (2 GPUs)", title="Offline throughput, 2x H200 (random weights; see RESULTS.md)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "throughput.png"), dpi=110)


if __name__ == "__main__":
    plot_crossover()
    plot_kv_capacity()
    plot_throughput()
    print("wrote", ", ".join(sorted(glob.glob(os.path.join(HERE, "*.png")))))
