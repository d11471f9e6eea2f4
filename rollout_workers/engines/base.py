"""The one interface every inference engine implements, plus the checks they share.

An engine turns prompts into groups of G sampled completions (token ids, the sampler's own
per-token logprobs, finish reason, text) stamped with the policy version of the weights that
produced them, and loads new weights all-or-nothing. `make_engine` builds the one rollout.engine
names: the registry (`rollout_workers.engines.registry`) gives its class, whose `from_config`
reads the rollout section and `EngineOptions` (what the building process knows besides).

Optional capabilities are protocols, checked with isinstance by whoever needs them (the rollout
worker raises `MissingCapability`, naming the engine and the capability, when one is absent):
- `Sleepable`: free accelerator memory between sampling and the sync (vLLM's sleep mode);
- `NativeWeightTransfer`: vLLM's own weight transfer, driven by the learner (sync.transport nccl / ipc).

    PYTHONPATH=$PWD python -m pytest -q tests/test_engines.py
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.registry import get_engine
from rollout_workers.types import Completion, Prompt

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Engine dtype names (rollout.dtype) -> torch dtypes."""


@dataclass(frozen=True)
class SamplingParamsSpec:
    """Engine-neutral sampling parameters (each engine maps them onto its own API)."""

    n: int
    """G: completions per prompt."""
    temperature: float = 1.0
    """Softmax temperature (ignored when greedy)."""
    top_p: float = 1.0
    """Nucleus mass (ignored when greedy)."""
    max_new_tokens: int = 16
    """Maximum completion length in tokens."""
    seed: int = 0
    """Sampling seed: the same seed, weights and prompts give the same completions."""
    greedy: bool = False
    """Argmax decoding (eval); logprobs are then those of the unwarped distribution."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n (group size G) must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0 (or greedy=True), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GroupOutput:
    """The G completions of one prompt, as an engine returns them (unscored)."""

    prompt: Prompt
    """The prompt that was sampled."""
    prompt_token_ids: tuple[int, ...]
    """Token ids of `prompt.text` as the engine tokenized it. (P,)"""
    completions: tuple[Completion, ...]
    """G completions. (G,)"""
    policy_version: int
    """Weight version of the engine when the group was sampled."""


@dataclass(frozen=True)
class EngineOptions:
    """What the process that builds an engine knows beyond the rollout section (`from_config`
    takes both). Each engine reads the fields that concern it."""

    device: str = "cpu"
    """transformers: the torch device (a rollout worker passes "cuda" when Ray gave it a GPU;
    `launch.eval --device`). vLLM places itself on the accelerator it is given."""
    weight_transfer_backend: str = "reload"
    """vLLM: the weight path, from sync.transport (`weight_sync.transports.Transport.vllm_backend`):
    "reload" (gloo / ray sync) or vLLM's native "ipc" / "nccl"."""
    vllm_module: str = "vllm"
    """vLLM: the module imported as vLLM (tests: "tests.fake_vllm")."""


