"""Every engine setting in one place, with vLLM's names where vLLM has one.

`LLM(model, **fields)`, `run_offline.py`'s engine flags and the Ray processor's `engine_kwargs`
all take these fields; `EngineConfig.check()` is where their values are checked, so each choice
list (the enums below) and each range is stated once.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import typing


# JAX preallocates this share of each GPU (`import sidp_jax` sets it before JAX starts);
# `gpu_memory_utilization` then decides the engine's part of it, and sidp_jax/engine/memory.py
# reads it back to recover the device's size.
XLA_MEM_FRACTION = "0.95"


class Parallel(enum.StrEnum):
    DP = "dp"  # independent replicas, every weight on every GPU
    TP = "tp"  # one replica, tensor parallel over the whole group
    SIDP = "sidp"  # replicas that pool the FFN weights


class Placement(enum.StrEnum):
    STRIPED = "striped"  # every FFN layer 1/D on each replica
    OWNER = "owner"  # layer l whole on replica l mod D


class FfnMode(enum.StrEnum):
    AUTO = "auto"  # WaS or CaS per step, by the tokens a replica runs
    WAS = "was"  # Weight-as-a-Service: fetch the FFN weights
    CAS = "cas"  # Compute-as-a-Service: ship the activations
    LOCAL = "local"  # the FFN is not pooled (dp, tp): never a user's choice


class Attention(enum.StrEnum):
    AUTO = "auto"  # the Pallas kernels on GPU where the model's shapes allow them
    REFERENCE = "reference"  # the pure-JAX paged attention everywhere
    PALLAS_INTERPRET = "pallas-interpret"  # the kernels in interpret mode on any backend: tests only


class AttentionKind(enum.StrEnum):
    """What attention one step runs (stats()["steps_per_attention"])."""
    DECODE = "decode"  # a decode-only step: the paged decode kernel
    MIXED = "mixed"  # decode rows and prefill chunks: the decode and chunk kernels
    REFERENCE = "reference"  # the pure-JAX paged attention


class KernelPath(enum.StrEnum):
    """How the Pallas attention kernels run, where they run at all."""
    GPU = "gpu"
    INTERPRET = "interpret"  # interpret mode on any backend (tests)


class Quantization(enum.StrEnum):
    FP8 = "fp8"  # W8A8 e4m3: per-output-channel weight scales, per-token activation scales


class KvCacheDtype(enum.StrEnum):
    AUTO = "auto"  # the compute dtype
    FP8 = "fp8"  # e4m3 (per-tensor scale 1.0, as vLLM without calibrated scales): twice the tokens


class WasRunner(enum.StrEnum):
    AUTO = "auto"  # per-replica programs where they apply
    REPLICAS = "replicas"  # per-replica programs, next layer's FFN slices prefetched by device_put
    SPMD = "spmd"  # all-gathers inside the one SPMD step


def _field(default, help_: str, *, cli: bool = True, choices: type[enum.StrEnum] | None = None,
           minimum: float | None = None):
    return dataclasses.field(default=default, metadata={"help": help_, "cli": cli, "choices": choices,
                                                         "minimum": minimum})


@dataclasses.dataclass
class EngineConfig:
    mesh: str = _field("dp=1", "device mesh, e.g. dp=8 or dp=4,tp=2")
    data_parallel_size: int | None = _field(None, "replicas (vLLM's name; with tensor_parallel_size, "
                                            "another way to give the mesh)", minimum=1)
    tensor_parallel_size: int | None = _field(None, "GPUs per replica (vLLM's name)", minimum=1)
    parallel: Parallel = _field("sidp", "parallelism scheme", choices=Parallel)
    placement: Placement = _field("striped", "SiDP weight placement", choices=Placement)
    ffn_mode: FfnMode = _field("auto", "SiDP FFN mode", choices=FfnMode)
    dtype: str = _field("auto", "compute dtype: auto (the checkpoint's), bfloat16, float16 or float32")
    quantization: Quantization | None = _field(None, "weight quantization (default: the checkpoint's own; an FP8 "
                                      "checkpoint runs in FP8)", choices=Quantization)
    kv_cache_dtype: KvCacheDtype = _field("auto", "KV cache dtype", choices=KvCacheDtype)
    gpu_memory_utilization: float = _field(0.9, "fraction of accelerator memory to use")
    max_model_len: int | None = _field(None, "longest prompt + output (default: the model's, at most 32768)")
    max_num_seqs: int = _field(256, "most concurrent sequences per replica", minimum=1)
    max_num_batched_tokens: int = _field(2048, "token budget per replica step", minimum=1)
    kv_block_size: int = _field(16, "KV cache page size in tokens", minimum=1)
    seed: int = _field(0, "engine random seed (requests without a seed)")
    kv_cache_tokens: int | None = _field(None, "KV tokens per replica (default: sized from free memory)", minimum=1)
    ffn_crossover_tokens: int | None = _field(None, "tokens per replica step from which auto picks WaS "
                                              "(default: measured on GPUs)", minimum=1)
    attention: Attention = _field("auto", "attention implementation", choices=Attention)
    was_runner: WasRunner = _field("auto", "how WaS steps run", choices=WasRunner)
    was_prefetch_depth: int = _field(1, "layers ahead the per-replica WaS runner copies FFN slices", minimum=1)
    precompile: bool | None = _field(None, "compile every step variant at start-up (default: on GPUs)")
    async_scheduling: bool = _field(True, "host overlap: schedule step N+1 while step N runs")
    enable_prefix_caching: bool = _field(True, "share the KV pages of prompts' common prefixes")
    compile_cache: bool | None = _field(None, "keep compiled step programs on disk for the next run "
                                        "(default: on GPUs; a JAX cache directory set by the user wins)")
    cache_dir: str | None = _field(None, "where the compiled programs and the WaS/CaS calibration are cached "
                                   "(default: $SIDP_JAX_CACHE, else ~/.cache/sidp_jax)")
    compile_workers: int = _field(1, "step variants precompile compiles at once (more than 1 makes XLA's "
                                  "GEMM autotuning time candidates against each other)", minimum=1)

    def __post_init__(self):
        self.check()
        for f in dataclasses.fields(self):  # a choice given as a string becomes its enum member
            if f.metadata["choices"] is not None and getattr(self, f.name) is not None:
                setattr(self, f.name, f.metadata["choices"](getattr(self, f.name)))
        if self.data_parallel_size is not None or self.tensor_parallel_size is not None:
            mesh = f"dp={self.data_parallel_size or 1},tp={self.tensor_parallel_size or 1}"
            if self.mesh not in ("dp=1", mesh):
                raise ValueError(f"mesh {self.mesh!r} disagrees with data_parallel_size/tensor_parallel_size ({mesh})")
            self.mesh = mesh

    def check(self) -> None:
        """Raise ValueError naming the field for any value out of its choices or range."""
        hints = typing.get_type_hints(EngineConfig)
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None and "None" in str(hints[f.name]):
                continue
            if meta["choices"] is not None and value not in set(meta["choices"]) - {FfnMode.LOCAL}:
                allowed = ", ".join(repr(str(c)) for c in meta["choices"] if c is not FfnMode.LOCAL)
                raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")
            kind = hints[f.name]
            if kind in (int, int | None) and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if kind in (bool, bool | None) and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ValueError(f"{f.name} must be at least {meta['minimum']}, got {value!r}")
        parse_mesh(self.mesh)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """An EngineConfig from keyword arguments; an unknown name is a TypeError that lists the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def cache_root(cache_dir: str | None = None) -> str:
    """The engine's cache directory: cache_dir, else $SIDP_JAX_CACHE, else ~/.cache/sidp_jax."""
    return cache_dir or os.environ.get("SIDP_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sidp_jax")


def parse_mesh(mesh: str) -> dict[str, int]:
    """'dp=4,tp=2' -> {'dp': 4, 'tp': 2}."""
    sizes = {"dp": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in str(mesh).split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh must look like 'dp=8' or 'dp=4,tp=2', got {mesh!r}")
        sizes[name] = int(value)
    return sizes


def cli_fields() -> list[dataclasses.Field]:
    """The fields `run_offline.py` offers as --flags (all of them today)."""
    return [f for f in dataclasses.fields(EngineConfig) if f.metadata["cli"]]
