"""Per-step choice between WaS and CaS from a cost model of one FFN layer.

With T tokens on the busiest replica, D replicas, F FFN parameters per layer (the family's FFN
group says how many, models/ffn.py; bf16: 2F bytes) of which a token multiplies A (a dense layer:
A = F; a MoE layer: its k experts of E, plus the router),
matmul rate R, HBM bandwidth B, link bandwidth N and a per-collective latency lat:
  WaS: compute max(2TA/R, 2F/B), fetch 2F(D-1)/D/N, overlapped -> max(compute, fetch / eff)
  CaS striped: each GPU runs its F/D slice (or E/D experts) on all D*T tokens: max(2TA/R, 2F/(D*B)),
               plus an all-gather and a reduce-scatter of D*T*H activations, on the critical path.
  CaS owner:   the owner runs all D*T tokens: max(2DTA/R, 2F/B) plus the same activation traffic.
The constants are defaults from H200 figures; on GPUs the engine measures the crossover itself
instead (sidp_jax/engine/ffn_calibration.py) and hands it to ModePolicy as `crossover_tokens`.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger("sidp_jax")


@dataclasses.dataclass
class CostModel:
    matmul_flops: float = 500e12  # R, FLOP/s
    hbm_bytes: float = 4.0e12  # B, B/s
    link_bytes: float = 200e9  # N, B/s (per GPU, all-gather)
    collective_latency: float = 20e-6
    overlap_efficiency: float = 0.7  # share of the fetch hidden behind compute in WaS
    source: str = "defaults (H200 figures)"


class ModePolicy:
    def __init__(self, *, fixed: str | None, num_replicas: int, hidden: int, ffn_params: int,
                 placement: str, cost_model: CostModel | None = None, crossover_tokens: int | None = None,
                 active_params: int | None = None):
        self.fixed = fixed
        self.D, self.H, self.F = num_replicas, hidden, ffn_params
        self.A = active_params if active_params is not None else ffn_params
        self.placement = placement
        self.cal = cost_model or CostModel()
        self.crossover = crossover_tokens if crossover_tokens is not None else self._crossover()
        if fixed is None:
            log.info("ffn_mode=auto: WaS from %d tokens per replica step (%s)", self.crossover, self.cal.source)

    def layer_seconds(self, mode: str, tokens: int) -> float:
        c, D, F, A = self.cal, self.D, self.F, self.A
        acts = 2 * (D - 1) * tokens * self.H * 2 / c.link_bytes + 2 * c.collective_latency
        if mode == "was":
            compute = max(2 * tokens * A / c.matmul_flops, 2 * F / c.hbm_bytes)
            fetch = 2 * F * (D - 1) / D / c.link_bytes
            return max(compute, fetch / max(c.overlap_efficiency, 1e-3), compute + fetch * (1 - c.overlap_efficiency))
        if self.placement == "owner":
            return max(2 * D * tokens * A / c.matmul_flops, 2 * F / c.hbm_bytes) + acts
        return max(2 * tokens * A / c.matmul_flops, 2 * F / (D * c.hbm_bytes)) + acts

    def _crossover(self) -> int:
        t = 1
        while t < 1 << 20 and self.layer_seconds("cas", t) <= self.layer_seconds("was", t):
            t *= 2
        return t

    def choose(self, tokens: int) -> str:
        if self.fixed is not None:
            return self.fixed
        return "was" if tokens >= self.crossover else "cas"

    def __call__(self, plans) -> str:
        return self.choose(max(sum(c.num_tokens for c in p) for p in plans))