class Engine(ABC):
    """Interface of an inference engine (transformers, vLLM, the fake vLLM through the vLLM adapter)."""

    context: int
    """Positions the model can attend to (prompt + completion must fit)."""
    completed_prompts: int = 0
    """Prompts of the current (or last) generate() call whose groups are complete: a progress
    counter that shows groups leave before the batch ends."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str, options: EngineOptions) -> "Engine":
        """The engine configured from the rollout section, plus what the building process knows
        (`options`: the device, vLLM's weight path...); `make_engine` calls it."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParamsSpec) -> Iterator[GroupOutput]:
        """Sample `params.n` completions per prompt; yield each prompt's group as soon as it completes.

        Raises ValueError before sampling anything if a prompt is empty or too long for the context.
        """

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load a full set of new weights and stamp `version`; a bad set raises and changes nothing."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Policy version of the weights in use."""

    @abstractmethod
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine's weights by checkpoint (Hugging Face) name, for equality checks."""

    @property
    @abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer the engine encodes prompts and decodes completions with."""


def make_engine(cfg: RolloutConfig, model_path: str, options: EngineOptions = EngineOptions()) -> Engine:
    """The engine rollout.engine names (looked up in the registry; an unknown name is refused with
    the registered ones), built from the rollout section by its class's `from_config`."""
    return get_engine(cfg.engine).load().from_config(cfg, model_path, options)


@runtime_checkable
class Sleepable(Protocol):
    """An engine that can free its accelerator memory while a colocated learner trains
    (rollout.enable_sleep_mode; vLLM's sleep mode)."""

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (weights offloaded, KV cache dropped); no generate() until wake_up."""
        ...

    def wake_up(self) -> None:
        """Take the memory back; the engine samples with the weights it had."""
        ...


@runtime_checkable
class NativeWeightTransfer(Protocol):
    """vLLM's own weight transfer (sync.transport nccl / ipc): the learner's trainer-side engine
    drives init_transfer once, then start_update / update_chunk... / finish_update per version
    (abort_update when the sender gives up midway)."""

    def init_transfer(self, init_info: dict[str, Any]) -> None:
        """Open (or re-open) the connection to the trainer."""
        ...

    def start_update(self) -> None:
        """Begin an update: the engine's weights are undefined until finish_update."""
        ...

    def update_chunk(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Receive one chunk of the update (IPC handles, or an NCCL receive)."""
        ...

    def finish_update(self, version: int) -> None:
        """Complete the update and stamp `version`."""
        ...

    def abort_update(self, reason: str) -> None:
        """Give the update up; the engine refuses to sample until a complete update lands."""
        ...

    def shutdown_transfer(self) -> None:
        """Release the trainer connection (the engine keeps serving)."""
        ...


class MissingCapability(TypeError):
    """An engine was asked for an optional capability (`Sleepable`, `NativeWeightTransfer`) it does
    not implement; the message names the engine and the capability."""


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """`text` as an engine tokenizes a prompt: the tokenizer's own call with its default special
    tokens (a BOS where the model's tokenizer adds one; none for Qwen2-style ones). Every
    tokenization of a prompt goes through here: the driver's at load time (`Prompt.token_ids`), the
    worker's for a prompt without ids, and `encode_prompts`; so carried ids equal the engine's own."""
    return tokenizer(text)["input_ids"]


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, context: int) -> list[list[int]]:
    """Every prompt's token ids (its carried `Prompt.token_ids`, else `prompt_token_ids`), refusing
    (before any sampling) empty prompts and ones that cannot fit `context` positions together with
    `max_new_tokens` new tokens."""
    limit = context - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"engine's context of {context} positions")
    out = []
    for p in prompts:
        if not p.text:
            raise ValueError(f"prompt {p.uid!r} is empty")
        ids = list(p.token_ids) if p.token_ids is not None else prompt_token_ids(tokenizer, p.text)
        if not ids:
            raise ValueError(f"prompt {p.uid!r} encodes to zero tokens")
        if len(ids) > limit:
            raise ValueError(f"prompt {p.uid!r} has {len(ids)} tokens, longer than the engine's limit of "
                             f"{limit} (context {context} - max_new_tokens {max_new_tokens})")
        out.append(ids)
    return out


def check_weight_set(named_tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]],
                     optional: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Validate a complete weight set against the engine's names and shapes; return it as a dict.

    Every name of `expected` must be present, names of `optional` (e.g. a tied `lm_head.weight`)
    may be, nothing else may, and every shape must match. Checked in full before any weight is
    touched so that a bad or partial set never leaves the engine with mixed weights.
    """
    optional = optional or {}
    got: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        if name in got:
            raise ValueError(f"weight {name!r} appears twice in the update")
        got[name] = tensor
    unknown = sorted(set(got) - set(expected) - set(optional))
    missing = sorted(set(expected) - set(got))
    if unknown:
        raise ValueError(f"weight update has unknown names {unknown[:5]} (of {len(unknown)}); no weight was changed")
    if missing:
        raise ValueError(f"weight update is missing {missing[:5]} (of {len(missing)}); no weight was changed")
    for name, tensor in got.items():
        want = tuple(expected.get(name, optional.get(name, ())))
        if tuple(tensor.shape) != want:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the engine expects {want}; "
                             "no weight was changed")
        if not tensor.is_floating_point():
            raise ValueError(f"weight {name!r} has non-float dtype {tensor.dtype}; no weight was changed")
    return got
