"""The public offline API, with vLLM's names: LLM.generate, LLM.chat, SamplingParams."""

from __future__ import annotations

import dataclasses
import operator
import os
import time
from typing import Iterator

from sidp_jax.chat_messages import check_chat_template_kwargs, normalize_messages
from sidp_jax.engine.compilation import enable_compile_cache
from sidp_jax.engine.engine import Engine, Request
from sidp_jax.engine.startup import EngineSpec, precompile_steps, report_kv, start
from sidp_jax.engine_config import EngineConfig, KvCacheDtype
from sidp_jax.loading.placed_checkpoint import is_placed_checkpoint, placed_quantization
from sidp_jax.models.config import PRESET_GENERATION_DEFAULTS, PRESETS, ModelConfig, dtype_from_name
from sidp_jax.models.hf_config import load_config
from sidp_jax.models.fp8 import E4M3
from sidp_jax.outputs import RequestOutput
from sidp_jax.parallel.layouts import make_layout
from sidp_jax.sampling_params import SamplingParams

BUNDLED_MODEL = os.path.join(os.path.dirname(__file__), "assets", "tiny-qwen3")

PromptLike = str | list[int] | dict


class LLM:
    def __init__(self, model: str | ModelConfig | None = None, *, devices=None, verbose: bool = True,
                 **engine_kwargs):
        """model: a checkpoint directory, a preset name or a ModelConfig (random weights); default:
        the bundled tiny model. engine_kwargs: the fields of sidp_jax.engine_config.EngineConfig
        (mesh or data_parallel_size / tensor_parallel_size, parallel, placement, ffn_mode, dtype,
        quantization, kv_cache_dtype, gpu_memory_utilization, max_model_len, max_num_seqs,
        max_num_batched_tokens, kv_block_size, seed, kv_cache_tokens, ffn_crossover_tokens,
        attention, was_runner, was_prefetch_depth, precompile, async_scheduling,
        enable_prefix_caching), each checked there. devices: the devices the mesh is built from
        (default: all of the default backend's).

        quantization="fp8": W8A8 in e4m3 for the projections (qkv, o, gate_up, down), quantized at
        load time (per-output-channel weight scales, per-token dynamic activation scales; see
        models/fp8.py); FP8 checkpoints (both published forms) run this way by default.
        kv_cache_dtype="fp8": the KV cache in e4m3, twice the tokens per GPU; scaled per kv head
        where the checkpoint carries static KV scales (compressed-tensors kv_cache_scheme,
        "tensor" or "attn_head"), else with scale 1.

        was_runner: how sidp runs Weight-as-a-Service steps: "replicas" (per-replica programs, the
        next layer's FFN slices copied by async device_put while this layer computes; striped
        placement, tp=1), "spmd" (all-gathers inside the one SPMD step), "auto" (replicas where
        it applies).
        attention: "auto" runs the Pallas attention kernels on GPU where the model's shapes allow
        them (decode-only steps: the paged decode kernel; mixed steps: decode + chunk kernels),
        else the pure-JAX reference; "reference" never uses them; "pallas-interpret" is for tests
        only (the kernels in interpret mode, also on CPU). stats()["steps_per_attention"] counts
        steps by the attention they ran ("decode", "mixed" or "reference").
        was_prefetch_depth: how many layers ahead per-replica WaS copies the FFN slices (1: a
        double buffer). precompile: compile every step variant at start-up (None: on GPUs;
        stats()["precompile_seconds"]); otherwise each compiles on first use.
        async_scheduling: the host schedules and builds step N+1 and reads step N's tokens while
        the devices run (sidp_jax/engine/engine.py); False runs each step to its end first (for
        debugging and comparison; outputs are the same). stats() reports wall, host and device ms
        per step and the devices' idle share."""
        settings = EngineConfig.from_kwargs(**engine_kwargs)
        self.settings = settings  # the engine's settings; self.cfg is the model's ModelConfig
        t_start = time.perf_counter()
        self.model = model or BUNDLED_MODEL
        self.cfg, self.tokenizer = self._load_config_and_tokenizer(self.model)
        if settings.quantization is not None:  # else the checkpoint's own (config.json / a placed one's record)
            self.cfg = dataclasses.replace(self.cfg, quantization=settings.quantization)
        self.dtype = dtype_from_name(resolve_dtype(settings.dtype, self.cfg))
        self.kv_dtype = E4M3 if settings.kv_cache_dtype == KvCacheDtype.FP8 else self.dtype
        self.layout = make_layout(settings.mesh, settings.parallel, settings.placement, devices)
        self.layout.check(self.cfg)
        self.compile_cache = enable_compile_cache(self.layout.platform, settings.compile_cache, settings.cache_dir)
        self.max_model_len = settings.max_model_len or min(self.cfg.max_position_embeddings, 32768)
        self.verbose = verbose
        spec = EngineSpec(self.model, self.cfg, self.layout, self.dtype, self.kv_dtype, self.max_model_len, settings,
                          verbose)
        started = start(spec)
        kv = started.kv
        if self.max_model_len > kv.tokens_per_replica:
            print(f"[sidp_jax] max_model_len {self.max_model_len} exceeds one replica's KV capacity; "
                  f"lowering it to {kv.tokens_per_replica}")
            self.max_model_len = kv.tokens_per_replica
        eos = self.tokenizer.eos_token_ids if self.tokenizer else []
        self.engine = Engine(started.runner, started.scheduler, tokenizer=self.tokenizer, eos_ids=eos,
                             max_model_len=self.max_model_len, max_num_batched_tokens=settings.max_num_batched_tokens,
                             max_num_seqs=settings.max_num_seqs, seed=settings.seed, mode_policy=started.policy,
                             async_scheduling=settings.async_scheduling)
        self._request_counter = 0
        kv.precompile_seconds = precompile_steps(spec, started, self.engine.max_pages)
        self.kv_info = dataclasses.asdict(kv)  # part of stats()
        self.startup_seconds = time.perf_counter() - t_start
        if verbose:
            print(report_kv(spec, kv, self.max_model_len))
            print(f"[sidp_jax] start-up {self.startup_seconds:.1f} s (compilation cache: {self.compile_cache or 'off'}); "
                  f"each step variant compiles on first use (stats()['first_call_seconds'])")

    @staticmethod
    def _load_config_and_tokenizer(model) -> tuple[ModelConfig, object | None]:
        if isinstance(model, ModelConfig):  # a shape with random weights (tests, benchmarks)
            return model, None
        if model in PRESETS:
            return PRESETS[model], None
        if not os.path.isdir(model):
            raise FileNotFoundError(
                f"model {model!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
        from sidp_jax.loading.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model) if os.path.isfile(os.path.join(model, "tokenizer.json")) else None
        cfg = load_config(model)
        if is_placed_checkpoint(model):
            cfg = dataclasses.replace(cfg, quantization=placed_quantization(model))
        return cfg, tok

    # ----- requests -----
    def generation_defaults(self) -> dict:
        """SamplingParams fields from the checkpoint's generation_config.json, as vLLM applies
        them: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens as
        max_tokens."""
        defaults = dict(self.tokenizer.generation_defaults) if self.tokenizer else \
            dict(PRESET_GENERATION_DEFAULTS.get(self.model, {})) if isinstance(self.model, str) else {}
        known = {k: v for k, v in defaults.items()
                 if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        if isinstance(defaults.get("max_new_tokens"), int):
            known["max_tokens"] = defaults["max_new_tokens"]
        return known

    def default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams runs with: vLLM's defaults, then the checkpoint's
        generation_config.json (generation_defaults)."""
        return SamplingParams(**self.generation_defaults())

    def _prompt_ids(self, prompt: PromptLike) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt in any of vLLM's forms; the ids are checked against the
        vocabulary at admission (_admission_error), the same for every form."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model!r} has no tokenizer: pass prompts as token-id lists")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, _token_ids(prompt)

    def _request(self, prompt, sp: SamplingParams | None) -> Request:
        if isinstance(prompt, dict) and prompt.get("sampling_params") is not None:
            sp = prompt["sampling_params"]
        if isinstance(sp, dict):  # vLLM's fields by name
            sp = SamplingParams.from_dict(sp)
        elif sp is not None and not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams or a dict of its fields, got {type(sp).__name__}")
        text, ids = self._prompt_ids(prompt)
        sp = sp or self.default_sampling_params()
        if sp.truncate_prompt_tokens is not None:  # keep the last k (vLLM's left truncation)
            keep = self.max_model_len - 1 if sp.truncate_prompt_tokens == -1 else sp.truncate_prompt_tokens
            ids = ids[-keep:]
        req = Request(self._request_counter, text, ids, sp)
        if sp.bad_words:
            req.bad_word_ids = self._bad_word_ids(sp.bad_words)
        self._request_counter += 1
        return req

    def _bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids as vLLM finds them: the word as written (leading spaces
        stripped), and with one leading space where that tokenizes to other tokens of the same
        count (a word-initial form)."""
        if self.tokenizer is None:
            raise ValueError(f"SamplingParams.bad_words needs a tokenizer; model {self.model!r} has none")
        out = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return [ids for ids in out if ids]

    def _requests(self, prompts, sampling_params) -> tuple[Iterator[Request], int | None]:
        """(requests, how many: None for an iterable). A list of prompts is checked up front (a bad
        prompt raises before any runs); any other iterable is read one at a time as the engine
        takes its requests."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (text, dict, or token ids)
        if isinstance(sampling_params, (list, tuple)):
            if isinstance(prompts, (list, tuple)) and len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            pairs = zip(prompts, sampling_params, strict=True)
        else:
            pairs = ((p, sampling_params) for p in prompts)
        if isinstance(prompts, (list, tuple)):
            return iter([self._request(p, sp) for p, sp in pairs]), len(prompts)
        return (self._request(p, sp) for p, sp in pairs), None

    def _admission_error(self, req: Request) -> str | None:
        if not req.prompt_ids:
            return "empty prompt"
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.cfg.vocab_size:  # the dict form's ids too
            return f"prompt token ids must be in [0, {self.cfg.vocab_size})"
        if len(req.prompt_ids) >= self.max_model_len:
            return f"prompt has {len(req.prompt_ids)} tokens; max_model_len is {self.max_model_len}"
        return _vocab_error(req.params, self.cfg.vocab_size)

    def stream(self, prompts, sampling_params=None, *, use_tqdm: bool = True,
               max_pending: int | None = None) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (index into prompts, RequestOutput) as requests finish.

        prompts: a list, or any iterable, read lazily: at most `max_pending` requests (default: all
        of a list; 4 x max_num_seqs per replica for an iterable) are held in the engine at once,
        so a stream of millions of prompts needs memory for what is in flight only. A dict prompt
        may carry its own "sampling_params"."""
        base = self._request_counter
        reqs, total = self._requests(prompts, sampling_params)
        return self._run(reqs, total, base, use_tqdm, max_pending)

    def _run(self, reqs: Iterator[Request], total: int | None, base: int, use_tqdm: bool,
             max_pending: int | None) -> Iterator[tuple[int, RequestOutput]]:
        if max_pending is None:
            max_pending = (1 << 62) if total is not None else 4 * self.engine.max_num_seqs * self.layout.num_replicas
        by_index: dict[int, Request] = {}
        bar = _progress(total, use_tqdm)
        start, out_tokens, exhausted = time.perf_counter(), 0, False
        try:
            while True:
                while not exhausted and len(by_index) < max_pending:
                    req = next(reqs, None)
                    if req is None:
                        exhausted = True
                    elif (err := self._admission_error(req)) is not None:
                        yield req.index - base, _error(req, err)
                        bar.update(1)
                    else:
                        by_index[req.index] = req
                        self.engine.add(req)
                if not self.engine.has_work():
                    if exhausted:
                        break
                    continue
                for seq in self.engine.step():
                    out_tokens += len(seq.output_ids)
                    req = by_index.get(seq.request_index)  # None: a sibling sample already completed it
                    if req is not None and req.finished:
                        req.metrics.finished_time = time.time()
                        del by_index[req.index]
                        bar.update(1)
                        bar.set_postfix_str(f"{out_tokens / (time.perf_counter() - start):.1f} out tok/s")
                        yield req.index - base, req.output()
        finally:  # an error (or a consumer that stopped early) must not leave sequences behind
            self.engine.abort_all()
            bar.close()

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """The outputs of all prompts, in their order. As vLLM, a prompt that cannot run (empty,
        longer than max_model_len, token ids outside the vocabulary, sampling parameters that name
        tokens outside it) raises a ValueError naming it before any prompt runs; stream() instead
        returns such a prompt's error in its RequestOutput and runs the rest."""
        base = self._request_counter
        reqs, total = self._requests(prompts, sampling_params)
        reqs = list(reqs)
        for req in reqs:
            if (err := self._admission_error(req)) is not None:
                raise ValueError(f"prompt {req.index - base}{_prompt_preview(req)}: {err}")
        results = dict(self._run(iter(reqs), len(reqs), base, use_tqdm, None))
        return [results[i] for i in range(len(results))]

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.model!r} has no tokenizer, so no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages (or of conversations)")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if chat_template_kwargs is not None:
            chat_template_kwargs = check_chat_template_kwargs(chat_template_kwargs)
        prompts = []
        for i, conv in enumerate(conversations):
            where = "messages" if len(conversations) == 1 else f"conversation {i}"
            conv = normalize_messages(conv, where)  # the job's rules: text parts joined, null content empty
            text = self.tokenizer.apply_chat_template(conv, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def save_placed(self, path: str) -> None:
        """Save the weights as placed (orbax); `LLM(path, <same layout>)` restores them directly."""
        from sidp_jax.loading.placed_checkpoint import save_placed

        source = self.model if isinstance(self.model, str) and os.path.isdir(self.model) else None
        save_placed(path, self.engine.runner.params, self.cfg, self.layout, source)

    def stats(self) -> dict:
        s = self.engine.stats()
        s.update(self.kv_info)
        s["kv_tokens_per_replica"] = self.kv_info["tokens_per_replica"]
        s["num_replicas"] = self.layout.num_replicas
        s["max_concurrency"] = self.kv_info["tokens_per_replica"] / self.max_model_len
        s["startup_seconds"] = self.startup_seconds
        s["first_call_seconds"] = dict(self.engine.runner.first_call_seconds)
        return s


def resolve_dtype(name: str, cfg: ModelConfig) -> str:
    """dtype "auto": the checkpoint's (config.json's dtype / torch_dtype), bfloat16 where it is
    none of the supported ones (or for a preset shape)."""
    if name != "auto":
        return name
    return cfg.checkpoint_dtype if cfg.checkpoint_dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def _vocab_error(params: SamplingParams, vocab_size: int) -> str | None:
    try:
        params.check_vocab(vocab_size)
    except ValueError as e:
        return str(e)
    return None


def _token_ids(ids) -> list[int]:
    """Token ids as Python ints (numpy integers welcome); anything else is a ValueError."""
    try:
        if isinstance(ids, (str, bytes)) or any(isinstance(t, bool) for t in ids):
            raise TypeError
        return [operator.index(t) for t in ids]
    except TypeError:
        raise ValueError("prompt token ids must be a list of integers") from None


def _prompt_preview(req: Request) -> str:
    """' ("Tell me ab..." )' for a text prompt, '' for token ids: enough to find it."""
    if not req.prompt:
        return ""
    text = req.prompt if len(req.prompt) <= 40 else req.prompt[:37] + "..."
    return f" ({text!r})"


def _error(req: Request, msg: str) -> RequestOutput:
    return RequestOutput(str(req.index), req.prompt, req.prompt_ids, [], True, req.metrics, error=msg)


class _NoBar:
    def update(self, n): pass
    def set_postfix_str(self, s): pass
    def close(self): pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
